//! Single-use link tokens (only their SHA-256 is stored), verified emails and the
//! addresses users signed in from.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, StoreResult, Tx};

/// A token that was live (unused, unexpired) when it was consumed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConsumedToken {
    pub user_id: Uuid,
    pub purpose: String,
    /// The address the link was sent to.
    pub email: String,
}

/// A live token, looked at without being consumed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LiveToken {
    pub id: Uuid,
    pub user_id: Uuid,
    pub email: String,
}

pub async fn insert_token(
    tx: &mut Tx,
    user_id: Uuid,
    purpose: &str,
    token_hash: &[u8],
    email: &str,
    expires_at: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query(
        "insert into user_tokens (id, user_id, purpose, token_hash, email, expires_at)
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(Uuid::now_v7())
    .bind(user_id)
    .bind(purpose)
    .bind(token_hash)
    .bind(email)
    .bind(expires_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The live token of one of `purposes` with this hash, if any.
pub async fn live_token(
    db: &Db,
    token_hash: &[u8],
    purposes: &[&str],
) -> StoreResult<Option<LiveToken>> {
    Ok(sqlx::query_as::<_, LiveToken>(
        "select id, user_id, email from user_tokens
          where token_hash = $1 and purpose = any($2) and used_at is null and expires_at > now()",
    )
    .bind(token_hash)
    .bind(purposes)
    .fetch_optional(&db.pool)
    .await?)
}

/// Uses the token once: of two concurrent confirmations exactly one gets it.
pub async fn consume_token(
    tx: &mut Tx,
    token_hash: &[u8],
    purposes: &[&str],
) -> StoreResult<Option<ConsumedToken>> {
    Ok(sqlx::query_as::<_, ConsumedToken>(
        "update user_tokens set used_at = now()
          where token_hash = $1 and purpose = any($2) and used_at is null and expires_at > now()
          returning user_id, purpose, email",
    )
    .bind(token_hash)
    .bind(purposes)
    .fetch_optional(&mut **tx)
    .await?)
}

/// Ends every live token of the user for these purposes (a reset done, an address
/// changed: links sent earlier must not work any more).
pub async fn revoke_tokens(tx: &mut Tx, user_id: Uuid, purposes: &[&str]) -> StoreResult<u64> {
    Ok(sqlx::query(
        "update user_tokens set used_at = now()
          where user_id = $1 and purpose = any($2) and used_at is null",
    )
    .bind(user_id)
    .bind(purposes)
    .execute(&mut **tx)
    .await?
    .rows_affected())
}

/// Whether the user's email is verified (None: no such user). Read from the
/// database, not a cache: it gates credential changes.
pub async fn email_verified(db: &Db, user_id: Uuid) -> StoreResult<Option<bool>> {
    Ok(
        sqlx::query_scalar("select email_verified from users where id = $1")
            .bind(user_id)
            .fetch_optional(&db.pool)
            .await?,
    )
}

/// Marks the address verified, if it is still the user's address.
pub async fn set_email_verified(tx: &mut Tx, user_id: Uuid, email: &str) -> StoreResult<bool> {
    Ok(sqlx::query(
        "update users set email_verified = true, updated_at = now()
          where id = $1 and lower(email) = lower($2)",
    )
    .bind(user_id)
    .bind(email)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1)
}

/// Moves the user to a new, verified address; returns the old one. A clash with
/// another user's address is `Taken { field: "email" }`.
pub async fn change_email(
    tx: &mut Tx,
    user_id: Uuid,
    new_email: &str,
) -> StoreResult<Option<String>> {
    let old: Option<String> =
        sqlx::query_scalar("select email from users where id = $1 for update")
            .bind(user_id)
            .fetch_optional(&mut **tx)
            .await?;
    if old.is_some() {
        sqlx::query(
            "update users set email = $2, email_verified = true, updated_at = now() where id = $1",
        )
        .bind(user_id)
        .bind(new_email)
        .execute(&mut **tx)
        .await?;
    }
    Ok(old)
}

/// Whether another user holds this address (case-insensitive).
pub async fn email_taken(db: &Db, email: &str, except: Uuid) -> StoreResult<bool> {
    Ok(sqlx::query_scalar(
        "select exists(select 1 from users where lower(email) = lower($1) and id <> $2)",
    )
    .bind(email)
    .bind(except)
    .fetch_one(&db.pool)
    .await?)
}

/// Records a sign-in from `ip`; true when the address was not seen for this
/// user within `memory_secs` (or never).
pub async fn record_sign_in_ip(
    tx: &mut Tx,
    user_id: Uuid,
    ip: &str,
    memory_secs: i64,
) -> StoreResult<bool> {
    let previous: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
        "with old as (select last_seen_at from user_sign_in_ips where user_id = $1 and ip = $2)
         insert into user_sign_in_ips (user_id, ip, last_seen_at) values ($1, $2, now())
         on conflict (user_id, ip) do update set last_seen_at = now()
         returning (select last_seen_at from old)",
    )
    .bind(user_id)
    .bind(ip)
    .fetch_optional(&mut **tx)
    .await?;
    let seen = previous
        .flatten()
        .is_some_and(|t| (Utc::now() - t).num_seconds() < memory_secs);
    Ok(!seen)
}
