//! Second factors (DESIGN §8, issue 14): TOTP enrolment, status, removal,
//! recovery codes, an admin's removal of a user's factors, the re-encryption of
//! TOTP secrets, and the step-up rule (`StepUp::require_step_up`) that the
//! operations §8 lists call. The login's second step is in `mfa_login.rs`.

use std::sync::Arc;

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use super::audit::{AuditEntry, Outcome};
use super::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::config::Settings;
use crate::crypto::aead::{AeadError, KeyRing};
use crate::domain::mfa::{self as rules, Factors, Method, SessionAuth, TotpEnrolment};
use crate::domain::recovery::Template;
use crate::store::{self, Db};

/// Factors are never managed with an API key: the refusal says so.
const MANAGED_WITH: &str = "second factors are managed with";

/// The associated data of a user's sealed TOTP secret: a ciphertext copied to
/// another user's row no longer opens.
fn totp_aad(user_id: Uuid) -> Vec<u8> {
    format!("stocksblitz.user_totp.v1:{user_id}").into_bytes()
}

fn now_secs() -> u64 {
    Utc::now().timestamp().max(0) as u64
}

// ---- the step-up rule ------------------------------------------------------------

/// The step-up rule and the enrolment policy: cheap to clone, held by every
/// service with an operation on §8's list.
#[derive(Clone)]
pub struct StepUp {
    db: Db,
    window_secs: u64,
    required_roles: Arc<[String]>,
    managers: bool,
}

impl StepUp {
    pub fn new(db: Db, settings: &Settings) -> Self {
        Self {
            db,
            window_secs: settings.mfa_step_up_seconds,
            required_roles: settings.mfa_required_roles().into(),
            managers: settings.mfa_required_for_managers(),
        }
    }

    /// Does the policy make this user enrol a second factor
    /// (MFA_REQUIRED_ROLES, MFA_REQUIRED_FOR_MANAGERS)?
    async fn required_by_policy(
        &self,
        user_id: Uuid,
        roles: &[crate::domain::user::Role],
    ) -> ServiceResult<bool> {
        if roles
            .iter()
            .any(|r| self.required_roles.iter().any(|n| n == r.as_str()))
        {
            return Ok(true);
        }
        Ok(self.managers && store::mfa::is_account_manager(&self.db, user_id).await?)
    }

    /// The one check every step-up operation of §8 makes before doing anything:
    /// a user with a second factor needs `mfa` in the session's `amr` and an
    /// `auth_time` within MFA_STEP_UP_SECONDS (403 `mfa_required`), an API key
    /// never qualifies; a user the policy names must enrol first (403
    /// `mfa_enrollment_required`). `operation` names the operation in the
    /// audit row a refusal writes.
    pub async fn require_step_up(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        operation: &'static str,
    ) -> ServiceResult<()> {
        let Caller::User {
            user_id,
            roles,
            session_id,
            key,
        } = caller
        else {
            // Service clients do none of these operations: the use case refuses them.
            return Ok(());
        };
        let factors = store::mfa::factors(&self.db, *user_id).await?;
        let required = !factors.any() && self.required_by_policy(*user_id, roles).await?;
        let session = match (session_id, key) {
            (Some(sid), None) if factors.any() => {
                store::mfa::session_auth(&self.db, *sid, *user_id)
                    .await?
                    .map(|(amr, at)| SessionAuth {
                        amr,
                        auth_time_secs: at.timestamp(),
                    })
            }
            _ => None,
        };
        let verdict = rules::step_up_verdict(
            factors.any(),
            required,
            session.as_ref(),
            Utc::now().timestamp(),
            self.window_secs,
        );
        let Err(refusal) = verdict else {
            return Ok(());
        };
        let reason = match refusal {
            rules::StepUpRefusal::MfaRequired => "mfa_required",
            rules::StepUpRefusal::EnrollmentRequired => "mfa_enrollment_required",
        };
        let entry = AuditEntry::new("auth.step_up.required", Outcome::Denied)
            .by(caller)
            .target("user", user_id)
            .meta(meta)
            .details(json!({ "operation": operation, "reason": reason }));
        let mut tx = self.db.begin().await?;
        tx.audit(&entry).await?;
        tx.commit().await?;
        Err(ServiceError::StepUp(refusal))
    }
}

