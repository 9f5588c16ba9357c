//! Audit rows. Always written with the caller's transaction (`&mut PgConnection`),
//! so the record commits or rolls back with the change it describes. The database
//! chains each row to the previous one and refuses UPDATE/DELETE.

use sqlx::PgConnection;

use super::StoreResult;
use crate::service::audit::AuditEntry;

pub async fn insert(conn: &mut PgConnection, e: &AuditEntry) -> StoreResult<()> {
    sqlx::query(
        "insert into audit_logs (actor_type, actor_id, action, target_type, target_id, outcome, ip, user_agent, details)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(e.actor_type)
    .bind(&e.actor_id)
    .bind(&e.action)
    .bind(e.target_type)
    .bind(&e.target_id)
    .bind(e.outcome.as_str())
    .bind(e.ip.map(|ip| ip.to_string()))
    .bind(&e.user_agent)
    .bind(&e.details)
    .execute(conn)
    .await?;
    Ok(())
}
