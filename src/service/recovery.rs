//! Email verification, password reset and email change (DESIGN.md section 8), after
//! Ory Kratos's verification and recovery flows: single-use links whose 256-bit
//! token is stored only as a SHA-256 hash, sent through the notification outbox in
//! the transaction that issues them; and the `require_verified` gate the step-up
//! operations call.
//!
//! Where this differs from Kratos, and why:
//! - A reset request answers 202 before it looks the address up: the lookup and the
//!   writes run in a background task, so the answer (body and timing) is the same
//!   whether or not the address belongs to a user. Kratos answers synchronously and
//!   mails unknown addresses a "no account" notice; the alert service's template
//!   list has no such message, so unknown addresses get nothing.
//! - A reset ends every session and does not lift a login lockout: the lockout also
//!   counts wrong second factors, and a reset must never buy an attacker who holds
//!   the mailbox more guesses at the second factor. Factors are left alone, so the
//!   next login still asks for one.
//! - As in Kratos, a completed reset also verifies the address it was sent to.

use std::time::Duration;

use chrono::Utc;
use rand::RngCore;
use serde_json::json;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::audit::{AuditEntry, Outcome};
use super::lockout::Checked;
use super::notify::{notify, notify_to};
use super::sessions::sha256;
use super::users::Users;
use super::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::config::Settings;
use crate::domain::email::Email;
use crate::domain::password::Password;
use crate::domain::recovery::{is_link_token, Template, TokenPurpose, SIGN_IN_MEMORY};
use crate::domain::session::RevocationReason;
use crate::domain::user::UserStatus;
use crate::store::{recovery as store, sessions, users, Db, Tx};

const HOUR: Duration = Duration::from_secs(3600);

/// 403 `email_unverified` for a user whose address is not verified, when
/// REQUIRE_VERIFIED_EMAIL is on. The step-up operations (DESIGN.md section 8) call
/// it before they change anything.
pub async fn require_verified(db: &Db, required: bool, caller: &Caller) -> ServiceResult<()> {
    let Some(user_id) = caller.user_id().filter(|_| required) else {
        return Ok(());
    };
    match store::email_verified(db, user_id).await? {
        Some(true) => Ok(()),
        Some(false) => Err(ServiceError::EmailUnverified),
        None => Err(ServiceError::InvalidToken),
    }
}

/// `require_verified` for services that hold no settings (accounts, API keys).
#[derive(Clone)]
pub struct EmailGate {
    db: Option<Db>,
    required: bool,
}

impl EmailGate {
    pub fn new(db: Db, settings: &Settings) -> Self {
        Self {
            db: Some(db),
            required: settings.require_verified_email(),
        }
    }

    /// No check (a service built outside the app, in unit tests).
    pub fn off() -> Self {
        Self {
            db: None,
            required: false,
        }
    }

    pub async fn require_verified(&self, caller: &Caller) -> ServiceResult<()> {
        match &self.db {
            Some(db) => require_verified(db, self.required, caller).await,
            None => Ok(()),
        }
    }
}

/// A new link token: 256 random bits, base64url; the hash is what is stored.
fn new_link_token() -> (String, [u8; 32]) {
    use base64::Engine as _;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let hash = sha256(&token);
    (token, hash)
}

/// Stores a token for `purpose` and queues its message to `email`, both in `tx`.
async fn issue_link(
    tx: &mut Tx,
    settings: &Settings,
    user_id: Uuid,
    email: &str,
    purpose: TokenPurpose,
) -> ServiceResult<()> {
    let (token, hash) = new_link_token();
    let (ttl, template, page) = match purpose {
        TokenPurpose::ResetPassword => (
            settings.password_reset_ttl_seconds,
            Template::PasswordReset,
            "reset-password",
        ),
        TokenPurpose::VerifyEmail | TokenPurpose::ChangeEmail => (
            settings.email_verification_ttl_seconds,
            Template::EmailVerification,
            "verify-email",
        ),
    };
    let expires_at = Utc::now() + chrono::Duration::seconds(ttl as i64);
    store::insert_token(tx, user_id, purpose.as_str(), &hash, email, expires_at).await?;
    let link = format!("{}/{page}?token={token}", settings.public_app_url());
    let data = json!({ "link": link, "token": token, "expires_at": expires_at });
    notify_to(tx, template, email, Some(user_id), data).await
}

