//! The policy engine both transports use: a user's roles → role_policies →
//! policies, a service client's scopes; deny wins, default deny, and every answer
//! names the rule that decided.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::audit::{AuditEntry, Outcome};
use super::invalidation::{Change, Invalidation};
use super::swr::{Interned, SwrCache};
use super::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::domain::policy::{self, parse_action, Decision, Policy, Resource, Subject};
use crate::store::{self, Db};

/// Bounds staleness on a replica that missed an invalidation (Redis down); role
/// and status changes publish `Change::User`, which drops the entry everywhere.
const POLICY_CACHE_TTL: Duration = Duration::from_secs(30);

/// The audit target kind of a trading account.
const ACCOUNT: &str = "trading_account";

/// Why `user_scope` refused a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeRefusal {
    /// A service client: the use case is a user's.
    NotAUser,
    /// The caller's API key does not carry the scope.
    KeyScope,
    /// The user's roles' policies do not allow it; the rule that decided.
    Policy { decided_by: String },
}

impl ScopeRefusal {
    /// The `reason` an `authz.denied` row records.
    pub fn reason(&self) -> &'static str {
        match self {
            ScopeRefusal::NotAUser => "not_a_user",
            ScopeRefusal::KeyScope => "key_scope",
            ScopeRefusal::Policy { .. } => "policy",
        }
    }

    pub fn decided_by(&self) -> Option<&str> {
        match self {
            ScopeRefusal::Policy { decided_by } => Some(decided_by),
            ScopeRefusal::NotAUser | ScopeRefusal::KeyScope => None,
        }
    }
}

/// A user's policies; `None` for an unknown or disabled user.
type UserPolicies = Option<Arc<Vec<Policy>>>;

#[derive(Clone)]
pub struct PolicyEngine {
    db: Db,
    /// By user; a load that overlaps an invalidation is not cached.
    users: SwrCache<Uuid, UserPolicies>,
    /// By role names, sorted (an API key's owner: the roles come with the key's
    /// row, so no entry per user and no query per user).
    by_roles: SwrCache<Vec<String>, Arc<Vec<Policy>>>,
    /// The distinct policy lists seen: policies come from roles, so users with
    /// the same roles share one list instead of a copy each (~1 KB a user).
    shared: Arc<Interned<Vec<Policy>>>,
    /// Every `authz.denied` row goes through here (a few per actor per minute).
    pub(crate) denials: super::audit::DenialAudit,
}

impl PolicyEngine {
    pub fn new(db: Db, invalidation: &Invalidation) -> Self {
        // No stale serving: a grant is fresh or read again.
        let users: SwrCache<Uuid, UserPolicies> =
            SwrCache::new("policies", 100_000, POLICY_CACHE_TTL, Duration::ZERO)
                .counting("policy_cache_total");
        let by_roles: SwrCache<Vec<String>, Arc<Vec<Policy>>> =
            SwrCache::new("role_policies", 1024, POLICY_CACHE_TTL, Duration::ZERO);
        {
            let (users, by_roles) = (users.clone(), by_roles.clone());
            invalidation.on_change(move |change| match change {
                Change::User(id) => users.invalidate(&id),
                Change::Everything => {
                    users.invalidate_all();
                    by_roles.invalidate_all();
                }
                Change::ApiKey(_)
                | Change::Account(_)
                | Change::Session(_)
                | Change::Profile(_) => {}
            });
        }
        Self {
            db,
            users,
            by_roles,
            shared: Arc::new(Interned::new(256)),
            denials: Default::default(),
        }
    }

    async fn user_policies(&self, user_id: Uuid) -> ServiceResult<UserPolicies> {
        self.users
            .get_or_load(user_id, || async move {
                Ok(store::policies::for_user(&self.db, user_id)
                    .await?
                    .map(|ps| self.shared.share(ps)))
            })
            .await
    }

    /// The scopes a user's roles grant: allowed actions minus denied ones. Empty
    /// for an unknown or disabled user.
    pub async fn user_scopes(&self, user_id: Uuid) -> ServiceResult<Vec<String>> {
        Ok(self
            .user_policies(user_id)
            .await?
            .map(|ps| policy::granted_scopes(&ps))
            .unwrap_or_default())
    }

    /// The scopes the roles named `roles` (sorted, as a user's row lists them)
    /// grant: `user_scopes` for an active user holding exactly those roles.
    pub async fn scopes_for_roles(&self, roles: &[String]) -> ServiceResult<Vec<String>> {
        let policies = self
            .by_roles
            .get_or_load(roles.to_vec(), || async move {
                Ok(self
                    .shared
                    .share(store::policies::for_roles(&self.db, roles).await?))
            })
            .await?;
        Ok(policy::granted_scopes(&policies))
    }

