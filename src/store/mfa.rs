//! Second factors (migration 2026120213000001): TOTP authenticators (sealed
//! secrets and the last accepted time step), recovery-code hashes, the pending
//! second step of logins (`mfa_challenges`) and each session's `amr`/`auth_time`.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, StoreResult, Tx};
use crate::domain::mfa::Factors;

/// The select-list of a user's `Factors` (columns `totp`, `passkeys`,
/// `recovery_codes_left`) for the user whose id is the SQL expression `user_id`:
/// one definition for `factors` and for the login's read of user and factors.
pub(super) fn factor_columns(user_id: &str) -> String {
    format!(
        "exists(select 1 from user_totp t where t.user_id = {user_id} and t.confirmed_at is not null)
             as totp,
         (select count(*) from webauthn_credentials w where w.user_id = {user_id}) as passkeys,
         (select count(*) from user_recovery_codes c where c.user_id = {user_id} and c.used_at is null)
             as recovery_codes_left"
    )
}

/// What a user holds, in one query.
pub async fn factors(db: &Db, user_id: Uuid) -> StoreResult<Factors> {
    let (totp, passkeys, left): (bool, i64, i64) =
        sqlx::query_as(&format!("select {}", factor_columns("$1")))
            .bind(user_id)
            .fetch_one(&db.pool)
            .await?;
    Ok(Factors {
        totp,
        passkeys,
        recovery_codes_left: left,
    })
}

/// A user's TOTP authenticator as stored (the secret still sealed).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TotpRow {
    pub secret_ciphertext: Vec<u8>,
    pub secret_key_id: String,
    pub confirmed: bool,
    pub last_used_step: Option<i64>,
}

const TOTP_SELECT: &str = "select secret_ciphertext, secret_key_id,
        confirmed_at is not null as confirmed, last_used_step
   from user_totp where user_id = $1";

pub async fn totp(db: &Db, user_id: Uuid) -> StoreResult<Option<TotpRow>> {
    Ok(sqlx::query_as(TOTP_SELECT)
        .bind(user_id)
        .fetch_optional(&db.pool)
        .await?)
}

/// Locks the row (confirmation, re-encryption).
pub async fn totp_for_update(tx: &mut Tx, user_id: Uuid) -> StoreResult<Option<TotpRow>> {
    Ok(sqlx::query_as(&format!("{TOTP_SELECT} for update"))
        .bind(user_id)
        .fetch_optional(&mut **tx)
        .await?)
}

