//! Passkeys and WebAuthn challenges (migration 2026120214000001). The WebAuthn
//! library's values travel as JSON: this module stores them, it does not read them.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Db, StoreError, StoreResult};
use crate::domain::passkey::{Ceremony, PasskeySummary};

/// A registered credential as the ceremonies need it.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredPasskey {
    pub id: Uuid,
    pub user_id: Uuid,
    /// webauthn-rs's `Passkey`, as JSON.
    pub passkey: serde_json::Value,
    pub sign_count: i64,
}

#[derive(sqlx::FromRow)]
struct SummaryRow {
    id: Uuid,
    name: String,
    created_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
}

impl From<SummaryRow> for PasskeySummary {
    fn from(r: SummaryRow) -> Self {
        PasskeySummary {
            id: r.id,
            name: r.name,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
        }
    }
}

pub struct NewPasskey<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub credential_id: &'a [u8],
    pub name: &'a str,
    pub passkey: serde_json::Value,
    pub sign_count: i64,
}

pub async fn insert(conn: &mut PgConnection, p: NewPasskey<'_>) -> StoreResult<PasskeySummary> {
    sqlx::query_as::<_, SummaryRow>(
        "insert into webauthn_credentials (id, user_id, credential_id, name, passkey, sign_count)
         values ($1, $2, $3, $4, $5, $6)
         returning id, name, created_at, last_used_at",
    )
    .bind(p.id)
    .bind(p.user_id)
    .bind(p.credential_id)
    .bind(p.name)
    .bind(p.passkey)
    .bind(p.sign_count)
    .fetch_one(conn)
    .await
    .map(Into::into)
    .map_err(|e| match &e {
        sqlx::Error::Database(d)
            if d.constraint() == Some("webauthn_credentials_credential_id_key") =>
        {
            StoreError::Conflict("this passkey is already registered".into())
        }
        _ => e.into(),
    })
}

/// The user's passkeys, oldest first.
pub async fn list_for_user(db: &Db, user_id: Uuid) -> StoreResult<Vec<PasskeySummary>> {
    Ok(sqlx::query_as::<_, SummaryRow>(
        "select id, name, created_at, last_used_at from webauthn_credentials
          where user_id = $1 order by created_at, id",
    )
    .bind(user_id)
    .fetch_all(&db.pool)
    .await?
    .into_iter()
    .map(Into::into)
    .collect())
}

pub async fn count_for_user(db: &Db, user_id: Uuid) -> StoreResult<i64> {
    Ok(
        sqlx::query_scalar("select count(*) from webauthn_credentials where user_id = $1")
            .bind(user_id)
            .fetch_one(&db.pool)
            .await?,
    )
}

/// Every credential of the user, for an exclude list or a second factor.
pub async fn credentials_for_user(db: &Db, user_id: Uuid) -> StoreResult<Vec<StoredPasskey>> {
    Ok(sqlx::query_as::<_, StoredPasskey>(
        "select id, user_id, passkey, sign_count from webauthn_credentials
          where user_id = $1 order by created_at, id",
    )
    .bind(user_id)
    .fetch_all(&db.pool)
    .await?)
}

/// The credential an assertion names.
pub async fn by_credential_id(db: &Db, credential_id: &[u8]) -> StoreResult<Option<StoredPasskey>> {
    Ok(sqlx::query_as::<_, StoredPasskey>(
        "select id, user_id, passkey, sign_count from webauthn_credentials
          where credential_id = $1",
    )
    .bind(credential_id)
    .fetch_optional(&db.pool)
    .await?)
}

/// Records a verified use: the new state and counter, and the time. The counter
/// only moves forwards: a counter that does not exceed the stored one (unless
/// both are 0, an authenticator without a counter) updates nothing and answers
/// false, so two logins racing with copies of one authenticator cannot both pass.
pub async fn record_use(
    conn: &mut PgConnection,
    id: Uuid,
    passkey: serde_json::Value,
    counter: i64,
) -> StoreResult<bool> {
    Ok(sqlx::query(
        "update webauthn_credentials
            set passkey = $2, sign_count = $3, last_used_at = now()
          where id = $1 and ($3 > sign_count or ($3 = 0 and sign_count = 0))",
    )
    .bind(id)
    .bind(passkey)
    .bind(counter)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// Removes one of the user's passkeys; `None` when the user has no such passkey.
pub async fn delete(
    conn: &mut PgConnection,
    user_id: Uuid,
    id: Uuid,
) -> StoreResult<Option<PasskeySummary>> {
    Ok(sqlx::query_as::<_, SummaryRow>(
        "delete from webauthn_credentials where id = $1 and user_id = $2
         returning id, name, created_at, last_used_at",
    )
    .bind(id)
    .bind(user_id)
    .fetch_optional(conn)
    .await?
    .map(Into::into))
}

/// Removes every passkey of the user (an administrator resetting factors);
/// how many there were.
pub async fn delete_all_for_user(conn: &mut PgConnection, user_id: Uuid) -> StoreResult<u64> {
    // Ceremonies in flight for the user end with their passkeys.
    sqlx::query("delete from webauthn_challenges where user_id = $1")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    Ok(
        sqlx::query("delete from webauthn_credentials where user_id = $1")
            .bind(user_id)
            .execute(conn)
            .await?
            .rows_affected(),
    )
}

/// Stores a ceremony's state under a new challenge id, and sweeps a few expired
/// challenges so the table stays the size of what is in flight.
pub async fn insert_challenge(
    db: &Db,
    id: Uuid,
    ceremony: Ceremony,
    user_id: Option<Uuid>,
    state: serde_json::Value,
    ttl_seconds: i64,
) -> StoreResult<()> {
    sqlx::query(
        "delete from webauthn_challenges where id in
           (select id from webauthn_challenges where expires_at < now() limit 100)",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query(
        "insert into webauthn_challenges (id, ceremony, user_id, state, expires_at)
         values ($1, $2, $3, $4, now() + make_interval(secs => $5))",
    )
    .bind(id)
    .bind(ceremony.as_str())
    .bind(user_id)
    .bind(state)
    .bind(ttl_seconds as f64)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Consumes a challenge: it is deleted whatever happens next, so it finishes at
/// most one ceremony. `None` when there is no such challenge for this ceremony
/// and user, or it has expired.
pub async fn take_challenge(
    db: &Db,
    id: Uuid,
    ceremony: Ceremony,
    user_id: Option<Uuid>,
) -> StoreResult<Option<serde_json::Value>> {
    let row: Option<(serde_json::Value, bool)> = sqlx::query_as(
        "delete from webauthn_challenges
          where id = $1 and ceremony = $2 and user_id is not distinct from $3
         returning state, expires_at > now()",
    )
    .bind(id)
    .bind(ceremony.as_str())
    .bind(user_id)
    .fetch_optional(&db.pool)
    .await?;
    Ok(row.filter(|(_, live)| *live).map(|(state, _)| state))
}
