//! Audit rows. Always written with the caller's transaction (`&mut PgConnection`),
//! so the record commits or rolls back with the change it describes. The database
//! chains each row to the previous one and refuses UPDATE/DELETE.

use sqlx::PgConnection;

use super::StoreResult;
use crate::domain::audit::AuditEntry;

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

/// Why the connected role could switch off audit_logs' triggers (and then rewrite
/// or delete rows): it is a superuser, or owns the table, or is a member of the
/// role that does. None when it can only use what it was granted, or when the
/// table does not exist yet.
pub async fn connected_role_can_alter(db: &super::Db) -> StoreResult<Option<String>> {
    let row: Option<(String, String, bool, bool)> = sqlx::query_as(
        "select current_user::text, t.tableowner::text, r.rolsuper,
                pg_has_role(current_user, t.tableowner, 'MEMBER')
           from pg_tables t
           join pg_roles r on r.rolname = current_user
          where t.schemaname = current_schema() and t.tablename = 'audit_logs'",
    )
    .fetch_optional(&db.pool)
    .await?;
    Ok(row.and_then(|(user, owner, superuser, member)| {
        if superuser {
            Some(format!("role {user:?} is a superuser"))
        } else if user == owner {
            Some(format!("role {user:?} owns audit_logs"))
        } else if member {
            Some(format!(
                "role {user:?} is a member of {owner:?}, which owns audit_logs"
            ))
        } else {
            None
        }
    }))
}
