//! Second factors as pure rules: the methods a login's second step accepts, the
//! RFC 8176 `amr` values tokens carry, TOTP (RFC 6238) codes and their time
//! steps, recovery codes, and the step-up verdict. No I/O.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// RFC 8176 authentication method references, as §8 fixes them.
pub mod amr {
    /// Password.
    pub const PWD: &str = "pwd";
    /// One-time password (TOTP).
    pub const OTP: &str = "otp";
    /// A recovery code (a local value).
    pub const RC: &str = "rc";
    /// Hardware-bound key (a passkey).
    pub const HWK: &str = "hwk";
    /// Two factors were used.
    pub const MFA: &str = "mfa";
}

/// A second factor the login's second step (or a step-up) accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Totp,
    RecoveryCode,
    Webauthn,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Totp, Method::RecoveryCode, Method::Webauthn];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// The wire name (`methods`, `method`).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Totp => "totp",
            Method::RecoveryCode => "recovery_code",
            Method::Webauthn => "webauthn",
        }
    }

    /// The `amr` value a use of this method adds.
    pub fn amr(self) -> &'static str {
        match self {
            Method::Totp => amr::OTP,
            Method::RecoveryCode => amr::RC,
            Method::Webauthn => amr::HWK,
        }
    }
}

/// What second factors a user holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Factors {
    /// A confirmed TOTP authenticator.
    pub totp: bool,
    pub passkeys: i64,
    pub recovery_codes_left: i64,
}

impl Factors {
    /// A user "has a second factor" (login asks for it, step-up applies) when
    /// they hold TOTP or a passkey; recovery codes only back those up.
    pub fn any(&self) -> bool {
        self.totp || self.passkeys > 0
    }

    /// The methods the second step offers, in a stable order.
    pub fn methods(&self) -> Vec<Method> {
        let mut m = Vec::new();
        if self.totp {
            m.push(Method::Totp);
        }
        if self.any() && self.recovery_codes_left > 0 {
            m.push(Method::RecoveryCode);
        }
        if self.passkeys > 0 {
            m.push(Method::Webauthn);
        }
        m
    }
}

/// `amr` after `used` was added to a session authenticated by `before`: each
/// value once, and `mfa` whenever two distinct factors were used (a passkey
/// login arrives with `["hwk", "mfa"]` already).
pub fn amr_after(before: &[String], used: Method) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in before
        .iter()
        .map(String::as_str)
        .chain([used.amr()])
        .filter(|v| *v != amr::MFA)
    {
        if !out.iter().any(|o| o == v) {
            out.push(v.to_string());
        }
    }
    if out.len() >= 2 || before.iter().any(|v| v == amr::MFA) {
        out.push(amr::MFA.to_string());
    }
    out
}

/// Whether `amr` says two factors were used.
pub fn is_multi_factor(amr: &[String]) -> bool {
    amr.iter().any(|v| v == amr::MFA)
}

// ---- TOTP (RFC 6238: SHA-1, 6 digits, 30 s) -----------------------------------

pub const TOTP_ISSUER: &str = "StocksBlitz";
pub const TOTP_DIGITS: usize = 6;
pub const TOTP_STEP_SECS: u64 = 30;
/// 160 bits, RFC 4226's recommendation.
pub const TOTP_SECRET_BYTES: usize = 20;

/// A fresh random TOTP secret.
pub fn new_totp_secret() -> Vec<u8> {
    let mut s = vec![0u8; TOTP_SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut s);
    s
}

fn totp(secret: &[u8], label: &str) -> Result<totp_rs::TOTP, String> {
    totp_rs::TOTP::new(
        totp_rs::Algorithm::SHA1,
        TOTP_DIGITS,
        0,
        TOTP_STEP_SECS,
        secret.to_vec(),
        Some(TOTP_ISSUER.to_string()),
        label.to_string(),
    )
    .map_err(|e| format!("TOTP parameters refused: {e}"))
}

/// The enrolment an authenticator app scans: base32 secret, `otpauth://` URI
/// (issuer StocksBlitz, label the email) and an SVG QR code of the URI.
pub struct TotpEnrolment {
    pub secret_base32: String,
    pub otpauth_uri: String,
    pub qr_svg: String,
}

pub fn totp_enrolment(secret: &[u8], email: &str) -> Result<TotpEnrolment, String> {
    // A label holds no ':' (it separates issuer and account): an email has none.
    let t = totp(secret, &email.replace(':', ""))?;
    let uri = t.get_url();
    let qr = qrcode::QrCode::with_error_correction_level(uri.as_bytes(), qrcode::EcLevel::M)
        .map_err(|e| format!("QR code: {e}"))?;
    let svg = qr
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(200, 200)
        .quiet_zone(true)
        .build();
    Ok(TotpEnrolment {
        secret_base32: t.get_secret_base32(),
        otpauth_uri: uri,
        qr_svg: svg,
    })
}

