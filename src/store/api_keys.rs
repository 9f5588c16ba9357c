//! `api_keys` and `api_key_usage_logs`: lookups by keyed hash, the owner's list,
//! revocation, and the batched usage flush.

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{Db, StoreResult, Tx};
use crate::domain::api_key::RevocationReason;

#[derive(Debug, Clone, FromRow)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub prefix: String,
    pub key_hash: Vec<u8>,
    pub scopes: Vec<String>,
    pub allowed_ips: Vec<String>,
    pub trading_account_ids: Vec<Uuid>,
    pub rate_limit_per_minute: Option<i32>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

const KEY_COLUMNS: &str = "id, user_id, name, prefix, key_hash, scopes, allowed_ips, \
    trading_account_ids, rate_limit_per_minute, expires_at, last_used_at, revoked_at, created_at";

/// A key and its owner in one round trip: what a cache miss on the hot path loads.
#[derive(Debug, Clone, FromRow)]
pub struct KeyWithOwner {
    #[sqlx(flatten)]
    pub key: ApiKeyRow,
    pub user_email: String,
    pub user_full_name: String,
    pub user_status: String,
    pub user_email_verified: bool,
    pub user_created_at: DateTime<Utc>,
    pub user_roles: Vec<String>,
}

pub struct NewApiKey<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: &'a str,
    pub prefix: &'a str,
    pub key_hash: &'a [u8],
    pub scopes: &'a [String],
    pub allowed_ips: &'a [String],
    pub trading_account_ids: &'a [Uuid],
    pub rate_limit_per_minute: Option<i32>,
    pub expires_at: Option<DateTime<Utc>>,
    pub rotated_from: Option<Uuid>,
}

pub async fn insert(tx: &mut Tx, k: &NewApiKey<'_>) -> StoreResult<ApiKeyRow> {
    let row = sqlx::query_as::<_, ApiKeyRow>(&format!(
        "insert into api_keys (id, user_id, name, prefix, key_hash, scopes, allowed_ips,
             trading_account_ids, rate_limit_per_minute, expires_at, rotated_from)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         returning {KEY_COLUMNS}"
    ))
    .bind(k.id)
    .bind(k.user_id)
    .bind(k.name)
    .bind(k.prefix)
    .bind(k.key_hash)
    .bind(k.scopes)
    .bind(k.allowed_ips)
    .bind(k.trading_account_ids)
    .bind(k.rate_limit_per_minute)
    .bind(k.expires_at)
    .bind(k.rotated_from)
    .fetch_one(&mut **tx)
    .await?;
    Ok(row)
}

/// A key with its owner, as verification caches it.
const KEY_WITH_OWNER: &str = "select k.id, k.user_id, k.name, k.prefix, k.key_hash, k.scopes, k.allowed_ips,
        k.trading_account_ids, k.rate_limit_per_minute, k.expires_at, k.last_used_at,
        k.revoked_at, k.created_at,
        u.email as user_email, u.full_name as user_full_name, u.status as user_status, u.email_verified as user_email_verified,
        u.created_at as user_created_at,
        array(select r.name from user_roles ur join roles r on r.id = ur.role_id
              where ur.user_id = u.id order by r.name) as user_roles
 from api_keys k join users u on u.id = k.user_id";

/// The hot path's only query on a cache miss (unique index on key_hash).
pub async fn find_by_hash(db: &Db, hash: &[u8]) -> StoreResult<Option<KeyWithOwner>> {
    let row = sqlx::query_as::<_, KeyWithOwner>(&format!("{KEY_WITH_OWNER} where k.key_hash = $1"))
        .bind(hash)
        .fetch_optional(&db.pool)
        .await?;
    Ok(row)
}

/// The same for many keys in one query (the cache's refresh ahead of staleness);
/// keys no longer in the table are simply absent.
pub async fn find_by_ids(db: &Db, ids: &[Uuid]) -> StoreResult<Vec<KeyWithOwner>> {
    let rows = sqlx::query_as::<_, KeyWithOwner>(&format!("{KEY_WITH_OWNER} where k.id = any($1)"))
        .bind(ids)
        .fetch_all(&db.pool)
        .await?;
    Ok(rows)
}

pub async fn get_for_user(db: &Db, user_id: Uuid, id: Uuid) -> StoreResult<Option<ApiKeyRow>> {
    let row = sqlx::query_as::<_, ApiKeyRow>(&format!(
        "select {KEY_COLUMNS} from api_keys where id = $1 and user_id = $2"
    ))
    .bind(id)
    .bind(user_id)
    .fetch_optional(&db.pool)
    .await?;
    Ok(row)
}

