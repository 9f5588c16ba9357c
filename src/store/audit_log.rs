//! Reading the audit trail (writing is `store::audit`): filtered, newest first,
//! keyset-paginated by row id.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreResult;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub actor_type: String,
    pub actor_id: Option<String>,
    pub action: String,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub outcome: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub details: serde_json::Value,
}

#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub action: Option<String>,
    pub actor_id: Option<String>,
    pub target_id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// At most `limit` rows with id below `before`, newest first.
pub async fn list(
    pool: &PgPool,
    f: &AuditFilter,
    before: Option<i64>,
    limit: i64,
) -> StoreResult<Vec<AuditRow>> {
    Ok(sqlx::query_as(
        "select id, occurred_at, actor_type, actor_id, action, target_type, target_id,
                outcome, ip, user_agent, details
           from audit_logs
          where ($1::text is null or action = $1)
            and ($2::text is null or actor_id = $2)
            and ($3::text is null or target_id = $3)
            and ($4::timestamptz is null or occurred_at >= $4)
            and ($5::timestamptz is null or occurred_at < $5)
            and ($6::bigint is null or id < $6)
          order by id desc
          limit $7",
    )
    .bind(&f.action)
    .bind(&f.actor_id)
    .bind(&f.target_id)
    .bind(f.since)
    .bind(f.until)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
