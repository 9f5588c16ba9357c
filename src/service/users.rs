//! Users: sign-up and operator-created users, profiles, password change and
//! user administration.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use uuid::Uuid;

use super::audit::{AuditEntry, Outcome};
use super::invalidation::{Change, Invalidation};
use super::lockout::{Checked, Lockout};
use super::mfa::StepUp;
use super::paging::{self, Page, PageQuery};
use super::sessions::Sessions;
use super::throttle::Throttle;
use super::{Caller, FieldError, RequestMeta, ServiceError, ServiceResult};
use crate::config::Settings;
use crate::crypto::password::PasswordHasher;
use crate::domain::email::Email;
use crate::domain::password::Password;
use crate::domain::session::RevocationReason;
use crate::domain::user::{Role, User, UserStatus};
use crate::store::{sessions, users, Db};

pub struct UserFilter {
    pub email: Option<String>,
    pub status: Option<String>,
    pub page: PageQuery,
}

pub struct UserChange {
    pub status: Option<String>,
    pub roles: Option<Vec<String>>,
}

pub(crate) fn password_error(e: crate::domain::password::PasswordError) -> ServiceError {
    ServiceError::Validation(vec![FieldError::new("password", e.code, e.message)])
}

fn full_name_of(raw: &str) -> ServiceResult<String> {
    let s = raw.trim();
    let n = s.chars().count();
    if n == 0 || n > 200 {
        return Err(ServiceError::validation(
            "full_name",
            "invalid_length",
            "full_name must be 1 to 200 characters",
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(ServiceError::validation(
            "full_name",
            "invalid",
            "full_name must not contain control characters",
        ));
    }
    Ok(s.to_string())
}

/// Who creates a user: the user signing up, or an operator at the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CreatedBy {
    SignUp,
    Operator,
}

pub struct RegisterInput {
    pub email: String,
    pub password: String,
    pub full_name: String,
}

/// The scope an API key needs to edit its owner's profile (migration
/// 2026120100030102); a login session needs none.
pub const PROFILE_WRITE: &str = "profile:write";

/// Requested role names as roles, sorted and each once; or the first unknown
/// name (in that order).
fn parse_roles(mut names: Vec<String>) -> Result<Vec<Role>, String> {
    names.sort();
    names.dedup();
    names
        .iter()
        .map(|n| Role::parse(n).ok_or_else(|| n.clone()))
        .collect()
}

fn parse_status(s: &str) -> Result<UserStatus, FieldError> {
    UserStatus::parse(s)
        .ok_or_else(|| FieldError::new("status", "invalid", "status must be active or disabled"))
}

pub(super) fn require_admin(caller: &Caller) -> ServiceResult<()> {
    if caller.has_role(Role::Admin) && caller.key_allows_scope("admin:users") {
        Ok(())
    } else {
        Err(ServiceError::Forbidden("the admin role is required".into()))
    }
}

pub struct Users {
    pub(super) db: Db,
    pub(super) hasher: PasswordHasher,
    pub(super) sessions: Arc<Sessions>,
    /// The current-password check of a password change counts against the
    /// same lockout as login.
    pub(super) lockout: Arc<Lockout>,
    pub(super) throttle: Arc<Throttle>,
    /// Tells every replica's caches (API keys, policies …) that a user changed.
    pub(super) invalidation: Invalidation,
    /// The step-up rule (issue 14) for the use cases here that need it.
    pub(super) step_up: StepUp,
    /// Recovery (issue 15): REQUIRE_VERIFIED_EMAIL, link lifetimes, mail limits.
    pub(super) settings: Settings,
    /// PASSWORD_MIN_LENGTH, REGISTRATION_ENABLED, REGISTER_IP_MAX_PER_HOUR.
    password_min_length: usize,
    registration_enabled: bool,
    register_ip_max_per_hour: u32,
}

impl Users {
    pub fn new(
        settings: &Settings,
        db: Db,
        hasher: PasswordHasher,
        sessions: Arc<Sessions>,
        lockout: Arc<Lockout>,
        throttle: Arc<Throttle>,
        invalidation: Invalidation,
    ) -> Self {
        Self {
            step_up: StepUp::new(db.clone(), settings),
            db,
            hasher,
            sessions,
            lockout,
            throttle,
            invalidation,
            settings: settings.clone(),
            password_min_length: settings.password_min_length,
            registration_enabled: settings.registration_enabled(),
            register_ip_max_per_hour: settings.register_ip_max_per_hour,
        }
    }

    pub(super) fn parse_new_password(
        &self,
        raw: String,
        email: &Email,
        full_name: &str,
    ) -> ServiceResult<Password> {
        let inputs: Vec<&str> = full_name.split_whitespace().collect();
        Password::new_for(raw, self.password_min_length, email, &inputs).map_err(password_error)
    }

    /// Self sign-up: a new active user with role `user`.
    #[tracing::instrument(skip_all)]
    pub async fn register(&self, meta: &RequestMeta, input: RegisterInput) -> ServiceResult<User> {
        if !self.registration_enabled {
            return Err(ServiceError::Forbidden("self sign-up is disabled".into()));
        }
        let per_hour = self.register_ip_max_per_hour;
        self.throttle
            .per_ip(meta, "register", per_hour, Duration::from_secs(3600))
            .await?;
        let mut errors = Vec::new();
        let email = Email::parse(&input.email)
            .map_err(|m| errors.push(FieldError::new("email", "invalid", m)))
            .ok();
        let name = full_name_of(&input.full_name)
            .map_err(|e| {
                if let ServiceError::Validation(v) = e {
                    errors.extend(v)
                }
            })
            .ok();
        let password = match &email {
            Some(email) => self
                .parse_new_password(input.password, email, name.as_deref().unwrap_or(""))
                .map_err(|e| {
                    if let ServiceError::Validation(v) = e {
                        errors.extend(v)
                    }
                })
                .ok(),
            None => None,
        };
        let (Some(email), Some(name), Some(password)) = (email, name, password) else {
            return Err(ServiceError::Validation(errors));
        };
        self.create(
            meta,
            CreatedBy::SignUp,
            &email,
            &name,
            password.into_secret(),
            &[Role::User],
        )
        .await
    }

    /// `admin create-user`: an operator creates a user (the first admin) under the
    /// same email and password rules as sign-up.
    #[tracing::instrument(skip_all)]
    pub async fn create_by_operator(
        &self,
        email: &str,
        full_name: &str,
        password: String,
        roles: &[String],
    ) -> ServiceResult<User> {
        let email =
            Email::parse(email).map_err(|m| ServiceError::validation("email", "invalid", m))?;
        let name = full_name_of(full_name)?;
        let password = self.parse_new_password(password, &email, &name)?;
        let roles = if roles.is_empty() {
            vec![Role::User]
        } else {
            parse_roles(roles.to_vec()).map_err(|bad| {
                ServiceError::validation("role", "unknown_role", format!("unknown role {bad}"))
            })?
        };
        self.create(
            &RequestMeta::default(),
            CreatedBy::Operator,
            &email,
            &name,
            password.into_secret(),
            &roles,
        )
        .await
    }

    /// Creates a user (sign-up or operator) with its audit row in one transaction.
    async fn create(
        &self,
        meta: &RequestMeta,
        by: CreatedBy,
        email: &Email,
        name: &str,
        password: SecretString,
        roles: &[Role],
    ) -> ServiceResult<User> {
        let hash = self
            .hasher
            .hash(password)
            .await
            .map_err(ServiceError::hashing)?;
        let id = Uuid::now_v7();
        let mut tx = self.db.begin().await?;
        let user = users::insert(&mut tx, id, email.as_str(), name, &hash, roles)
            .await?
            .into_user();
        // Hook (issue 15): sign-up sends the `email_verification` link.
        if by == CreatedBy::SignUp {
            super::recovery::on_registered(&mut tx, &self.settings, id, email.as_str()).await?;
        }
        let action = match by {
            CreatedBy::SignUp => "auth.register",
            CreatedBy::Operator => "user.created",
        };
        let entry = AuditEntry::new(action, Outcome::Success)
            .target("user", id)
            .meta(meta)
            .details(serde_json::json!({ "roles": roles }));
        let entry = match by {
            CreatedBy::SignUp => entry.actor("user", id),
            CreatedBy::Operator => entry.actor("system", "cli"),
        };
        tx.audit(&entry).await?;
        tx.commit().await?;
        Ok(user)
    }

    /// The caller's own profile.
    /// Shared with the profile cache: a hit copies nothing.
    pub async fn me(&self, caller: &Caller) -> ServiceResult<Arc<User>> {
        let id = caller.user_id().ok_or(ServiceError::InvalidToken)?;
        self.sessions
            .user(id)
            .await?
            .ok_or(ServiceError::InvalidToken)
    }

    /// A user by id, for service clients holding `users:read`.
    pub async fn get_user(&self, caller: &Caller, id: Uuid) -> ServiceResult<User> {
        caller.require_service_scope("users:read")?;
        users::get(&self.db, id)
            .await?
            .map(|u| u.into_user())
            .ok_or(ServiceError::NotFound("user"))
    }

    /// PATCH /v1/users/me: the full name.
    pub async fn update_me(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        full_name: Option<String>,
    ) -> ServiceResult<User> {
        let id = caller.user_id().ok_or(ServiceError::InvalidToken)?;
        // A session may edit its own profile; an API key only with the scope.
        if !caller.key_allows_scope(PROFILE_WRITE) {
            return Err(ServiceError::Forbidden(format!(
                "this API key lacks the {PROFILE_WRITE} scope"
            )));
        }
        let Some(raw) = full_name else {
            return Ok(User::clone(&*self.me(caller).await?));
        };
        let name = full_name_of(&raw)?;
        let mut tx = self.db.begin().await?;
        users::set_full_name(&mut tx, id, &name).await?;
        tx.audit(
            &AuditEntry::new("user.profile.updated", Outcome::Success)
                .by(caller)
                .target("user", id)
                .meta(meta)
                .details(serde_json::json!({ "fields": ["full_name"] })),
        )
        .await?;
        let user = users::by_id(&mut tx, id)
            .await?
            .ok_or(ServiceError::InvalidToken)?
            .into_user();
        tx.commit().await?;
        // A new name: copies refresh, nothing the user may do changed, so the
        // user's cached API keys stay.
        self.invalidation.publish(Change::Profile(id)).await;
        Ok(user)
    }

    /// Changes the caller's password after checking the current one; every other
    /// session ends at once (the current one stays).
    #[tracing::instrument(skip_all)]
    pub async fn change_password(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        current_password: String,
        new_password: String,
    ) -> ServiceResult<()> {
        let (user_id, current_session) = caller.session_user()?;
        // A step-up operation, refused until the email is verified.
        super::recovery::require_verified(&self.db, self.settings.require_verified_email(), caller)
            .await?;
        self.step_up
            .require_step_up(caller, meta, "user.password.change")
            .await?;
        let current = Password::candidate(current_password)
            .map_err(|e| ServiceError::validation("current_password", e.code, e.message))?;
        let record = users::get(&self.db, user_id)
            .await?
            .ok_or(ServiceError::InvalidToken)?;
        let email =
            Email::parse(&record.email).map_err(|m| ServiceError::internal(anyhow::anyhow!(m)))?;
        let new = self.parse_new_password(new_password, &email, &record.full_name)?;
        // The current-password check counts against the same lockout as login, so
        // a stolen token cannot be used to guess the password.
        let failed = AuditEntry::new("user.password.change_failed", Outcome::Failure)
            .by(caller)
            .target("user", user_id)
            .meta(meta)
            .details(serde_json::json!({ "reason": "wrong_password" }));
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
        let hash = self
            .hasher
            .hash(new.into_secret())
            .await
            .map_err(ServiceError::hashing)?;
        let mut tx = self.db.begin().await?;
        users::lock(&mut tx, user_id).await?;
        users::set_password_hash(&mut tx, user_id, &hash).await?;
        let ended = sessions::revoke_all_for_user(
            &mut tx,
            user_id,
            current_session,
            RevocationReason::PasswordChanged,
        )
        .await?;
        // Hook (issue 15): the `password_changed` notice, in this transaction.
        super::notify::notify(
            &mut tx,
            crate::domain::recovery::Template::PasswordChanged,
            user_id,
            serde_json::json!({}),
        )
        .await?;
        tx.audit(
            &AuditEntry::new("user.password.changed", Outcome::Success)
                .by(caller)
                .target("user", user_id)
                .meta(meta)
                .details(serde_json::json!({ "sessions_ended": ended.len() })),
        )
        .await?;
        tx.commit().await?;
        self.sessions
            .ended(&ended, RevocationReason::PasswordChanged)
            .await;
        // The other sessions ended above; nothing cached about the user changed.
        Ok(())
    }

    /// Admin: users filtered by email substring and status, newest first.
    pub async fn admin_list_users(
        &self,
        caller: &Caller,
        f: UserFilter,
    ) -> ServiceResult<Page<User>> {
        require_admin(caller)?;
        let page = f.page.parse::<(DateTime<Utc>, Uuid)>()?;
        let status = f
            .status
            .as_deref()
            .map(parse_status)
            .transpose()
            .map_err(|e| ServiceError::Validation(vec![e]))?;
        let email = paging::text_filter("email", f.email.map(|e| e.trim().to_string()))?;
        let rows =
            users::list(&self.db, email.as_deref(), status, page.after, page.fetch()).await?;
        Ok(page
            .page(rows, |u| (u.created_at, u.id))
            .map(|r| r.into_user()))
    }

    /// Admin: change a user's status and/or roles. Disabling ends every session of
    /// the user at once and tells every replica's caches.
    pub async fn admin_update_user(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        change: UserChange,
    ) -> ServiceResult<User> {
        require_admin(caller)?;
        // Both fields are checked, and every failure reported.
        let mut errors = Vec::new();
        let status = change
            .status
            .as_deref()
            .map(parse_status)
            .transpose()
            .unwrap_or_else(|e| {
                errors.push(e);
                None
            });
        let roles = change
            .roles
            .map(parse_roles)
            .transpose()
            .unwrap_or_else(|bad| {
                let message = format!("unknown role {bad}");
                errors.push(FieldError::new("roles", "unknown_role", message));
                None
            });
        if !errors.is_empty() {
            return Err(ServiceError::Validation(errors));
        }
        if caller.user_id() == Some(id)
            && (status == Some(UserStatus::Disabled)
                || roles.as_ref().is_some_and(|r| !r.contains(&Role::Admin)))
        {
            return Err(ServiceError::Forbidden(
                "admins cannot disable themselves or drop their own admin role".into(),
            ));
        }

        let mut tx = self.db.begin().await?;
        let before = users::lock(&mut tx, id)
            .await?
            .ok_or(ServiceError::NotFound("user"))?;
        let mut details = serde_json::Map::new();
        if let Some(s) = status.filter(|s| *s != before.status) {
            users::set_status(&mut tx, id, s).await?;
            details.insert(
                "status".into(),
                serde_json::json!({ "from": before.status, "to": s }),
            );
        }
        if let Some(r) = roles.as_ref().filter(|r| **r != before.roles) {
            users::set_roles(&mut tx, id, r).await?;
            details.insert(
                "roles".into(),
                serde_json::json!({ "from": before.roles, "to": r }),
            );
        }
        let disabled =
            status == Some(UserStatus::Disabled) && before.status != UserStatus::Disabled;
        let ended = if disabled {
            sessions::revoke_all_for_user(&mut tx, id, None, RevocationReason::UserDisabled).await?
        } else {
            Vec::new()
        };
        if !details.is_empty() {
            details.insert("sessions_ended".into(), ended.len().into());
            tx.audit(
                &AuditEntry::new("user.updated", Outcome::Success)
                    .by(caller)
                    .target("user", id)
                    .meta(meta)
                    .details(serde_json::Value::Object(details.clone())),
            )
            .await?;
        }
        let user = users::by_id(&mut tx, id)
            .await?
            .ok_or(ServiceError::NotFound("user"))?
            .into_user();
        tx.commit().await?;

        self.sessions
            .ended(&ended, RevocationReason::UserDisabled)
            .await;
        if !details.is_empty() {
            // Roles live in the cached user record (sessions' states carry none)
            // and in API-key caches: one user change reaches both on every replica.
            self.invalidation.user_changed(id).await;
        }
        Ok(user)
    }
}
