//! The audit trail for administrators: GET /v1/admin/audit-logs. Only a user whose
//! roles grant `admin:audit` (and whose API key, if any, carries it) may read it;
//! a refusal is itself audited.

use serde_json::json;

use super::audit::{AuditEntry, Outcome};
use super::paging::{self, Page, PageQuery};
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

    /// `admin verify-audit-chain`: see `verify_chain`.
    pub async fn verify_chain(&self) -> Result<ChainReport, StoreError> {
        verify_chain(&self.db).await
    }

    pub async fn list(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        filter: AuditFilter,
        page: PageQuery,
    ) -> ServiceResult<Page<AuditRow>> {
        self.require_auditor(caller, meta).await?;
        let page = page.parse::<i64>()?;
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
        let rows = audit_log::list(&self.db, &filter, page.after, page.fetch()).await?;
        Ok(page.page(rows, |r| r.id))
    }

    async fn require_auditor(&self, caller: &Caller, meta: &RequestMeta) -> ServiceResult<()> {
        let refusal = match self
            .policy
            .user_scope(caller, SCOPE, &Resource::Any)
            .await?
        {
            Ok(_) => return Ok(()),
            Err(r) => r,
        };
        self.policy
            .record_denial(
                AuditEntry::new("authz.denied", Outcome::Denied)
                    .by(caller)
                    .meta(meta)
                    .details(json!({
                        "need": SCOPE,
                        "reason": refusal.reason(),
                        "decided_by": refusal.decided_by(),
                    })),
            )
            .await?;
        Err(ServiceError::Forbidden(
            "the admin role is required to read the audit trail".into(),
        ))
    }
}

/// The first place the audit hash chain breaks: the row (`id`), its chain
/// position, and what does not match.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BrokenLink {
    pub id: i64,
    pub position: i64,
    pub reason: String,
}

/// What walking the chain found: `rows` links checked, and the first broken one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainReport {
    pub rows: u64,
    pub broken: Option<BrokenLink>,
}

/// Walks audit_logs in chain order and checks every link: positions follow each
/// other from 1 (no row removed before the last), each `prev_hash` is the
/// previous row's `row_hash`, and each `row_hash` still matches the row's
/// contents. A row changed with the triggers off fails the last test; one whose
/// hash was recomputed as well breaks the next row's `prev_hash`. Removing rows
/// from the end leaves a shorter, intact chain: compare the count with an
/// earlier run's to catch that.
pub async fn verify_chain(db: &Db) -> Result<ChainReport, StoreError> {
    const PAGE: i64 = 1000;
    let mut prev: Option<Vec<u8>> = None;
    let mut position = 0_i64;
    loop {
        let page = audit_log::chain_after(db, position, PAGE).await?;
        if page.is_empty() {
            return Ok(ChainReport {
                rows: position as u64,
                broken: None,
            });
        }
        for link in page {
            let reason = if link.chain_seq != position + 1 {
                Some(format!(
                    "position {} follows {position}: rows are missing",
                    link.chain_seq
                ))
            } else if link.prev_hash != prev {
                Some("prev_hash is not the previous row's row_hash".to_string())
            } else if link.recomputed != link.row_hash {
                Some(
                    "row_hash does not match the row's contents: changed after it was written"
                        .into(),
                )
            } else {
                None
            };
            if let Some(reason) = reason {
                return Ok(ChainReport {
                    rows: position as u64,
                    broken: Some(BrokenLink {
                        id: link.id,
                        position: link.chain_seq,
                        reason,
                    }),
                });
            }
            position = link.chain_seq;
            prev = Some(link.row_hash);
        }
    }
}

/// audit_logs is append-only against the service itself only if the role it
/// connects as cannot switch the triggers off: not the owner, not a member of the
/// owner's role, not a superuser. Ok(Some) names the problem (staging and
/// production refuse it); Err says the check could not run (database unreachable,
/// or no answer within 5 s).
pub async fn append_only_problem(db: &Db, env: &str) -> Result<Option<String>, String> {
    let checked = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        audit::connected_role_can_alter(db),
    )
    .await;
    match checked {
        Ok(Ok(None)) => Ok(None),
        Ok(Ok(Some(why))) => Ok(Some(format!(
            "DATABASE_URL: {why}, so the service could disable the audit log's triggers; \
             connect as the application role and migrate with DATABASE_MIGRATION_URL \
             (deploy/postgres/roles.sql), refused in {env}"
        ))),
        Ok(Err(e)) => Err(format!(
            "cannot check DATABASE_URL's role against audit_logs: {e}"
        )),
        Err(_) => Err("cannot check DATABASE_URL's role against audit_logs: timed out".into()),
    }
}