fn bad_token() -> ServiceError {
    ServiceError::validation(
        "token",
        "invalid",
        "the link is invalid, expired or already used",
    )
}

fn require_admin(caller: &Caller) -> ServiceResult<()> {
    if caller.has_role(crate::domain::user::Role::Admin) && caller.key_allows_scope("admin:users") {
        Ok(())
    } else {
        Err(ServiceError::Forbidden("the admin role is required".into()))
    }
}

/// Sign-up's verification message, in the transaction that creates the user.
pub(crate) async fn on_registered(
    tx: &mut Tx,
    settings: &Settings,
    user_id: Uuid,
    email: &str,
) -> ServiceResult<()> {
    issue_link(tx, settings, user_id, email, TokenPurpose::VerifyEmail).await
}

/// A completed sign-in, in the transaction that creates its session: records the
/// client address and queues `new_sign_in` when it was not seen for this user in
/// 30 days.
pub(crate) async fn on_sign_in(
    tx: &mut Tx,
    user_id: Uuid,
    email: &str,
    meta: &RequestMeta,
) -> ServiceResult<()> {
    let Some(ip) = meta.ip else {
        return Ok(());
    };
    let ip = ip.to_string();
    if store::record_sign_in_ip(tx, user_id, &ip, SIGN_IN_MEMORY.as_secs() as i64).await? {
        let data = json!({ "ip": ip, "user_agent": meta.user_agent });
        notify_to(tx, Template::NewSignIn, email, Some(user_id), data).await?;
    }
    Ok(())
}

impl Users {
    /// `POST /v1/auth/verify-email`: confirms an address, the user's own or the new
    /// one of an email change (which then applies, and the old address is told).
    #[tracing::instrument(skip_all)]
    pub async fn verify_email(&self, meta: &RequestMeta, token: &str) -> ServiceResult<()> {
        if !is_link_token(token) {
            return Err(bad_token());
        }
        let purposes = [
            TokenPurpose::VerifyEmail.as_str(),
            TokenPurpose::ChangeEmail.as_str(),
        ];
        let mut tx = self.db.begin().await?;
        let Some(t) = store::consume_token(&mut tx, &sha256(token), &purposes).await? else {
            drop(tx);
            super::audit::write_alone(
                &self.db,
                AuditEntry::new("user.email.verify_failed", Outcome::Failure)
                    .meta(meta)
                    .detail("reason", "invalid_token"),
            )
            .await;
            return Err(bad_token());
        };
        let entry = match TokenPurpose::parse(&t.purpose) {
            Some(TokenPurpose::ChangeEmail) => {
                let old = store::change_email(&mut tx, t.user_id, &t.email)
                    .await?
                    .ok_or_else(bad_token)?;
                // Links sent to the old address (or for an older change) die with it.
                store::revoke_tokens(
                    &mut tx,
                    t.user_id,
                    &["verify_email", "change_email", "reset_password"],
                )
                .await?;
                notify_to(
                    &mut tx,
                    Template::EmailChanged,
                    &old,
                    Some(t.user_id),
                    json!({ "new_email": t.email }),
                )
                .await?;
                AuditEntry::new("user.email.changed", Outcome::Success)
                    .details(json!({ "old_email": old, "new_email": t.email }))
            }
            _ => {
                // A link for an address the user has since left proves nothing.
                if !store::set_email_verified(&mut tx, t.user_id, &t.email).await? {
                    return Err(bad_token());
                }
                AuditEntry::new("user.email.verified", Outcome::Success)
            }
        };
        tx.audit(
            &entry
                .actor("user", t.user_id)
                .target("user", t.user_id)
                .meta(meta),
        )
        .await?;
        tx.commit().await?;
        // The address travels in cached users and verified API keys.
        self.invalidation.user_changed(t.user_id).await;
        Ok(())
    }

