//! The audit trail for administrators: GET /v1/admin/audit-logs. Only a user whose
//! roles grant `admin:audit` (and whose API key, if any, carries it) may read it;
//! a refusal is itself audited.

use serde_json::json;

use super::audit::{AuditEntry, Outcome};
use super::paging::{self, Page};
use super::policy::PolicyEngine;
use super::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::domain::policy::Resource;
use crate::store::audit_log;
pub use crate::store::audit_log::{AuditFilter, AuditRow};
use crate::store::{audit, Db, StoreError};

const SCOPE: &str = "admin:audit";

#[derive(Clone)]
pub struct AuditLog {
    db: Db,
    policy: PolicyEngine,
}

impl AuditLog {
    pub fn new(db: Db, policy: PolicyEngine) -> Self {
        Self { db, policy }
    }

    pub async fn list(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        filter: AuditFilter,
        limit: Option<i64>,
        cursor: Option<&str>,
    ) -> ServiceResult<Page<AuditRow>> {
        self.require_auditor(caller, meta).await?;
        let limit = paging::limit(limit)?;
        let before = cursor.map(paging::decode_key).transpose()?;
        let filter = AuditFilter {
            action: paging::text_filter("action", filter.action)?,
            actor_id: paging::text_filter("actor_id", filter.actor_id)?,
            target_id: paging::text_filter("target_id", filter.target_id)?,
            since: paging::check_time("since", filter.since)?,
            until: paging::check_time("until", filter.until)?,
        };
        if let (Some(s), Some(u)) = (filter.since, filter.until) {
            if s > u {
                return Err(ServiceError::validation(
                    "since",
                    "invalid",
                    "must not be after until",
                ));
            }
        }
        let rows = audit_log::list(&self.db.pool, &filter, before, limit + 1).await?;
        Ok(paging::finish(rows, limit, |r| {
            paging::encode(&r.id.to_string())
        }))
    }

    async fn require_auditor(&self, caller: &Caller, meta: &RequestMeta) -> ServiceResult<()> {
        let decision = match caller.user_id() {
            Some(user_id) if caller.key_allows_scope(SCOPE) => Some(
                self.policy
                    .user_allows(user_id, SCOPE, &Resource::Any)
                    .await?,
            ),
            _ => None,
        };
        if decision.as_ref().is_some_and(|d| d.allowed) {
            return Ok(());
        }
        let mut conn = self.db.pool.acquire().await.map_err(StoreError::from)?;
        audit::insert(
            &mut conn,
            &AuditEntry::new("authz.denied", Outcome::Denied)
                .by(caller)
                .meta(meta)
                .details(json!({
                    "need": SCOPE,
                    "reason": if decision.is_some() { "policy" } else { "key_scope_or_not_a_user" },
                    "decided_by": decision.map(|d| d.decided_by),
                })),
        )
        .await?;
        Err(ServiceError::Forbidden(
            "the admin role is required to read the audit trail".into(),
        ))
    }
}
