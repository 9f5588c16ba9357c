//! Password login: enumeration-safe (every failure is the same answer after the
//! same argon2 work), throttled per client IP, under the per-account lockout;
//! a right password opens a session.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::audit::{AuditEntry, Outcome};
use super::lockout::{Checked, Lockout};
use super::mfa::MfaService;
use super::sessions::{LoginTokens, Sessions};
use super::throttle::Throttle;
use super::users::password_error;
use super::{RequestMeta, ServiceError, ServiceResult};
use crate::config::Settings;
use crate::crypto::password::PasswordHasher;
use crate::domain::email::Email;
use crate::domain::password::Password;
use crate::domain::user::UserStatus;
use crate::store::{users, Db};

/// What a password login answers: tokens, or (the user has a second factor) the
/// second step to take (issue 14).
pub enum LoginOutcome {
    Tokens(LoginTokens),
    MfaRequired(super::mfa_login::SecondStep),
}

pub struct Login {
    db: Db,
    /// For the argon2 work a refusal does without a password to check.
    hasher: PasswordHasher,
    throttle: Arc<Throttle>,
    lockout: Arc<Lockout>,
    sessions: Arc<Sessions>,
    /// Second factors: a user holding one gets the second step, not tokens.
    mfa: MfaService,
    /// LOGIN_IP_MAX_PER_MINUTE.
    ip_max_per_minute: u32,
}

impl Login {
    pub fn new(
        settings: &Settings,
        db: Db,
        hasher: PasswordHasher,
        throttle: Arc<Throttle>,
        lockout: Arc<Lockout>,
        sessions: Arc<Sessions>,
        mfa: MfaService,
    ) -> Self {
        Self {
            db,
            hasher,
            throttle,
            lockout,
            sessions,
            mfa,
            ip_max_per_minute: settings.login_ip_max_per_minute,
        }
    }

    /// Login. Every failure — unknown email, wrong password, disabled or locked
    /// account — is the same `InvalidCredentials` after the same argon2 work.
    #[tracing::instrument(skip_all)]
    pub async fn login(
        &self,
        meta: &RequestMeta,
        email: &str,
        password: String,
    ) -> ServiceResult<LoginOutcome> {
        let password = Password::candidate(password)
            .map_err(password_error)?
            .into_secret();
        self.throttle
            .per_ip(
                meta,
                "login",
                self.ip_max_per_minute,
                Duration::from_secs(60),
            )
            .await?;
        let Ok(email) = Email::parse(email) else {
            let _ = self.hasher.verify(password, None).await;
            return Err(ServiceError::InvalidCredentials);
        };
        // The user and their second factors in one round trip: in a single-host
        // deployment every round trip is CPU the hashes do not get.
        let found = users::by_email_with_factors(&self.db, email.as_str()).await?;
        let failed = |reason: &str, user: Option<Uuid>| {
            let e = AuditEntry::new("auth.login.failed", Outcome::Failure)
                .meta(meta)
                .details(serde_json::json!({ "reason": reason }));
            match user {
                Some(id) => e.target("user", id),
                None => e,
            }
        };
        let refuse = |result: &'static str| {
            metrics::counter!("logins_total", "result" => result).increment(1);
            Err(ServiceError::InvalidCredentials)
        };
        let Some((record, factors)) = found else {
            let _ = self.hasher.verify(password, None).await;
            super::audit::write_alone(&self.db, failed("unknown_user", None)).await;
            return refuse("failed");
        };
        // A user with a second factor: a right password does not end the login,
        // so it clears no failure count (issue 14).
        let checked = self
            .lockout
            .check_password(
                meta,
                record.id,
                record.password_hash.clone(),
                password.clone(),
                failed("wrong_password", Some(record.id)),
                !factors.any(),
            )
            .await?;
        match checked {
            Checked::Locked => {
                super::audit::write_alone(&self.db, failed("locked", Some(record.id))).await;
                return refuse("locked");
            }
            Checked::Wrong => return refuse("failed"),
            Checked::Right if record.status != UserStatus::Active => {
                super::audit::write_alone(&self.db, failed("disabled", Some(record.id))).await;
                return refuse("failed");
            }
            Checked::Right => {}
        }
        // An imported user's legacy hash becomes a current argon2id one.
        super::import_users::upgrade_password_hash(
            &self.hasher,
            &self.db,
            meta,
            record.id,
            record.password_hash.as_deref(),
            password,
        )
        .await;
        if factors.any() {
            metrics::counter!("logins_total", "result" => "mfa_required").increment(1);
            let challenge = self
                .mfa
                .begin_second_step(meta, record.id, &factors)
                .await?;
            return Ok(LoginOutcome::MfaRequired(challenge));
        }
        metrics::counter!("logins_total", "result" => "succeeded").increment(1);
        let user = record.into_user();
        let audit =
            AuditEntry::new("auth.login.succeeded", Outcome::Success).actor("user", user.id);
        let amr = [crate::domain::mfa::amr::PWD.to_string()];
        Ok(LoginOutcome::Tokens(
            self.sessions.open(meta, user, &amr, audit).await?,
        ))
    }
}