// ---- factors -------------------------------------------------------------------------

/// `GET /v1/users/me/mfa`.
#[derive(Debug, Clone, Copy)]
pub struct MfaStatus {
    pub totp: bool,
    pub passkeys: i64,
    pub recovery_codes_left: i64,
}

/// What an admin's removal took away.
#[derive(Debug, Clone, Copy)]
pub struct Removed {
    pub totp: bool,
    pub recovery_codes: u64,
}

/// What `reencrypt_totp_secrets` did (printed by `admin reencrypt-credentials`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TotpReencryptSummary {
    pub candidates: usize,
    pub reencrypted: usize,
    pub already_current: usize,
    pub failed: Vec<TotpReencryptFailure>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TotpReencryptFailure {
    pub user_id: Uuid,
    pub error: String,
}

#[derive(Clone)]
pub struct MfaService {
    pub(crate) db: Db,
    /// The credentials key ring (CREDENTIALS_ENCRYPTION_KEYS): TOTP secrets are
    /// sealed like broker credentials. `None` (development without keys): TOTP
    /// cannot be enrolled or checked.
    keys: Option<Arc<KeyRing>>,
    pub(crate) step_up: StepUp,
    /// The login's second step and step-up (mfa_login): sessions they open or
    /// refresh, the lockout their wrong answers count toward, the login
    /// throttle per client IP they count against.
    pub(crate) sessions: Arc<super::sessions::Sessions>,
    pub(crate) lockout: Arc<super::lockout::Lockout>,
    pub(crate) throttle: Arc<super::throttle::Throttle>,
    /// LOGIN_IP_MAX_PER_MINUTE.
    pub(crate) ip_max_per_minute: u32,
    pub(crate) token_memo: super::mfa_login::TokenMemo,
}

impl MfaService {
    pub fn new(
        db: Db,
        keys: Option<Arc<KeyRing>>,
        settings: &Settings,
        sessions: Arc<super::sessions::Sessions>,
        lockout: Arc<super::lockout::Lockout>,
        throttle: Arc<super::throttle::Throttle>,
    ) -> Self {
        Self {
            step_up: StepUp::new(db.clone(), settings),
            db,
            keys,
            sessions,
            lockout,
            throttle,
            ip_max_per_minute: settings.login_ip_max_per_minute,
            token_memo: super::mfa_login::TokenMemo::new(),
        }
    }

    fn keys(&self) -> ServiceResult<&KeyRing> {
        self.keys.as_deref().ok_or_else(|| {
            ServiceError::Unavailable("CREDENTIALS_ENCRYPTION_KEYS is not configured".into())
        })
    }

    fn open_secret(&self, user_id: Uuid, row: &store::mfa::TotpRow) -> ServiceResult<Vec<u8>> {
        self.keys()?
            .open(
                &row.secret_key_id,
                &totp_aad(user_id),
                &row.secret_ciphertext,
            )
            .map_err(|e| match e {
                AeadError::Tampered | AeadError::UnknownKey(_) => {
                    ServiceError::Integrity("a TOTP secret")
                }
                other => ServiceError::internal(other),
            })
    }

    pub async fn factors(&self, user_id: Uuid) -> ServiceResult<Factors> {
        Ok(store::mfa::factors(&self.db, user_id).await?)
    }

    pub async fn status(&self, caller: &Caller) -> ServiceResult<MfaStatus> {
        let uid = caller.session_user_for(MANAGED_WITH)?.0;
        let f = self.factors(uid).await?;
        Ok(MfaStatus {
            totp: f.totp,
            passkeys: f.passkeys,
            recovery_codes_left: if f.any() { f.recovery_codes_left } else { 0 },
        })
    }

