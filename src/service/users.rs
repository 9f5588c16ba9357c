//! Profiles, own sessions, password change and user administration.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::audit::{AuditEntry, Outcome};
use super::auth::Checked;
use super::identity::{Identity, SessionState};
use super::paging::{self, Page, PageQuery};
use super::{Caller, FieldError, RequestMeta, ServiceError, ServiceResult};
use crate::domain::email::Email;
use crate::domain::password::Password;
use crate::domain::user::{User, ROLES};
use crate::store::{audit, sessions, users};

/// One of the caller's sessions.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// The session this request was made with.
    pub current: bool,
    /// How the session was authenticated (RFC 8176 values, issue 14).
    pub amr: Vec<String>,
    /// When the user last authenticated in this session (login or step-up).
    pub auth_time: DateTime<Utc>,
}

pub struct UserFilter {
    pub email: Option<String>,
    pub status: Option<String>,
    pub page: PageQuery,
}

pub struct UserChange {
    pub status: Option<String>,
    pub roles: Option<Vec<String>>,
}

/// A user acting through their own session (not an API key, not a service).
fn session_user(caller: &Caller) -> ServiceResult<(Uuid, Option<Uuid>)> {
    match caller {
        Caller::User {
            user_id,
            session_id,
            key: None,
            ..
        } => Ok((*user_id, *session_id)),
        Caller::User { key: Some(_), .. } => Err(ServiceError::Forbidden(
            "this needs a login session, not an API key".into(),
        )),
        Caller::ServiceClient { .. } => Err(ServiceError::Forbidden("users only".into())),
    }
}

/// The scope an API key needs to edit its owner's profile (migration
/// 2026120100030102); a login session needs none.
pub const PROFILE_WRITE: &str = "profile:write";

fn require_admin(caller: &Caller) -> ServiceResult<()> {
    if caller.has_role("admin") && caller.key_allows_scope("admin:users") {
        Ok(())
    } else {
        Err(ServiceError::Forbidden("the admin role is required".into()))
    }
}

impl Identity {
    /// The caller's own profile.
    /// Shared with the profile cache: a hit copies nothing.
    pub async fn me(&self, caller: &Caller) -> ServiceResult<Arc<User>> {
        let id = caller.user_id().ok_or(ServiceError::InvalidToken)?;
        self.cached_user(id)
            .await?
            .ok_or(ServiceError::InvalidToken)
    }

