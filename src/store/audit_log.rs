//! Reading the audit trail (writing is `store::audit`): filtered, newest first,
//! keyset-paginated by row id.

use chrono::{DateTime, Utc};

use super::{Db, StoreResult};

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
    db: &Db,
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
    .fetch_all(&db.pool)
    .await?)
}

/// One row of the hash chain, with the hash the database computes for it now from
/// its stored columns and stored `prev_hash` (the chaining trigger's formula).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChainLink {
    pub id: i64,
    pub chain_seq: i64,
    pub prev_hash: Option<Vec<u8>>,
    pub row_hash: Vec<u8>,
    pub recomputed: Vec<u8>,
}

/// Up to `limit` links after chain position `after`, in chain order. The hash is
/// recomputed in SQL with the expression of `audit_logs_chain()` (the initial
/// migration), so timestamps and JSON print exactly as they did when chained.
pub async fn chain_after(db: &Db, after: i64, limit: i64) -> StoreResult<Vec<ChainLink>> {
    Ok(sqlx::query_as(
        r#"select id, chain_seq, prev_hash, row_hash,
                  sha256(coalesce(prev_hash, '\x'::bytea) || convert_to(concat_ws(E'\x1f',
                      chain_seq::text, to_char(occurred_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
                      actor_type, coalesce(actor_id, ''), action,
                      coalesce(target_type, ''), coalesce(target_id, ''), outcome,
                      coalesce(ip, ''), coalesce(user_agent, ''), details::text), 'UTF8')) as recomputed
             from audit_logs
            where chain_seq > $1
            order by chain_seq
            limit $2"#,
    )
    .bind(after)
    .bind(limit)
    .fetch_all(&db.pool)
    .await?)
}