/// Stores a pending enrolment, replacing an earlier pending one; answers false
/// (nothing written) when the user's TOTP is already confirmed.
pub async fn put_pending_totp(
    tx: &mut Tx,
    user_id: Uuid,
    ciphertext: &[u8],
    key_id: &str,
) -> StoreResult<bool> {
    let n = sqlx::query(
        "insert into user_totp (user_id, secret_ciphertext, secret_key_id) values ($1, $2, $3)
         on conflict (user_id) do update
            set secret_ciphertext = excluded.secret_ciphertext,
                secret_key_id = excluded.secret_key_id,
                last_used_step = null, created_at = now(), updated_at = now()
          where user_totp.confirmed_at is null",
    )
    .bind(user_id)
    .bind(ciphertext)
    .bind(key_id)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// Activates a pending enrolment whose first code matched `step`.
pub async fn confirm_totp(tx: &mut Tx, user_id: Uuid, step: i64) -> StoreResult<bool> {
    let n = sqlx::query(
        "update user_totp set confirmed_at = now(), last_used_step = $2, updated_at = now()
          where user_id = $1 and confirmed_at is null",
    )
    .bind(user_id)
    .bind(step)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// Records that a code of `step` was accepted, only if no code of this step or a
/// later one was: of two requests racing with one code, exactly one wins (one
/// statement, atomic on its own: no transaction needed).
pub async fn accept_totp_step(db: &Db, user_id: Uuid, step: i64) -> StoreResult<bool> {
    let n = sqlx::query(
        "update user_totp set last_used_step = $2, updated_at = now()
          where user_id = $1 and confirmed_at is not null
            and (last_used_step is null or last_used_step < $2)",
    )
    .bind(user_id)
    .bind(step)
    .execute(&db.pool)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// Removes the user's TOTP (pending or confirmed); answers whether one was confirmed.
pub async fn delete_totp(tx: &mut Tx, user_id: Uuid) -> StoreResult<bool> {
    let confirmed: Option<bool> = sqlx::query_scalar(
        "delete from user_totp where user_id = $1 returning confirmed_at is not null",
    )
    .bind(user_id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(confirmed.unwrap_or(false))
}

/// Users whose TOTP secret is sealed with a key other than `active_kid`.
pub async fn totp_sealed_with_other_key(db: &Db, active_kid: &str) -> StoreResult<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "select user_id from user_totp where secret_key_id <> $1 order by user_id",
    )
    .bind(active_kid)
    .fetch_all(&db.pool)
    .await?)
}

pub async fn reseal_totp(
    tx: &mut Tx,
    user_id: Uuid,
    ciphertext: &[u8],
    key_id: &str,
) -> StoreResult<()> {
    sqlx::query(
        "update user_totp set secret_ciphertext = $2, secret_key_id = $3 where user_id = $1",
    )
    .bind(user_id)
    .bind(ciphertext)
    .bind(key_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

// ---- recovery codes -----------------------------------------------------------

/// Replaces the user's recovery codes with these hashes.
pub async fn replace_recovery_codes(
    tx: &mut Tx,
    user_id: Uuid,
    hashes: &[[u8; 32]],
) -> StoreResult<()> {
    sqlx::query("delete from user_recovery_codes where user_id = $1")
        .bind(user_id)
        .execute(&mut **tx)
        .await?;
    let ids: Vec<Uuid> = hashes.iter().map(|_| Uuid::now_v7()).collect();
    let hashes: Vec<Vec<u8>> = hashes.iter().map(|h| h.to_vec()).collect();
    sqlx::query(
        "insert into user_recovery_codes (id, user_id, code_hash)
         select id, $2, h from unnest($1::uuid[], $3::bytea[]) as t(id, h)",
    )
    .bind(&ids)
    .bind(user_id)
    .bind(&hashes)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Spends one unused code; false when there is no such unused code.
pub async fn use_recovery_code(tx: &mut Tx, user_id: Uuid, hash: &[u8; 32]) -> StoreResult<bool> {
    let n = sqlx::query(
        "update user_recovery_codes set used_at = now()
          where user_id = $1 and code_hash = $2 and used_at is null",
    )
    .bind(user_id)
    .bind(hash.as_slice())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n > 0)
}

pub async fn delete_recovery_codes(tx: &mut Tx, user_id: Uuid) -> StoreResult<u64> {
    Ok(
        sqlx::query("delete from user_recovery_codes where user_id = $1")
            .bind(user_id)
            .execute(&mut **tx)
            .await?
            .rows_affected(),
    )
}

// ---- the second step of a login ---------------------------------------------------

/// A pending second step, looked up by its token's hash.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChallengeRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub amr: Vec<String>,
    /// Unused and unexpired when read.
    pub live: bool,
}

pub struct NewChallenge<'a> {
    pub id: Uuid,
    pub token_hash: &'a [u8],
    pub user_id: Uuid,
    pub amr: &'a [String],
    pub expires_at: DateTime<Utc>,
    pub ip: Option<String>,
    pub user_agent: Option<&'a str>,
}

/// Stores a challenge; the user's dead ones go at the same time.
pub async fn insert_challenge(tx: &mut Tx, c: &NewChallenge<'_>) -> StoreResult<()> {
    sqlx::query(
        "delete from mfa_challenges
          where user_id = $1 and (expires_at <= now() or used_at is not null)",
    )
    .bind(c.user_id)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "insert into mfa_challenges (id, token_hash, user_id, amr, expires_at, ip, user_agent)
         values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(c.id)
    .bind(c.token_hash)
    .bind(c.user_id)
    .bind(c.amr)
    .bind(c.expires_at)
    .bind(&c.ip)
    .bind(c.user_agent)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn challenge(db: &Db, token_hash: &[u8]) -> StoreResult<Option<ChallengeRow>> {
    Ok(sqlx::query_as(
        "select id, user_id, amr, (used_at is null and expires_at > now()) as live
           from mfa_challenges where token_hash = $1",
    )
    .bind(token_hash)
    .fetch_optional(&db.pool)
    .await?)
}

/// Uses a challenge up: true for exactly one caller, and only while it is live.
pub async fn consume_challenge(tx: &mut Tx, id: Uuid) -> StoreResult<bool> {
    let n = sqlx::query(
        "update mfa_challenges set used_at = now()
          where id = $1 and used_at is null and expires_at > now()",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n > 0)
}

// ---- sessions: how they were authenticated --------------------------------------

/// `amr` and `auth_time` of a live session of `user_id`.
pub async fn session_auth(
    db: &Db,
    session_id: Uuid,
    user_id: Uuid,
) -> StoreResult<Option<(Vec<String>, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "select amr, auth_time from sessions
          where id = $1 and user_id = $2 and revoked_at is null and expires_at > now()",
    )
    .bind(session_id)
    .bind(user_id)
    .fetch_optional(&db.pool)
    .await?)
}

/// The same, inside a transaction (a refresh carries them into the new token).
pub async fn session_auth_in(
    tx: &mut Tx,
    session_id: Uuid,
) -> StoreResult<Option<(Vec<String>, DateTime<Utc>)>> {
    Ok(
        sqlx::query_as("select amr, auth_time from sessions where id = $1")
            .bind(session_id)
            .fetch_optional(&mut **tx)
            .await?,
    )
}

/// A live session of `user_id`, locked (a step-up): its `amr` and expiry.
pub async fn live_session_for_update(
    tx: &mut Tx,
    session_id: Uuid,
    user_id: Uuid,
) -> StoreResult<Option<(Vec<String>, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "select amr, expires_at from sessions
          where id = $1 and user_id = $2 and revoked_at is null and expires_at > now()
          for update",
    )
    .bind(session_id)
    .bind(user_id)
    .fetch_optional(&mut **tx)
    .await?)
}

pub async fn set_session_auth(
    tx: &mut Tx,
    session_id: Uuid,
    amr: &[String],
    auth_time: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query("update sessions set amr = $2, auth_time = $3 where id = $1")
        .bind(session_id)
        .bind(amr)
        .bind(auth_time)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

// ---- policy -----------------------------------------------------------------------

/// Whether the user manages a live trading account (member role `manager`).
pub async fn is_account_manager(db: &Db, user_id: Uuid) -> StoreResult<bool> {
    Ok(sqlx::query_scalar(
        "select exists(
             select 1 from trading_account_memberships m
               join trading_accounts a on a.id = m.trading_account_id
              where m.user_id = $1 and m.role = 'manager' and m.revoked_at is null
                and a.deleted_at is null)",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await?)
}

/// The user's passkeys, counted inside a transaction (a factor removal decides
/// on it whether recovery codes stay).
pub async fn passkey_count(tx: &mut Tx, user_id: Uuid) -> StoreResult<i64> {
    Ok(
        sqlx::query_scalar("select count(*) from webauthn_credentials where user_id = $1")
            .bind(user_id)
            .fetch_one(&mut **tx)
            .await?,
    )
}