/// The code for time step `step` (for tests and the load generator).
pub fn totp_code_at_step(secret: &[u8], step: u64) -> String {
    totp(secret, "x")
        .map(|t| t.generate(step * TOTP_STEP_SECS))
        .unwrap_or_default()
}

/// The time step `code` matches at `now_secs`, one step of skew either way, and
/// only if it is later than `last_used` (a code is accepted at most once, and
/// no code older than one already used). Compared in constant time.
pub fn totp_match(secret: &[u8], code: &str, now_secs: u64, last_used: Option<u64>) -> Option<u64> {
    let code = code.trim();
    if code.len() != TOTP_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let t = totp(secret, "x").ok()?;
    let now = now_secs / TOTP_STEP_SECS;
    let mut found = None;
    // Every candidate is computed, so timing does not tell which one matched.
    for step in [now.saturating_sub(1), now, now + 1] {
        if t.check(code, step * TOTP_STEP_SECS) && found.is_none() {
            found = Some(step);
        }
    }
    found.filter(|s| last_used.is_none_or(|l| *s > l))
}

// ---- recovery codes ------------------------------------------------------------

pub const RECOVERY_CODES: usize = 10;
/// Lowercase letters without l and o, and digits without 0 and 1: 32 symbols
/// no one misreads, 5 bits each.
const RECOVERY_ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";
const RECOVERY_CHARS: usize = 12;

/// Ten fresh codes, `xxxx-xxxx-xxxx` (60 random bits each).
pub fn new_recovery_codes() -> Vec<String> {
    (0..RECOVERY_CODES)
        .map(|_| {
            let mut raw = [0u8; RECOVERY_CHARS];
            rand::rngs::OsRng.fill_bytes(&mut raw);
            // 32 symbols: the low five bits of a random byte pick one without bias.
            let chars: String = raw
                .iter()
                .map(|b| RECOVERY_ALPHABET[(b & 31) as usize] as char)
                .collect();
            format!("{}-{}-{}", &chars[0..4], &chars[4..8], &chars[8..12])
        })
        .collect()
}

/// A code as typed (any case, with or without dashes or spaces), normalised;
/// `None` when it cannot be one of ours.
pub fn normalize_recovery_code(raw: &str) -> Option<String> {
    let s: String = raw
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (s.len() == RECOVERY_CHARS && s.bytes().all(|b| RECOVERY_ALPHABET.contains(&b))).then_some(s)
}

/// What is stored for a (normalised) code: SHA-256, bound to its user.
pub fn recovery_code_hash(user_id: uuid::Uuid, normalized: &str) -> [u8; 32] {
    Sha256::digest(format!("stocksblitz.recovery_code.v1:{user_id}:{normalized}").as_bytes()).into()
}

// ---- step-up -------------------------------------------------------------------

/// Why a step-up operation is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepUpRefusal {
    /// The user has a second factor, but this session has not used one within
    /// the window: 403 `mfa_required`.
    MfaRequired,
    /// The policy requires this user to enrol a second factor first: 403
    /// `mfa_enrollment_required`.
    EnrollmentRequired,
}

/// How a session was authenticated, as the step-up rule sees it.
#[derive(Debug, Clone)]
pub struct SessionAuth {
    pub amr: Vec<String>,
    pub auth_time_secs: i64,
}