    /// `POST /v1/users/me/mfa/totp`: a pending enrolment (a new secret each
    /// time, replacing an unconfirmed one); 409 when TOTP is already on.
    #[tracing::instrument(skip_all)]
    pub async fn start_totp(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
    ) -> ServiceResult<TotpEnrolment> {
        let uid = caller.session_user_for(MANAGED_WITH)?.0;
        let keys = self.keys()?;
        let user = store::users::get(&self.db, uid)
            .await?
            .ok_or(ServiceError::InvalidToken)?;
        let secret = rules::new_totp_secret();
        let enrolment = rules::totp_enrolment(&secret, &user.email)
            .map_err(|m| ServiceError::internal(anyhow::anyhow!(m)))?;
        let sealed = keys
            .seal(&totp_aad(uid), &secret)
            .map_err(ServiceError::internal)?;
        let mut tx = self.db.begin().await?;
        if !store::mfa::put_pending_totp(&mut tx, uid, &sealed, keys.active_kid()).await? {
            return Err(ServiceError::Conflict(
                "TOTP is already enabled: remove it before enrolling again".into(),
            ));
        }
        tx.audit(
            &AuditEntry::new("mfa.totp.enrolment_started", Outcome::Success)
                .by(caller)
                .target("user", uid)
                .meta(meta),
        )
        .await?;
        tx.commit().await?;
        Ok(enrolment)
    }

    /// `POST /v1/users/me/mfa/totp/confirm`: the first code turns TOTP on and
    /// yields ten recovery codes, shown this once (any earlier set is replaced).
    #[tracing::instrument(skip_all)]
    pub async fn confirm_totp(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        code: &str,
    ) -> ServiceResult<Vec<String>> {
        let uid = caller.session_user_for(MANAGED_WITH)?.0;
        let mut tx = self.db.begin().await?;
        let row = match store::mfa::totp_for_update(&mut tx, uid).await? {
            Some(r) if !r.confirmed => r,
            Some(_) => return Err(ServiceError::Conflict("TOTP is already enabled".into())),
            None => {
                return Err(ServiceError::Conflict(
                    "no TOTP enrolment to confirm: POST /v1/users/me/mfa/totp first".into(),
                ))
            }
        };
        let secret = self.open_secret(uid, &row)?;
        let Some(step) = rules::totp_match(&secret, code, now_secs(), None) else {
            drop(tx);
            let entry = AuditEntry::new("mfa.totp.confirm_failed", Outcome::Failure)
                .by(caller)
                .target("user", uid)
                .meta(meta);
            let mut tx = self.db.begin().await?;
            tx.audit(&entry).await?;
            tx.commit().await?;
            return Err(ServiceError::validation(
                "code",
                "incorrect",
                "the code does not match: check the authenticator's clock and try the current code",
            ));
        };
        store::mfa::confirm_totp(&mut tx, uid, step as i64).await?;
        let codes = rules::new_recovery_codes();
        let hashes: Vec<[u8; 32]> = codes
            .iter()
            .map(|c| {
                rules::recovery_code_hash(
                    uid,
                    &rules::normalize_recovery_code(c).unwrap_or_default(),
                )
            })
            .collect();
        store::mfa::replace_recovery_codes(&mut tx, uid, &hashes).await?;
        tx.audit(
            &AuditEntry::new("mfa.totp.enabled", Outcome::Success)
                .by(caller)
                .target("user", uid)
                .meta(meta)
                .details(json!({ "recovery_codes": codes.len() })),
        )
        .await?;
        super::notify::notify(&mut tx, Template::MfaEnabled, uid, json!({})).await?;
        tx.commit().await?;
        Ok(codes)
    }

