//! Login sessions and their rotating refresh tokens (only SHA-256 of a token is
//! stored): the durable truth the Redis session cache (`session_cache`) falls
//! back to.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, StoreResult, Tx};
use crate::domain::session::RevocationReason;
use crate::domain::user::UserStatus;

/// What a request needs to know about its session, read in one query.
#[derive(Debug, Clone)]
pub struct SessionAuth {
    pub user_id: Uuid,
    pub revoked_reason: Option<RevocationReason>,
    pub revoked: bool,
    pub expired: bool,
    pub user_status: UserStatus,
}

#[derive(sqlx::FromRow)]
struct SessionAuthRow {
    user_id: Uuid,
    revoked_reason: Option<String>,
    revoked: bool,
    expired: bool,
    user_status: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub amr: Vec<String>,
    pub auth_time: DateTime<Utc>,
}

/// A refresh token looked up by hash, with its session's state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RefreshRow {
    pub id: Uuid,
    pub session_id: Uuid,
    pub user_id: Uuid,
    pub used: bool,
    pub expired: bool,
    pub session_live: bool,
    /// Live, but unseen for longer than the idle timeout asked about.
    pub session_idle: bool,
    pub session_expires_at: DateTime<Utc>,
}

pub struct NewSession<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub expires_at: DateTime<Utc>,
    pub ip: Option<String>,
    pub user_agent: Option<&'a str>,
    pub amr: &'a [String],
    pub auth_time: DateTime<Utc>,
    /// SHA-256 of the session's first refresh token.
    pub refresh_token_hash: &'a [u8],
}