/// The step-up rule (§8): a user with a second factor needs `mfa` in the
/// session's `amr` and an `auth_time` within `window_secs`; a user without one
/// passes unless the policy requires them to enrol. `session` is `None` for a
/// caller without a login session (an API key), which can never step up.
pub fn step_up_verdict(
    has_factor: bool,
    required_by_policy: bool,
    session: Option<&SessionAuth>,
    now_secs: i64,
    window_secs: u64,
) -> Result<(), StepUpRefusal> {
    if !has_factor {
        return if required_by_policy {
            Err(StepUpRefusal::EnrollmentRequired)
        } else {
            Ok(())
        };
    }
    match session {
        Some(s)
            if is_multi_factor(&s.amr)
                && now_secs.saturating_sub(s.auth_time_secs) <= window_secs as i64 =>
        {
            Ok(())
        }
        _ => Err(StepUpRefusal::MfaRequired),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn amr_values_follow_rfc_8176() {
        assert_eq!(
            amr_after(&s(&["pwd"]), Method::Totp),
            s(&["pwd", "otp", "mfa"])
        );
        assert_eq!(
            amr_after(&s(&["pwd"]), Method::RecoveryCode),
            s(&["pwd", "rc", "mfa"])
        );
        assert_eq!(
            amr_after(&s(&["pwd", "otp", "mfa"]), Method::Totp),
            s(&["pwd", "otp", "mfa"])
        );
        assert_eq!(
            amr_after(&s(&["hwk", "mfa"]), Method::Totp),
            s(&["hwk", "otp", "mfa"])
        );
        assert!(!is_multi_factor(&s(&["pwd"])));
    }

    #[test]
    fn methods_offer_recovery_codes_only_beside_a_factor() {
        let mut f = Factors {
            totp: false,
            passkeys: 0,
            recovery_codes_left: 3,
        };
        assert!(!f.any());
        assert!(f.methods().is_empty());
        f.totp = true;
        assert_eq!(f.methods(), [Method::Totp, Method::RecoveryCode]);
        f.passkeys = 1;
        f.recovery_codes_left = 0;
        assert_eq!(f.methods(), [Method::Totp, Method::Webauthn]);
        assert_eq!(Method::parse("recovery_code"), Some(Method::RecoveryCode));
        assert_eq!(Method::parse("sms"), None);
    }

    /// RFC 6238 appendix B, SHA-1, truncated to six digits.
    #[test]
    fn totp_matches_the_rfc_vectors_with_one_step_of_skew_and_no_replay() {
        let secret = b"12345678901234567890";
        assert_eq!(totp_code_at_step(secret, 59 / 30), "287082");
        assert_eq!(totp_code_at_step(secret, 1111111109 / 30), "081804");
        assert_eq!(totp_code_at_step(secret, 1234567890 / 30), "005924");
        let now = 1234567890u64;
        let step = now / 30;
        let code = totp_code_at_step(secret, step);
        assert_eq!(totp_match(secret, &code, now, None), Some(step));
        // One step either way, not two.
        assert_eq!(totp_match(secret, &code, now + 30, None), Some(step));
        assert_eq!(totp_match(secret, &code, now - 30, None), Some(step));
        assert_eq!(totp_match(secret, &code, now + 60, None), None);
        // Used once: the same step, or an older one, is refused.
        assert_eq!(totp_match(secret, &code, now, Some(step)), None);
        let older = totp_code_at_step(secret, step - 1);
        assert_eq!(totp_match(secret, &older, now, Some(step)), None);
        let newer = totp_code_at_step(secret, step + 1);
        assert_eq!(totp_match(secret, &newer, now, Some(step)), Some(step + 1));
        for bad in ["", "12345", "1234567", "abcdef", " 28708 "] {
            assert_eq!(totp_match(secret, bad, 59, None), None);
        }
    }

    #[test]
    fn enrolment_uri_and_qr_code() {
        let secret = new_totp_secret();
        let e = totp_enrolment(&secret, "ann@example.com").unwrap();
        assert!(e
            .otpauth_uri
            .starts_with("otpauth://totp/StocksBlitz:ann%40example.com?secret="));
        assert!(e.otpauth_uri.contains("issuer=StocksBlitz"));
        assert!(e.otpauth_uri.contains(&e.secret_base32));
        assert_eq!(e.secret_base32.len(), 32);
        assert!(e.qr_svg.contains("<svg") && e.qr_svg.contains("</svg>"));
    }

    #[test]
    fn recovery_codes_are_ten_distinct_and_normalise() {
        let codes = new_recovery_codes();
        assert_eq!(codes.len(), 10);
        let mut uniq = codes.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 10);
        for c in &codes {
            assert_eq!(c.len(), 14);
            let n = normalize_recovery_code(c).unwrap();
            assert_eq!(normalize_recovery_code(&c.to_uppercase()), Some(n.clone()));
            assert_eq!(normalize_recovery_code(&n), Some(n));
        }
        assert_eq!(normalize_recovery_code("0000-0000-0000"), None);
        assert_eq!(normalize_recovery_code("abc"), None);
        let u = uuid::Uuid::new_v4();
        assert_ne!(
            recovery_code_hash(u, "abcdabcdabcd"),
            recovery_code_hash(uuid::Uuid::new_v4(), "abcdabcdabcd")
        );
    }

    #[test]
    fn step_up_needs_a_recent_second_factor_from_those_who_have_one() {
        let fresh = SessionAuth {
            amr: s(&["pwd", "otp", "mfa"]),
            auth_time_secs: 1000,
        };
        let pwd_only = SessionAuth {
            amr: s(&["pwd"]),
            auth_time_secs: 1000,
        };
        assert_eq!(step_up_verdict(false, false, None, 1000, 600), Ok(()));
        assert_eq!(
            step_up_verdict(false, true, Some(&fresh), 1000, 600),
            Err(StepUpRefusal::EnrollmentRequired)
        );
        assert_eq!(
            step_up_verdict(true, false, Some(&fresh), 1600, 600),
            Ok(())
        );
        assert_eq!(
            step_up_verdict(true, false, Some(&fresh), 1601, 600),
            Err(StepUpRefusal::MfaRequired)
        );
        assert_eq!(
            step_up_verdict(true, true, Some(&pwd_only), 1000, 600),
            Err(StepUpRefusal::MfaRequired)
        );
        assert_eq!(
            step_up_verdict(true, false, None, 1000, 600),
            Err(StepUpRefusal::MfaRequired)
        );
    }
}
