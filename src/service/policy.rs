//! The policy engine both transports use: a user's roles → role_policies →
//! policies, a service client's scopes; deny wins, default deny, and every answer
//! names the rule that decided.

use uuid::Uuid;

use super::{Caller, ServiceError, ServiceResult};
use crate::domain::policy::{self, parse_action, Decision, Resource, Subject};
use crate::store::{self, Db};

#[derive(Clone)]
pub struct PolicyEngine {
    db: Db,
}

impl PolicyEngine {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The scopes a user's roles grant: allowed actions minus denied ones. Empty
    /// for an unknown or disabled user.
    pub async fn user_scopes(&self, user_id: Uuid) -> ServiceResult<Vec<String>> {
        Ok(store::policies::for_user(&self.db.pool, user_id)
            .await?
            .map(|ps| policy::granted_scopes(&ps))
            .unwrap_or_default())
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

    /// CheckPermission for a caller: only one holding `permissions:check` may ask
    /// about others.
    pub async fn check_permission_for(
        &self,
        caller: &Caller,
        subject: &str,
        action: &str,
        resource: &str,
    ) -> ServiceResult<Decision> {
        if !matches!(caller, Caller::ServiceClient { .. })
            || !caller.key_allows_scope("permissions:check")
        {
            return Err(ServiceError::Forbidden(
                "requires the permissions:check scope".into(),
            ));
        }
        self.check_permission(subject, action, resource).await
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
            Subject::User(id) => Ok(match store::policies::for_user(&self.db.pool, *id).await? {
                Some(policies) => policy::evaluate(&policies, action, resource),
                None => Decision::default_deny(),
            }),
            Subject::Client(client_id) => {
                let scopes = store::policies::client_scopes(&self.db.pool, client_id).await?;
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