    /// `POST /v1/users/me/email/verification`: a new link to the caller's address;
    /// nothing is sent when it is already verified.
    #[tracing::instrument(skip_all)]
    pub async fn resend_verification(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
    ) -> ServiceResult<()> {
        let user_id = caller.session_user()?.0;
        let record = users::get(&self.db, user_id)
            .await?
            .ok_or(ServiceError::InvalidToken)?;
        let max = self.settings.password_reset_email_max_per_hour;
        self.throttle
            .check(&mail_key(&record.email), max, HOUR)
            .await?;
        if record.email_verified {
            return Ok(());
        }
        let mut tx = self.db.begin().await?;
        issue_link(
            &mut tx,
            &self.settings,
            user_id,
            &record.email,
            TokenPurpose::VerifyEmail,
        )
        .await?;
        tx.audit(
            &AuditEntry::new("user.email.verification_sent", Outcome::Success)
                .by(caller)
                .target("user", user_id)
                .meta(meta),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// `POST /v1/auth/password-reset`: 202 whatever the address. Only the throttles
    /// (per client IP, per address: both blind to whether it is known) run before
    /// the answer; the lookup, the token and its message are written by a task on
    /// `tasks`, so neither the body nor the timing tells who has an account.
    #[tracing::instrument(skip_all)]
    pub async fn request_password_reset(
        &self,
        meta: &RequestMeta,
        email: &str,
        tasks: &TaskTracker,
    ) -> ServiceResult<()> {
        let email =
            Email::parse(email).map_err(|m| ServiceError::validation("email", "invalid", m))?;
        if let Some(ip) = meta.ip {
            let max = self.settings.password_reset_ip_max_per_hour;
            self.throttle
                .check(&format!("pwreset:ip:{ip}"), max, HOUR)
                .await?;
        }
        let max = self.settings.password_reset_email_max_per_hour;
        self.throttle
            .check(&mail_key(email.as_str()), max, HOUR)
            .await?;
        let (db, settings, meta) = (self.db.clone(), self.settings.clone(), meta.clone());
        tasks.spawn(async move {
            if let Err(e) = issue_reset(&db, &settings, &meta, &email).await {
                tracing::error!(error = %e, "password reset request not processed");
            }
        });
        Ok(())
    }

    /// `POST /v1/auth/password-reset/confirm`: the new password (under the password
    /// policy) replaces the old, the token dies with every other reset link, and
    /// every session of the user ends.
    #[tracing::instrument(skip_all)]
    pub async fn confirm_password_reset(
        &self,
        meta: &RequestMeta,
        token: &str,
        new_password: String,
    ) -> ServiceResult<()> {
        if !is_link_token(token) {
            return Err(bad_token());
        }
        let hash = sha256(token);
        let reset = [TokenPurpose::ResetPassword.as_str()];
        // Looked at first and consumed only with the change: a password the policy
        // refuses leaves the link usable for a better one.
        let live = store::live_token(&self.db, &hash, &reset)
            .await?
            .ok_or_else(bad_token)?;
        let record = users::get(&self.db, live.user_id)
            .await?
            .ok_or_else(bad_token)?;
        let email =
            Email::parse(&record.email).map_err(|m| ServiceError::internal(anyhow::anyhow!(m)))?;
        let new = self.parse_new_password(new_password, &email, &record.full_name)?;
        let new_hash = self
            .hasher
            .hash(new.into_secret())
            .await
            .map_err(ServiceError::hashing)?;

        let mut tx = self.db.begin().await?;
        let used = store::consume_token(&mut tx, &hash, &reset)
            .await?
            .ok_or_else(bad_token)?;
        users::lock(&mut tx, used.user_id).await?;
        users::set_password_hash(&mut tx, used.user_id, &new_hash).await?;
        let ended = sessions::revoke_all_for_user(
            &mut tx,
            used.user_id,
            None,
            RevocationReason::PasswordReset,
        )
        .await?;
        store::revoke_tokens(&mut tx, used.user_id, &reset).await?;
        // The link reached its address: that proves the address (as Kratos does).
        let verified = store::set_email_verified(&mut tx, used.user_id, &used.email).await?;
        notify(&mut tx, Template::PasswordChanged, used.user_id, json!({})).await?;
        tx.audit(
            &AuditEntry::new("user.password.reset", Outcome::Success)
                .actor("user", used.user_id)
                .target("user", used.user_id)
                .meta(meta)
                .details(json!({ "sessions_ended": ended.len(), "email_verified": verified })),
        )
        .await?;
        tx.commit().await?;
        self.sessions
            .ended(&ended, RevocationReason::PasswordReset)
            .await;
        self.invalidation.user_changed(used.user_id).await;
        Ok(())
    }

    /// `POST /v1/admin/users/{id}/password-reset`: sends the user a reset link. The
    /// current password keeps working until the link is used.
    #[tracing::instrument(skip_all)]
    pub async fn admin_password_reset(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        user_id: Uuid,
    ) -> ServiceResult<()> {
        require_admin(caller)?;
        let mut tx = self.db.begin().await?;
        let record = users::lock(&mut tx, user_id)
            .await?
            .ok_or(ServiceError::NotFound("user"))?;
        issue_link(
            &mut tx,
            &self.settings,
            user_id,
            &record.email,
            TokenPurpose::ResetPassword,
        )
        .await?;
        tx.audit(
            &AuditEntry::new("user.password_reset.issued", Outcome::Success)
                .by(caller)
                .target("user", user_id)
                .meta(meta),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// `POST /v1/users/me/email`: after the current password, a link to the new
    /// address; the change applies when it is confirmed (`verify_email`).
    #[tracing::instrument(skip_all)]
    pub async fn request_email_change(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        new_email: &str,
        current_password: String,
    ) -> ServiceResult<()> {
        let user_id = caller.session_user()?.0;
        require_verified(&self.db, self.settings.require_verified_email(), caller).await?;
        self.step_up
            .require_step_up(caller, meta, "user.email.change")
            .await?;
        let new = Email::parse(new_email)
            .map_err(|m| ServiceError::validation("new_email", "invalid", m))?;
        let current = Password::candidate(current_password)
            .map_err(|e| ServiceError::validation("current_password", e.code, e.message))?;
        let record = users::get(&self.db, user_id)
            .await?
            .ok_or(ServiceError::InvalidToken)?;
        if new.as_str().eq_ignore_ascii_case(&record.email) {
            return Err(ServiceError::validation(
                "new_email",
                "unchanged",
                "new_email is the current address",
            ));
        }
        // Nobody gets to flood an address with links.
        let max = self.settings.password_reset_email_max_per_hour;
        self.throttle
            .check(&mail_key(new.as_str()), max, HOUR)
            .await?;
        // Counts against the login lockout, as a password change does.
        let failed = AuditEntry::new("user.email.change_failed", Outcome::Failure)
            .by(caller)
            .target("user", user_id)
            .meta(meta)
            .detail("reason", "wrong_password");
        let checked = self
            .lockout
            .check_password(
                meta,
                user_id,
                record.password_hash.clone(),
                current.into_secret(),
                failed,
                true,
            )
            .await?;
        if checked != Checked::Right {
            return Err(ServiceError::validation(
                "current_password",
                "incorrect",
                "current password is incorrect",
            ));
        }
        if store::email_taken(&self.db, new.as_str(), user_id).await? {
            return Err(ServiceError::Taken {
                field: "new_email",
                message: "email is already registered".into(),
            });
        }
        let mut tx = self.db.begin().await?;
        issue_link(
            &mut tx,
            &self.settings,
            user_id,
            new.as_str(),
            TokenPurpose::ChangeEmail,
        )
        .await?;
        tx.audit(
            &AuditEntry::new("user.email.change_requested", Outcome::Success)
                .by(caller)
                .target("user", user_id)
                .meta(meta)
                .detail("new_email", new.as_str()),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The throttle key of messages to one address, whoever asks and whether or not
/// the address is a user's.
fn mail_key(email: &str) -> String {
    format!("mail:{}", email.to_lowercase())
}

/// The background half of a reset request: the link and its message for an
/// active user, and the audit row either way.
async fn issue_reset(
    db: &Db,
    settings: &Settings,
    meta: &RequestMeta,
    email: &Email,
) -> ServiceResult<()> {
    let record = users::by_email(db, email.as_str()).await?;
    let mut tx = db.begin().await?;
    let entry = AuditEntry::new("user.password_reset.requested", Outcome::Success).meta(meta);
    let entry = match record {
        Some(r) if r.status == UserStatus::Active => {
            issue_link(
                &mut tx,
                settings,
                r.id,
                &r.email,
                TokenPurpose::ResetPassword,
            )
            .await?;
            entry.target("user", r.id)
        }
        Some(r) => AuditEntry {
            outcome: Outcome::Denied,
            ..entry.target("user", r.id).detail("reason", "user_disabled")
        },
        None => AuditEntry {
            outcome: Outcome::Failure,
            ..entry.detail("reason", "unknown_email")
        },
    };
    tx.audit(&entry).await?;
    tx.commit().await?;
    Ok(())
}