    /// `DELETE /v1/users/me/mfa/totp` (step-up). With no factor left, the
    /// recovery codes go too: they only back a factor up.
    #[tracing::instrument(skip_all)]
    pub async fn remove_totp(&self, caller: &Caller, meta: &RequestMeta) -> ServiceResult<()> {
        let uid = caller.session_user_for(MANAGED_WITH)?.0;
        self.step_up
            .require_step_up(caller, meta, "mfa.totp.remove")
            .await?;
        let mut tx = self.db.begin().await?;
        let had = store::mfa::delete_totp(&mut tx, uid).await?;
        if !had {
            return Err(ServiceError::NotFound("totp"));
        }
        // Recovery codes stay while a passkey is left to go with them.
        let passkeys_left = store::mfa::passkey_count(&mut tx, uid).await?;
        let codes = if passkeys_left == 0 {
            store::mfa::delete_recovery_codes(&mut tx, uid).await?
        } else {
            0
        };
        tx.audit(
            &AuditEntry::new("mfa.totp.removed", Outcome::Success)
                .by(caller)
                .target("user", uid)
                .meta(meta)
                .details(json!({ "recovery_codes_removed": codes })),
        )
        .await?;
        super::notify::notify(&mut tx, Template::MfaDisabled, uid, json!({})).await?;
        tx.commit().await?;
        Ok(())
    }

    /// `POST /v1/users/me/mfa/recovery-codes` (step-up): a new set of ten; the
    /// old ones stop working.
    #[tracing::instrument(skip_all)]
    pub async fn regenerate_recovery_codes(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
    ) -> ServiceResult<Vec<String>> {
        let uid = caller.session_user_for(MANAGED_WITH)?.0;
        self.step_up
            .require_step_up(caller, meta, "mfa.recovery_codes.regenerate")
            .await?;
        if !self.factors(uid).await?.any() {
            return Err(ServiceError::Conflict(
                "recovery codes back up a second factor: enrol one first".into(),
            ));
        }
        let codes = rules::new_recovery_codes();
        let hashes: Vec<[u8; 32]> = codes
            .iter()
            .map(|c| {
                rules::recovery_code_hash(
                    uid,
                    &rules::normalize_recovery_code(c).unwrap_or_default(),
                )
            })
            .collect();
        let mut tx = self.db.begin().await?;
        store::mfa::replace_recovery_codes(&mut tx, uid, &hashes).await?;
        tx.audit(
            &AuditEntry::new("mfa.recovery_codes.regenerated", Outcome::Success)
                .by(caller)
                .target("user", uid)
                .meta(meta)
                .details(json!({ "recovery_codes": codes.len() })),
        )
        .await?;
        tx.commit().await?;
        Ok(codes)
    }

    /// `DELETE /v1/admin/users/{id}/mfa`: an admin removes every factor of a user
    /// (a lost phone); audited, and step-up applies to the admin.
    #[tracing::instrument(skip_all, fields(user_id = %user_id))]
    pub async fn admin_remove_all(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        user_id: Uuid,
    ) -> ServiceResult<Removed> {
        if !(caller.has_role(crate::domain::user::Role::Admin)
            && caller.key_allows_scope("admin:users"))
        {
            return Err(ServiceError::Forbidden("the admin role is required".into()));
        }
        self.step_up
            .require_step_up(caller, meta, "admin.user.mfa.remove")
            .await?;
        let mut tx = self.db.begin().await?;
        if store::users::lock(&mut tx, user_id).await?.is_none() {
            return Err(ServiceError::NotFound("user"));
        }
        let totp = store::mfa::delete_totp(&mut tx, user_id).await?;
        let recovery_codes = store::mfa::delete_recovery_codes(&mut tx, user_id).await?;
        let passkeys = super::passkeys::PasskeyService::remove_all_in(&mut tx, user_id).await?;
        tx.audit(
            &AuditEntry::new("admin.user.mfa.removed", Outcome::Success)
                .by(caller)
                .target("user", user_id)
                .meta(meta)
                .details(json!({
                    "totp": totp,
                    "recovery_codes": recovery_codes,
                    "passkeys": passkeys,
                })),
        )
        .await?;
        if totp || recovery_codes > 0 || passkeys > 0 {
            super::notify::notify(&mut tx, Template::MfaDisabled, user_id, json!({})).await?;
        }
        tx.commit().await?;
        Ok(Removed {
            totp,
            recovery_codes,
        })
    }

    // ---- checking a second factor (login's second step, step-up) --------------------