    /// CheckPermission on wire strings: `subject` `user:<uuid>` | `client:<id>`,
    /// `action` a scope name, `resource` `<type>:<id>` | `*`. Malformed input is a
    /// validation error, not a silent deny, so callers notice their bug.
    pub async fn check_permission(
        &self,
        subject: &str,
        action: &str,
        resource: &str,
    ) -> ServiceResult<Decision> {
        let mut errors = Vec::new();
        let subject = Subject::parse(subject).map_err(|e| errors.push(e)).ok();
        let action = parse_action(action).map_err(|e| errors.push(e)).ok();
        let resource = Resource::parse(resource).map_err(|e| errors.push(e)).ok();
        match (subject, action, resource) {
            (Some(s), Some(a), Some(r)) => self.decide(&s, &a, &r).await,
            _ => Err(ServiceError::Validation(errors)),
        }
    }

    /// CheckPermission for a caller: only a service client holding
    /// `permissions:check` may ask about others; a refusal is audited.
    pub async fn check_permission_for(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        subject: &str,
        action: &str,
        resource: &str,
    ) -> ServiceResult<Decision> {
        self.require_client_scope(caller, meta, "permissions:check", None)
            .await?;
        self.check_permission(subject, action, resource).await
    }

    // ---- the one authorisation idiom ------------------------------------------
    //
    // Every use case decides who may call it here, not in a transport: a service
    // client by the scopes its token carries (`require_client_scope`), a user by
    // their key's scopes and their roles' policies (`user_scope`); a refusal is
    // written as an `authz.denied` row through `denials` (a few per actor per
    // minute) and answered 403 / PERMISSION_DENIED.

    /// The check of every service-client RPC: the caller is a service client
    /// holding `scope`. Any other caller is refused and the refusal audited,
    /// against `target` (a trading account) when there is one.
    pub async fn require_client_scope(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        scope: &'static str,
        target: Option<Uuid>,
    ) -> ServiceResult<()> {
        if matches!(caller, Caller::ServiceClient { scopes, .. } if scopes.iter().any(|s| s == scope))
        {
            return Ok(());
        }
        let mut entry = AuditEntry::new("authz.denied", Outcome::Denied)
            .by(caller)
            .meta(meta)
            .details(serde_json::json!({ "reason": "client_scope", "need": scope }));
        if let Some(id) = target {
            entry = entry.target(ACCOUNT, id);
        }
        // Boxed: the audit write's future would otherwise sit in every allowed
        // call's future too (VerifyApiKey's among them).
        Box::pin(self.record_denial(entry)).await?;
        Err(ServiceError::Forbidden(format!(
            "requires the {scope} scope"
        )))
    }

    /// Whether a user may use `scope` on `resource`: the caller is a user, their
    /// API key (if any) carries the scope, and their roles' policies allow it.
    /// `Ok(Err)` is a refusal for the caller to record (with its own words and
    /// target); `Err` only when the answer cannot be known.
    pub async fn user_scope(
        &self,
        caller: &Caller,
        scope: &str,
        resource: &Resource,
    ) -> ServiceResult<Result<Uuid, ScopeRefusal>> {
        let Some(user_id) = caller.user_id() else {
            return Ok(Err(ScopeRefusal::NotAUser));
        };
        if !caller.key_allows_scope(scope) {
            return Ok(Err(ScopeRefusal::KeyScope));
        }
        let decision = self.user_allows(user_id, scope, resource).await?;
        if !decision.allowed {
            return Ok(Err(ScopeRefusal::Policy {
                decided_by: decision.decided_by,
            }));
        }
        Ok(Ok(user_id))
    }

    /// Writes one refusal's `authz.denied` row in a transaction of its own, for
    /// refusals made before the use case opened one.
    pub async fn record_denial(&self, entry: AuditEntry) -> ServiceResult<()> {
        let mut tx = self.db.begin().await?;
        self.denials.write(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The one evaluation: users by their roles' policies, service clients by
    /// their granted scopes (which hold for every resource).
    pub async fn decide(
        &self,
        subject: &Subject,
        action: &str,
        resource: &Resource,
    ) -> ServiceResult<Decision> {
        match subject {
            Subject::User(id) => Ok(match self.user_policies(*id).await? {
                Some(policies) => policy::evaluate(&policies, action, resource),
                None => Decision::default_deny(),
            }),
            Subject::Client(client_id) => {
                let scopes = store::policies::client_scopes(&self.db, client_id).await?;
                Ok(match scopes {
                    Some(s) if s.iter().any(|s| s == action) => {
                        Decision::allow(format!("client_scope:{action}"))
                    }
                    _ => Decision::default_deny(),
                })
            }
        }
    }

    /// Whether a user's roles allow `action` on `resource`.
    pub async fn user_allows(
        &self,
        user_id: Uuid,
        action: &str,
        resource: &Resource,
    ) -> ServiceResult<Decision> {
        self.decide(&Subject::User(user_id), action, resource).await
    }
}