/// Same, locking the row for a revoke or rotate in `tx`.
pub async fn lock_for_user(tx: &mut Tx, user_id: Uuid, id: Uuid) -> StoreResult<Option<ApiKeyRow>> {
    let row = sqlx::query_as::<_, ApiKeyRow>(&format!(
        "select {KEY_COLUMNS} from api_keys where id = $1 and user_id = $2 for update"
    ))
    .bind(id)
    .bind(user_id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row)
}

/// Newest first (ids are UUIDv7, so id order is creation order); `before` is the
/// last id of the previous page.
pub async fn list_for_user(
    db: &Db,
    user_id: Uuid,
    before: Option<Uuid>,
    limit: i64,
) -> StoreResult<Vec<ApiKeyRow>> {
    let rows = sqlx::query_as::<_, ApiKeyRow>(&format!(
        "select {KEY_COLUMNS} from api_keys
         where user_id = $1 and ($2::uuid is null or id < $2)
         order by id desc limit $3"
    ))
    .bind(user_id)
    .bind(before)
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows)
}

/// Marks the key revoked; false when it already was.
pub async fn revoke(tx: &mut Tx, id: Uuid, reason: RevocationReason) -> StoreResult<bool> {
    let done = sqlx::query(
        "update api_keys set revoked_at = now(), revoked_reason = $2
         where id = $1 and revoked_at is null",
    )
    .bind(id)
    .bind(reason.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The scopes an API key may carry, from the seeded catalog.
pub async fn grantable_scopes(db: &Db) -> StoreResult<Vec<(String, bool)>> {
    let rows = sqlx::query_as::<_, (String, bool)>("select name, api_key_grantable from scopes")
        .fetch_all(&db.pool)
        .await?;
    Ok(rows)
}
#[derive(Debug, Clone, FromRow)]
pub struct UsageRow {
    pub id: i64,
    pub used_at: DateTime<Utc>,
    pub ip: Option<String>,
    pub operation: String,
    pub result: String,
    pub request_count: i32,
}

/// Newest first; `before` is the (used_at, id) of the previous page's last row.
pub async fn usage_page(
    db: &Db,
    key_id: Uuid,
    before: Option<(DateTime<Utc>, i64)>,
    limit: i64,
) -> StoreResult<Vec<UsageRow>> {
    let (t, id) = before.unzip();
    let rows = sqlx::query_as::<_, UsageRow>(
        "select id, used_at, ip, operation, result, request_count from api_key_usage_logs
         where api_key_id = $1
           and ($2::timestamptz is null or (used_at, id) < ($2, $3))
         order by used_at desc, id desc limit $4",
    )
    .bind(key_id)
    .bind(t)
    .bind(id)
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows)
}

/// Identical uses of a key within one flush window, as one usage row.
#[derive(Debug, Clone, Copy)]
pub struct NewUsage<'a> {
    pub key_id: Uuid,
    /// The last of the uses.
    pub used_at: DateTime<Utc>,
    pub ip: Option<std::net::IpAddr>,
    pub operation: &'a str,
    pub result: &'a str,
    pub count: i32,
}

/// Writes a batch of usage rows in `tx`: one multi-row INSERT, and one UPDATE
/// of last_used_at for every key used successfully. Rows of keys deleted
/// meanwhile are skipped.
pub async fn record_usage(tx: &mut Tx, batch: &[NewUsage<'_>]) -> StoreResult<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = batch.iter().map(|u| u.key_id).collect();
    let times: Vec<DateTime<Utc>> = batch.iter().map(|u| u.used_at).collect();
    let ips: Vec<Option<String>> = batch.iter().map(|u| u.ip.map(|i| i.to_string())).collect();
    let ops: Vec<&str> = batch.iter().map(|u| u.operation).collect();
    let results: Vec<&str> = batch.iter().map(|u| u.result).collect();
    let counts: Vec<i32> = batch.iter().map(|u| u.count).collect();

    sqlx::query(
        "insert into api_key_usage_logs (api_key_id, used_at, ip, operation, result, request_count)
         select u.id, u.t, u.ip, u.op, u.res, u.n
         from unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::int4[])
              as u(id, t, ip, op, res, n)
         join api_keys k on k.id = u.id",
    )
    .bind(&ids)
    .bind(&times)
    .bind(&ips)
    .bind(&ops)
    .bind(&results)
    .bind(&counts)
    .execute(&mut **tx)
    .await?;
    // Only successful uses move last_used_at: a refused attempt is not a use.
    sqlx::query(
        "update api_keys k set last_used_at = greatest(k.last_used_at, v.t)
         from (select u.id, max(u.t) as t
               from unnest($1::uuid[], $2::timestamptz[], $3::text[]) as u(id, t, res)
               where u.res = 'ok' group by u.id) v
         where k.id = v.id",
    )
    .bind(&ids)
    .bind(&times)
    .bind(&results)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
