//! Failed-login counts per user (`client_ip` '') and per (user, client IP), and the
//! locks they set (migration 2026120100030101). A count lives for `window` seconds
//! from its first failure; a lock for `lockout` seconds from the failure that
//! reached `max`; an expired row counts as absent.

use uuid::Uuid;

use super::{Db, StoreResult, Tx};
pub use crate::domain::lockout::Standing;

/// The `client_ip` of the row that counts every client address.
pub const ANY_IP: &str = "";

/// A row that no longer counts: its lock ran out, or (unlocked) its window did.
const EXPIRED: &str =
    "(coalesce(f.locked_until, f.window_started_at + make_interval(secs => $3)) <= now())";

/// (account, pair) standing of `user_id` for `ip`.
pub async fn standing(
    db: &Db,
    user_id: Uuid,
    ip: &str,
    window_secs: u64,
) -> StoreResult<(Standing, Standing)> {
    let rows: Vec<(String, i32, bool)> = sqlx::query_as(&format!(
        "select f.client_ip, f.failures, coalesce(f.locked_until > now(), false)
           from login_failures f
          where f.user_id = $1 and f.client_ip in ('', $2) and not {EXPIRED}"
    ))
    .bind(user_id)
    .bind(ip)
    .bind(window_secs as f64)
    .fetch_all(&db.pool)
    .await?;
    let (mut account, mut pair) = (Standing::default(), Standing::default());
    for (row_ip, failures, locked) in rows {
        let s = Standing { failures, locked };
        if row_ip == ANY_IP {
            account = s;
        } else {
            pair = s;
        }
    }
    Ok((account, pair))
}

/// Counts one failure for (user, `ip`) — `ANY_IP` for the account — and answers
/// whether this very failure set the lock (exactly once per window, even when
/// failures race).
pub async fn record_failure(
    tx: &mut Tx,
    user_id: Uuid,
    ip: &str,
    window_secs: u64,
    max: u32,
    lockout_secs: u64,
) -> StoreResult<bool> {
    let expired = EXPIRED;
    let (locked_now,): (bool,) = sqlx::query_as(&format!(
        "insert into login_failures as f (user_id, client_ip, failures, locked_until)
         values ($1, $2, 1, case when $4 <= 1 then now() + make_interval(secs => $5) end)
         on conflict (user_id, client_ip) do update set
             failures = case when {expired} then 1 else f.failures + 1 end,
             window_started_at = case when {expired} then now() else f.window_started_at end,
             locked_until = case
                 when {expired} then case when $4 <= 1 then now() + make_interval(secs => $5) end
                 when f.failures + 1 = $4 then now() + make_interval(secs => $5)
                 else f.locked_until end,
             updated_at = now()
         returning f.failures = $4"
    ))
    .bind(user_id)
    .bind(ip)
    .bind(window_secs as f64)
    .bind(max as i32)
    .bind(lockout_secs as f64)
    .fetch_one(&mut **tx)
    .await?;
    Ok(locked_now)
}

/// After a right password from `ip`: that pair's count goes, and so does the
/// account's unless it is locked (a lock runs its course: the attacker who set
/// it must not be freed by its owner's login); expired rows of the user go too.
pub async fn clear(tx: &mut Tx, user_id: Uuid, ip: &str, window_secs: u64) -> StoreResult<()> {
    sqlx::query(&format!(
        "delete from login_failures f
          where f.user_id = $1
            and (f.client_ip = $2
                 or (f.client_ip = '' and not coalesce(f.locked_until > now(), false))
                 or {EXPIRED})"
    ))
    .bind(user_id)
    .bind(ip)
    .bind(window_secs as f64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Deletes every row that no longer counts (any user): a successful login only
/// clears its own user's rows, and only when some still count, so rows left by
/// failures nobody followed up would otherwise stay for ever. Answers how many.
pub async fn delete_expired(db: &Db, window_secs: u64) -> StoreResult<u64> {
    let expired = EXPIRED.replace("$3", "$1");
    Ok(
        sqlx::query(&format!("delete from login_failures f where {expired}"))
            .bind(window_secs as f64)
            .execute(&db.pool)
            .await?
            .rows_affected(),
    )
}