    /// A user by id, for service clients holding `users:read`.
    pub async fn get_user(&self, caller: &Caller, id: Uuid) -> ServiceResult<User> {
        if !matches!(caller, Caller::ServiceClient { .. }) || !caller.key_allows_scope("users:read")
        {
            return Err(ServiceError::Forbidden("scope users:read required".into()));
        }
        users::get(&self.db.pool, id)
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
        let name = Self::parse_full_name(&raw)?;
        let mut tx = self.db.begin().await?;
        users::set_full_name(&mut tx, id, &name).await?;
        audit::insert(
            &mut tx,
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
        self.invalidation
            .publish(super::invalidation::Change::Profile(id))
            .await;
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
        let (user_id, current_session) = session_user(caller)?;
        // A step-up operation, refused until the email is verified.
        super::recovery::require_verified(&self.db, self.settings.require_verified_email(), caller)
            .await?;
        self.step_up
            .require_step_up(caller, meta, "user.password.change")
            .await?;
        let current = Password::candidate(current_password)
            .map_err(|e| ServiceError::validation("current_password", e.code, e.message))?;
        let record = users::get(&self.db.pool, user_id)
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
            .check_password_guarded(
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
        let ended =
            sessions::revoke_all_for_user(&mut tx, user_id, current_session, "password_changed")
                .await?;
        // Hook (issue 15): the `password_changed` notice, in this transaction.
        super::notify::notify(
            &mut tx,
            crate::domain::recovery::Template::PasswordChanged,
            user_id,
            serde_json::json!({}),
        )
        .await?;
        audit::insert(
            &mut tx,
            &AuditEntry::new("user.password.changed", Outcome::Success)
                .by(caller)
                .target("user", user_id)
                .meta(meta)
                .details(serde_json::json!({ "sessions_ended": ended.len() })),
        )
        .await?;
        tx.commit().await?;
        for sid in ended {
            self.cache_session(
                sid,
                &SessionState::Revoked {
                    reason: "password_changed".into(),
                },
            )
            .await;
        }
        // The other sessions ended above; nothing cached about the user changed.
        Ok(())
    }

    /// The caller's live sessions, newest first.
    pub async fn list_sessions(&self, caller: &Caller) -> ServiceResult<Page<SessionView>> {
        let (user_id, current) = session_user(caller)?;
        let items = sessions::list_live(&self.db.pool, user_id)
            .await?
            .into_iter()
            .map(|s| SessionView {
                current: Some(s.id) == current,
                id: s.id,
                created_at: s.created_at,
                last_seen_at: s.last_seen_at,
                ip: s.ip,
                user_agent: s.user_agent,
                amr: s.amr,
                auth_time: s.auth_time,
            })
            .collect();
        Ok(Page::all(items))
    }

    /// Ends one of the caller's own sessions; another user's is "not found".
    pub async fn end_session(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        sid: Uuid,
    ) -> ServiceResult<()> {
        let (user_id, _) = session_user(caller)?;
        let mut tx = self.db.begin().await?;
        if !sessions::live_of_user_for_update(&mut tx, sid, user_id).await? {
            return Err(ServiceError::NotFound("session"));
        }
        sessions::revoke(&mut tx, sid, "ended").await?;
        audit::insert(
            &mut tx,
            &AuditEntry::new("session.ended", Outcome::Success)
                .by(caller)
                .target("session", sid)
                .meta(meta),
        )
        .await?;
        tx.commit().await?;
        self.cache_session(
            sid,
            &SessionState::Revoked {
                reason: "ended".into(),
            },
        )
        .await;
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
        if let Some(s) = f.status.as_deref() {
            if !["active", "disabled"].contains(&s) {
                return Err(ServiceError::validation(
                    "status",
                    "invalid",
                    "status must be active or disabled",
                ));
            }
        }

        let email = paging::text_filter("email", f.email.map(|e| e.trim().to_string()))?;
        let rows = users::list(
            &self.db.pool,
            email.as_deref(),
            f.status.as_deref(),
            page.after,
            page.fetch(),
        )
        .await?;
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
        let mut errors = Vec::new();
        if let Some(s) = change.status.as_deref() {
            if !["active", "disabled"].contains(&s) {
                errors.push(FieldError::new(
                    "status",
                    "invalid",
                    "status must be active or disabled",
                ));
            }
        }
        let roles = change.roles.map(|mut r| {
            r.sort();
            r.dedup();
            r
        });
        if let Some(r) = &roles {
            if let Some(bad) = r.iter().find(|r| !ROLES.contains(&r.as_str())) {
                errors.push(FieldError::new(
                    "roles",
                    "unknown_role",
                    format!("unknown role {bad}"),
                ));
            }
        }
        if !errors.is_empty() {
            return Err(ServiceError::Validation(errors));
        }
        if caller.user_id() == Some(id)
            && (change.status.as_deref() == Some("disabled")
                || roles
                    .as_ref()
                    .is_some_and(|r| !r.iter().any(|x| x == "admin")))
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
        if let Some(s) = change.status.as_deref().filter(|s| *s != before.status) {
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
        let disabled = change.status.as_deref() == Some("disabled") && before.status != "disabled";
        let ended = if disabled {
            sessions::revoke_all_for_user(&mut tx, id, None, "user_disabled").await?
        } else {
            Vec::new()
        };
        if !details.is_empty() {
            details.insert("sessions_ended".into(), ended.len().into());
            audit::insert(
                &mut tx,
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

        for sid in &ended {
            self.cache_session(
                *sid,
                &SessionState::Revoked {
                    reason: "user_disabled".into(),
                },
            )
            .await;
        }
        if !details.is_empty() {
            // Cached session roles and other replicas' API-key caches.
            self.forget_user_sessions(id).await?;
            self.invalidation.user_changed(id).await;
        }
        Ok(user)
    }
}
