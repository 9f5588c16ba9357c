//! The notification outbox: rows written in the transaction of the change that
//! causes them, claimed by the dispatchers with `FOR UPDATE SKIP LOCKED`.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, StoreResult, Tx};

/// A message waiting for delivery, as the dispatcher reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: Uuid,
    pub template: String,
    pub recipient: String,
    pub user_id: Option<Uuid>,
    pub data: serde_json::Value,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

pub async fn insert(
    tx: &mut Tx,
    id: Uuid,
    template: &str,
    recipient: &str,
    user_id: Option<Uuid>,
    data: &serde_json::Value,
) -> StoreResult<()> {
    sqlx::query(
        "insert into notification_outbox (id, template, recipient, user_id, data)
         values ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(template)
    .bind(recipient)
    .bind(user_id)
    .bind(data)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Due messages, oldest first, locked for the rest of the transaction; rows
/// another dispatcher holds are skipped, so no message is in flight twice.
pub async fn claim_due(tx: &mut Tx, limit: i64) -> StoreResult<Vec<OutboxRow>> {
    Ok(sqlx::query_as::<_, OutboxRow>(
        "select id, template, recipient, user_id, data, attempts, created_at
           from notification_outbox
          where status = 'pending' and next_attempt_at <= now()
          order by next_attempt_at, id
          limit $1
          for update skip locked",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?)
}

/// The keys of `data` erased once a message is final (delivered or dead): a link
/// token stays in the outbox only while it may still be sent.
const SECRET_KEYS: [&str; 2] = ["link", "token"];

pub async fn mark_delivered(tx: &mut Tx, id: Uuid) -> StoreResult<()> {
    sqlx::query(
        "update notification_outbox
            set status = 'delivered', attempts = attempts + 1, delivered_at = now(),
                last_error = null, data = data - $2::text[]
          where id = $1",
    )
    .bind(id)
    .bind(&SECRET_KEYS[..])
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A failed attempt: try again after `retry_in_ms`.
pub async fn mark_retry(tx: &mut Tx, id: Uuid, retry_in_ms: i64, error: &str) -> StoreResult<()> {
    sqlx::query(
        "update notification_outbox
            set attempts = attempts + 1, last_error = $3,
                next_attempt_at = now() + make_interval(secs => $2::double precision / 1000)
          where id = $1",
    )
    .bind(id)
    .bind(retry_in_ms)
    .bind(error)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The last attempt failed: the message is dead and keeps no token.
pub async fn mark_dead(tx: &mut Tx, id: Uuid, error: &str) -> StoreResult<()> {
    sqlx::query(
        "update notification_outbox
            set status = 'dead', attempts = attempts + 1, last_error = $2,
                data = data - $3::text[]
          where id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(&SECRET_KEYS[..])
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Messages not yet delivered nor dead (the `notification_outbox_pending` gauge).
pub async fn pending_count(db: &Db) -> StoreResult<i64> {
    Ok(
        sqlx::query_scalar("select count(*) from notification_outbox where status = 'pending'")
            .fetch_one(&db.pool)
            .await?,
    )
}

/// Delivered messages are kept a week for operators, then dropped; dead ones stay
/// until someone looks at them.
pub async fn purge_delivered(db: &Db, older_than_days: i32) -> StoreResult<u64> {
    Ok(sqlx::query(
        "delete from notification_outbox
          where status = 'delivered' and delivered_at < now() - make_interval(days => $1)",
    )
    .bind(older_than_days)
    .execute(&db.pool)
    .await?
    .rows_affected())
}