    /// Checks a TOTP code of `user_id` and, when right, records its time step so
    /// the code (and any older one) is never accepted again. Wrong: `false`.
    pub(crate) async fn check_totp(&self, user_id: Uuid, code: &str) -> ServiceResult<bool> {
        let Some(row) = store::mfa::totp(&self.db, user_id).await? else {
            return Ok(false);
        };
        if !row.confirmed {
            return Ok(false);
        }
        let secret = self.open_secret(user_id, &row)?;
        let last = row.last_used_step.map(|s| s.max(0) as u64);
        let Some(step) = rules::totp_match(&secret, code, now_secs(), last) else {
            return Ok(false);
        };
        // Of two requests racing with the same code, one records the step.
        Ok(store::mfa::accept_totp_step(&self.db, user_id, step as i64).await?)
    }

    /// Spends a recovery code of `user_id`; `false` when it is not an unused one.
    pub(crate) async fn check_recovery_code(
        &self,
        user_id: Uuid,
        code: &str,
    ) -> ServiceResult<bool> {
        let Some(normalized) = rules::normalize_recovery_code(code) else {
            return Ok(false);
        };
        let hash = rules::recovery_code_hash(user_id, &normalized);
        let mut tx = self.db.begin().await?;
        let used = store::mfa::use_recovery_code(&mut tx, user_id, &hash).await?;
        if used {
            tx.audit(
                &AuditEntry::new("mfa.recovery_code.used", Outcome::Success)
                    .actor("user", user_id)
                    .target("user", user_id),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(used)
    }

    /// A code-based second factor (`totp`, `recovery_code`).
    pub(crate) async fn check_code(
        &self,
        user_id: Uuid,
        method: Method,
        code: &str,
    ) -> ServiceResult<bool> {
        match method {
            Method::Totp => self.check_totp(user_id, code).await,
            Method::RecoveryCode => self.check_recovery_code(user_id, code).await,
            // Assertions are checked by the passkeys module (`*_with`).
            Method::Webauthn => Ok(false),
        }
    }
}

impl MfaService {
    /// Moves every TOTP secret to the active key (`admin reencrypt-credentials`);
    /// each user is its own transaction, so the command can be interrupted and re-run.
    pub async fn reencrypt_totp_secrets(&self) -> ServiceResult<TotpReencryptSummary> {
        reencrypt_totp_secrets(&self.db, self.keys()?).await
    }
}

async fn reencrypt_totp_secrets(db: &Db, keys: &KeyRing) -> ServiceResult<TotpReencryptSummary> {
    let active = keys.active_kid().to_string();
    let ids = store::mfa::totp_sealed_with_other_key(db, &active).await?;
    let mut summary = TotpReencryptSummary {
        candidates: ids.len(),
        reencrypted: 0,
        already_current: 0,
        failed: Vec::new(),
    };
    for uid in ids {
        let mut tx = db.begin().await?;
        let Some(row) = store::mfa::totp_for_update(&mut tx, uid).await? else {
            summary.already_current += 1;
            continue;
        };
        if row.secret_key_id == active {
            summary.already_current += 1;
            continue;
        }
        let aad = totp_aad(uid);
        let resealed = keys
            .open(&row.secret_key_id, &aad, &row.secret_ciphertext)
            .and_then(|plain| keys.seal(&aad, &plain));
        let (outcome, action, details) = match resealed {
            Ok(ct) => {
                store::mfa::reseal_totp(&mut tx, uid, &ct, &active).await?;
                summary.reencrypted += 1;
                (
                    Outcome::Success,
                    "mfa.totp.reencrypted",
                    json!({ "from_key_id": row.secret_key_id, "to_key_id": active }),
                )
            }
            Err(e) => {
                summary.failed.push(TotpReencryptFailure {
                    user_id: uid,
                    error: e.to_string(),
                });
                (
                    Outcome::Failure,
                    "mfa.totp.decrypt_failed",
                    json!({ "key_id": row.secret_key_id, "during": "reencrypt" }),
                )
            }
        };
        tx.audit(
            &AuditEntry::new(action, outcome)
                .actor("system", "reencrypt-credentials")
                .target("user", uid)
                .details(details),
        )
        .await?;
        tx.commit().await?;
    }
    Ok(summary)
}