/// A new session, with how and when its user authenticated (`amr`, `auth_time`),
/// and its first refresh token: one statement (a login's round trips count, the
/// database shares the service's core in a single-host deployment).
pub async fn create(tx: &mut Tx, new: &NewSession<'_>) -> StoreResult<()> {
    sqlx::query(
        "with s as (
             insert into sessions (id, user_id, expires_at, ip, user_agent, amr, auth_time)
             values ($1, $2, $3, $4, $5, $6, $7)
             returning id, expires_at
         )
         insert into refresh_tokens (id, session_id, token_hash, expires_at)
         select $8, s.id, $9, s.expires_at from s",
    )
    .bind(new.id)
    .bind(new.user_id)
    .bind(new.expires_at)
    .bind(&new.ip)
    .bind(new.user_agent)
    .bind(new.amr)
    .bind(new.auth_time)
    .bind(Uuid::now_v7())
    .bind(new.refresh_token_hash)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn insert_refresh_token(
    tx: &mut Tx,
    session_id: Uuid,
    token_hash: &[u8],
    expires_at: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query(
        "insert into refresh_tokens (id, session_id, token_hash, expires_at) values ($1, $2, $3, $4)",
    )
    .bind(Uuid::now_v7())
    .bind(session_id)
    .bind(token_hash)
    .bind(expires_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The one query behind a refresh token's row (`$1` the token hash, `$2` the
/// idle timeout in seconds); a macro so the locking variant can extend it with
/// `concat!`.
macro_rules! refresh_row_sql {
    () => {
        "select t.id, t.session_id, s.user_id, t.used_at is not null as used,
                t.expires_at <= now() as expired,
                (s.revoked_at is null and s.expires_at > now()) as session_live,
                s.last_seen_at <= now() - make_interval(secs => $2) as session_idle,
                s.expires_at as session_expires_at
           from refresh_tokens t join sessions s on s.id = t.session_id
          where t.token_hash = $1"
    };
}

/// Locks the token row and its session, so two concurrent refreshes with one
/// token serialise (the second sees it used) and an ending cannot race a touch;
/// the read is the same as `refresh_token`.
pub async fn refresh_token_for_update(
    tx: &mut Tx,
    token_hash: &[u8],
    idle_secs: u64,
) -> StoreResult<Option<RefreshRow>> {
    Ok(
        sqlx::query_as::<_, RefreshRow>(concat!(refresh_row_sql!(), " for update of t, s"))
            .bind(token_hash)
            .bind(idle_secs as f64)
            .fetch_optional(&mut **tx)
            .await?,
    )
}

/// Read-only lookup (the cookie authenticates requests without rotating).
pub async fn refresh_token(
    db: &Db,
    token_hash: &[u8],
    idle_secs: u64,
) -> StoreResult<Option<RefreshRow>> {
    Ok(sqlx::query_as::<_, RefreshRow>(refresh_row_sql!())
        .bind(token_hash)
        .bind(idle_secs as f64)
        .fetch_optional(&db.pool)
        .await?)
}

pub async fn mark_refresh_used(tx: &mut Tx, id: Uuid) -> StoreResult<()> {
    sqlx::query("update refresh_tokens set used_at = now() where id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The session's state, and marks it seen (called at most once per cache period).
/// A live session unseen for `idle_secs` is ended here (reason `idle_timeout`),
/// and audited, in the same statement, so every other view of it agrees at once. The verdict
/// comes from the statement's snapshot, not from which UPDATE fired: a request
/// racing another over the same idle session (its UPDATE finds the row already
/// revoked) still answers "ended".
pub async fn auth_state(db: &Db, id: Uuid, idle_secs: u64) -> StoreResult<Option<SessionAuth>> {
    let row = sqlx::query_as::<_, SessionAuthRow>(
        "with idle as (
             update sessions set revoked_at = now(), revoked_reason = 'idle_timeout'
              where id = $1 and revoked_at is null and expires_at > now()
                and last_seen_at <= now() - make_interval(secs => $2)
             returning id, user_id
         ), audited as (
             insert into audit_logs
                    (actor_type, actor_id, action, target_type, target_id, outcome, details)
             select 'user', user_id::text, 'auth.session.idle_timeout', 'session', id::text,
                    'denied', jsonb_build_object('session_ended', true,
                                                 'idle_timeout_seconds', $2)
               from idle
         ), touched as (
             update sessions set last_seen_at = now()
              where id = $1 and revoked_at is null and expires_at > now()
                and last_seen_at > now() - make_interval(secs => $2)
         )
         select s.user_id,
                case when s.revoked_at is null and s.expires_at > now()
                          and s.last_seen_at <= now() - make_interval(secs => $2)
                     then 'idle_timeout' else s.revoked_reason end as revoked_reason,
                (s.revoked_at is not null
                 or (s.expires_at > now()
                     and s.last_seen_at <= now() - make_interval(secs => $2))) as revoked,
                s.expires_at <= now() as expired, u.status as user_status
           from sessions s join users u on u.id = s.user_id
          where s.id = $1",
    )
    .bind(id)
    .bind(idle_secs as f64)
    .fetch_optional(&db.pool)
    .await?;
    row.map(|r| {
        Ok(SessionAuth {
            user_id: r.user_id,
            revoked_reason: r
                .revoked_reason
                .as_deref()
                .map(RevocationReason::from_stored),
            revoked: r.revoked,
            expired: r.expired,
            user_status: super::users::user_status(&r.user_status)?,
        })
    })
    .transpose()
}

/// Records activity on a session (a refresh).
pub async fn touch(tx: &mut Tx, id: Uuid) -> StoreResult<()> {
    sqlx::query("update sessions set last_seen_at = now() where id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Ends one session; returns whether it was live.
pub async fn revoke(tx: &mut Tx, id: Uuid, reason: RevocationReason) -> StoreResult<bool> {
    let n = sqlx::query(
        "update sessions set revoked_at = now(), revoked_reason = $2
          where id = $1 and revoked_at is null",
    )
    .bind(id)
    .bind(reason.as_str())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// Ends every live session of a user except `keep`; returns the ended ids.
pub async fn revoke_all_for_user(
    tx: &mut Tx,
    user_id: Uuid,
    keep: Option<Uuid>,
    reason: RevocationReason,
) -> StoreResult<Vec<Uuid>> {
    Ok(sqlx::query_scalar::<_, Uuid>(
        "update sessions set revoked_at = now(), revoked_reason = $3
          where user_id = $1 and revoked_at is null and ($2::uuid is null or id <> $2)
          returning id",
    )
    .bind(user_id)
    .bind(keep)
    .bind(reason.as_str())
    .fetch_all(&mut **tx)
    .await?)
}

/// A user's live sessions, newest first.
pub async fn list_live(db: &Db, user_id: Uuid) -> StoreResult<Vec<SessionRow>> {
    Ok(sqlx::query_as::<_, SessionRow>(
        "select id, user_id, created_at, last_seen_at, expires_at, ip, user_agent, amr, auth_time
           from sessions
          where user_id = $1 and revoked_at is null and expires_at > now()
          order by created_at desc, id desc",
    )
    .bind(user_id)
    .fetch_all(&db.pool)
    .await?)
}

/// A live session of this user, locked (ending it).
pub async fn live_of_user_for_update(tx: &mut Tx, id: Uuid, user_id: Uuid) -> StoreResult<bool> {
    Ok(sqlx::query_scalar::<_, Uuid>(
        "select id from sessions
          where id = $1 and user_id = $2 and revoked_at is null and expires_at > now()
          for update",
    )
    .bind(id)
    .bind(user_id)
    .fetch_optional(&mut **tx)
    .await?
    .is_some())
}
