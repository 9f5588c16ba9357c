//! Trading accounts, their sealed credentials and their memberships. Reads of an
//! account never select the ciphertext columns; only `sealed_credentials` does.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, StoreError, StoreResult, Tx};
use crate::domain::account::{
    Access, AccountAccess, AccountStatus, Member, MemberRole, SubscriptionStatus, SubscriptionTier,
    TradingAccount,
};

/// The public columns of `trading_accounts a`; no ciphertext.
const COLUMNS: &str = "a.id, a.owner_user_id, a.broker, a.broker_user_id, a.nickname, a.status,
    a.subscription_tier, a.subscription_status, a.subscription_expires_at,
    (a.api_key_ciphertext is not null) as has_credentials, a.credentials_updated_at,
    a.credentials_hint, a.created_at";

#[derive(sqlx::FromRow)]
struct AccountRow {
    id: Uuid,
    owner_user_id: Uuid,
    broker: String,
    broker_user_id: String,
    nickname: String,
    status: String,
    subscription_tier: String,
    subscription_status: String,
    subscription_expires_at: Option<DateTime<Utc>>,
    has_credentials: bool,
    credentials_updated_at: Option<DateTime<Utc>>,
    credentials_hint: Option<String>,
    created_at: DateTime<Utc>,
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!("trading_accounts holds {what} {value:?}"))
}

impl TryFrom<AccountRow> for TradingAccount {
    type Error = StoreError;
    fn try_from(r: AccountRow) -> Result<Self, StoreError> {
        Ok(TradingAccount {
            id: r.id,
            owner_user_id: r.owner_user_id,
            status: AccountStatus::parse(&r.status).map_err(|_| corrupt("status", &r.status))?,
            subscription_tier: SubscriptionTier::parse(&r.subscription_tier)
                .map_err(|_| corrupt("subscription_tier", &r.subscription_tier))?,
            subscription_status: SubscriptionStatus::parse(&r.subscription_status)
                .map_err(|_| corrupt("subscription_status", &r.subscription_status))?,
            broker: r.broker,
            broker_user_id: r.broker_user_id,
            nickname: r.nickname,
            subscription_expires_at: r.subscription_expires_at,
            has_credentials: r.has_credentials,
            credentials_updated_at: r.credentials_updated_at,
            credentials_hint: r.credentials_hint,
            created_at: r.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct AccessRow {
    #[sqlx(flatten)]
    account: AccountRow,
    access: Option<String>,
}

impl AccessRow {
    fn into_parts(self) -> StoreResult<(TradingAccount, Option<Access>)> {
        let access = match self.access.as_deref() {
            None => None,
            Some(s) => Some(Access::parse(s).ok_or_else(|| corrupt("member role", s))?),
        };
        Ok((self.account.try_into()?, access))
    }
}

/// The user's standing on an account: owner, or the role of a live membership.
const ACCESS_JOIN: &str = "from trading_accounts a
    left join trading_account_memberships m
           on m.trading_account_id = a.id and m.user_id = $1 and m.revoked_at is null";
const ACCESS_EXPR: &str = "case when a.owner_user_id = $1 then 'owner' else m.role end as access";

pub struct NewAccount<'a> {
    pub id: Uuid,
    pub owner_user_id: Uuid,
    pub broker: &'a str,
    pub broker_user_id: &'a str,
    pub nickname: &'a str,
    pub subscription_tier: SubscriptionTier,
}

pub async fn insert(tx: &mut Tx, a: &NewAccount<'_>) -> StoreResult<TradingAccount> {
    let row: AccountRow = sqlx::query_as(&format!(
        "insert into trading_accounts as a (id, owner_user_id, broker, broker_user_id, nickname, subscription_tier)
         values ($1, $2, $3, $4, $5, $6) returning {COLUMNS}"
    ))
    .bind(a.id)
    .bind(a.owner_user_id)
    .bind(a.broker)
    .bind(a.broker_user_id)
    .bind(a.nickname)
    .bind(a.subscription_tier.as_str())
    .fetch_one(&mut **tx)
    .await?;
    row.try_into()
}

/// A live (not deleted) account.
pub async fn get_live(db: &Db, id: Uuid) -> StoreResult<Option<TradingAccount>> {
    let row: Option<AccountRow> = sqlx::query_as(&format!(
        "select {COLUMNS} from trading_accounts a where a.id = $1 and a.deleted_at is null"
    ))
    .bind(id)
    .fetch_optional(&db.pool)
    .await?;
    row.map(TradingAccount::try_from).transpose()
}

/// Locks a live account's row until the transaction ends; false when there is
/// no such live account. Every change to an account, its credentials or its
/// memberships takes this lock first, so they are serialised per account.
pub async fn lock_live(tx: &mut Tx, account_id: Uuid) -> StoreResult<bool> {
    let locked: Option<i32> = sqlx::query_scalar(
        "select 1 from trading_accounts where id = $1 and deleted_at is null for update",
    )
    .bind(account_id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(locked.is_some())
}

/// A live account and the user's access to it (`None` access: no standing). With
/// `for_update`, the account row is locked until the transaction ends, so
/// membership changes on one account are serialised, and the access is read
/// after the lock is held. One `select … for update` joining the membership
/// would not do: under READ COMMITTED a statement that waited for the lock still
/// joins the membership rows of the snapshot it started with, so a caller demoted
/// or removed by the transaction it waited for would act on its old role.
pub async fn get_with_access(
    tx: &mut Tx,
    user_id: Uuid,
    account_id: Uuid,
    for_update: bool,
) -> StoreResult<Option<(TradingAccount, Option<Access>)>> {
    if for_update && !lock_live(tx, account_id).await? {
        return Ok(None);
    }
    let row: Option<AccessRow> = sqlx::query_as(&WITH_ACCESS)
        .bind(user_id)
        .bind(account_id)
        .fetch_optional(&mut **tx)
        .await?;
    row.map(AccessRow::into_parts).transpose()
}

/// The user's access on a live account, outside any transaction (the cached
/// answer of CheckAccountAccess and API-key checks); `None` without standing or
/// without such an account.
pub async fn access_of(db: &Db, user_id: Uuid, account_id: Uuid) -> StoreResult<Option<Access>> {
    let row: Option<AccessRow> = sqlx::query_as(&WITH_ACCESS)
        .bind(user_id)
        .bind(account_id)
        .fetch_optional(&db.pool)
        .await?;
    Ok(row
        .map(AccessRow::into_parts)
        .transpose()?
        .and_then(|(_, a)| a))
}

/// One live account (`$2`) with user `$1`'s access to it.
static WITH_ACCESS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "select {COLUMNS}, {ACCESS_EXPR} {ACCESS_JOIN}
          where a.id = $2 and a.deleted_at is null"
    )
});

/// Keyset position in a list ordered by (created_at, id): the last row seen.
pub type After = (DateTime<Utc>, Uuid);

/// Live accounts the user owns or is a live member of, oldest first; at most
/// `limit` after `after`, and only those in `only` when given.
pub async fn list_for_user(
    db: &super::Db,
    user_id: Uuid,
    only: Option<&[Uuid]>,
    after: Option<After>,
    limit: i64,
) -> StoreResult<Vec<AccountAccess>> {
    let rows: Vec<AccessRow> = sqlx::query_as(&format!(
        "select {COLUMNS}, {ACCESS_EXPR} {ACCESS_JOIN}
          where a.deleted_at is null
            and (a.owner_user_id = $1 or m.id is not null)
            and ($2::timestamptz is null or (a.created_at, a.id) > ($2, $3))
            and ($5::uuid[] is null or a.id = any($5))
          order by a.created_at, a.id
          limit $4"
    ))
    .bind(user_id)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .bind(only)
    .fetch_all(&db.pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            let (account, access) = r.into_parts()?;
            let access = access.ok_or_else(|| corrupt("listed account without access", ""))?;
            Ok(AccountAccess { account, access })
        })
        .collect()
}

#[derive(Debug, Default)]
pub struct AccountChanges<'a> {
    pub nickname: Option<&'a str>,
    pub status: Option<AccountStatus>,
    pub subscription_tier: Option<SubscriptionTier>,
    pub subscription_status: Option<SubscriptionStatus>,
    /// `Some(None)` clears the expiry.
    pub subscription_expires_at: Option<Option<DateTime<Utc>>>,
}

pub async fn update(tx: &mut Tx, id: Uuid, c: &AccountChanges<'_>) -> StoreResult<TradingAccount> {
    let row: AccountRow = sqlx::query_as(&format!(
        "update trading_accounts as a set
            nickname = coalesce($2, a.nickname),
            status = coalesce($3, a.status),
            subscription_tier = coalesce($4, a.subscription_tier),
            subscription_status = coalesce($5, a.subscription_status),
            subscription_expires_at = case when $6 then $7 else a.subscription_expires_at end,
            updated_at = now()
          where a.id = $1 and a.deleted_at is null
          returning {COLUMNS}"
    ))
    .bind(id)
    .bind(c.nickname)
    .bind(c.status.map(|s| s.as_str()))
    .bind(c.subscription_tier.map(|s| s.as_str()))
    .bind(c.subscription_status.map(|s| s.as_str()))
    .bind(c.subscription_expires_at.is_some())
    .bind(c.subscription_expires_at.flatten())
    .fetch_optional(&mut **tx)
    .await?
    .ok_or(StoreError::NotFound("trading account"))?;
    row.try_into()
}

/// Soft delete: the row stays (the audit trail points at it), every live
/// membership ends. Returns the users whose membership ended.
pub async fn soft_delete(tx: &mut Tx, id: Uuid) -> StoreResult<Vec<Uuid>> {
    let done = sqlx::query(
        "update trading_accounts set deleted_at = now(), status = 'deleted', updated_at = now()
          where id = $1 and deleted_at is null",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound("trading account"));
    }
    Ok(sqlx::query_scalar(
        "update trading_account_memberships set revoked_at = now(), updated_at = now()
          where trading_account_id = $1 and revoked_at is null
          returning user_id",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?)
}

/// The three credential ciphertexts of one account and the key that sealed them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SealedCredentials {
    pub api_key_ciphertext: Vec<u8>,
    pub api_secret_ciphertext: Vec<u8>,
    pub access_token_ciphertext: Option<Vec<u8>>,
    pub credentials_key_id: String,
}

pub async fn set_credentials(
    tx: &mut Tx,
    id: Uuid,
    sealed: &SealedCredentials,
    hint: &str,
) -> StoreResult<()> {
    let done = sqlx::query(
        "update trading_accounts set api_key_ciphertext = $2, api_secret_ciphertext = $3,
                access_token_ciphertext = $4, credentials_key_id = $5, credentials_hint = $6,
                credentials_updated_at = now(), updated_at = now()
          where id = $1 and deleted_at is null",
    )
    .bind(id)
    .bind(&sealed.api_key_ciphertext)
    .bind(&sealed.api_secret_ciphertext)
    .bind(&sealed.access_token_ciphertext)
    .bind(&sealed.credentials_key_id)
    .bind(hint)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound("trading account"));
    }
    Ok(())
}

/// The sealed credentials of a live account; `None` when it has none.
pub async fn sealed_credentials(db: &Db, id: Uuid) -> StoreResult<Option<SealedCredentials>> {
    Ok(sqlx::query_as(
        "select api_key_ciphertext, api_secret_ciphertext, access_token_ciphertext, credentials_key_id
           from trading_accounts
          where id = $1 and deleted_at is null and api_key_ciphertext is not null",
    )
    .bind(id)
    .fetch_optional(&db.pool)
    .await?)
}

/// Accounts (deleted ones too: their ciphertext still needs the old key) whose
/// credentials are sealed under another key than `active_kid`.
pub async fn ids_sealed_with_other_key(db: &Db, active_kid: &str) -> StoreResult<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "select id from trading_accounts
          where credentials_key_id is not null and credentials_key_id <> $1
          order by id",
    )
    .bind(active_kid)
    .fetch_all(&db.pool)
    .await?)
}

/// Locks one account's sealed credentials for re-encryption, whatever its state.
pub async fn sealed_for_update(tx: &mut Tx, id: Uuid) -> StoreResult<Option<SealedCredentials>> {
    Ok(sqlx::query_as(
        "select api_key_ciphertext, api_secret_ciphertext, access_token_ciphertext, credentials_key_id
           from trading_accounts where id = $1 and api_key_ciphertext is not null
          for update",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?)
}

/// Replaces the ciphertexts without touching `credentials_updated_at`: the
/// credentials did not change, only the key that protects them.
pub async fn reseal(tx: &mut Tx, id: Uuid, sealed: &SealedCredentials) -> StoreResult<()> {
    sqlx::query(
        "update trading_accounts set api_key_ciphertext = $2, api_secret_ciphertext = $3,
                access_token_ciphertext = $4, credentials_key_id = $5
          where id = $1",
    )
    .bind(id)
    .bind(&sealed.api_key_ciphertext)
    .bind(&sealed.api_secret_ciphertext)
    .bind(&sealed.access_token_ciphertext)
    .bind(&sealed.credentials_key_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct MemberRow {
    user_id: Uuid,
    email: String,
    role: String,
    added_at: DateTime<Utc>,
}

impl TryFrom<MemberRow> for Member {
    type Error = StoreError;
    fn try_from(r: MemberRow) -> Result<Self, StoreError> {
        Ok(Member {
            role: MemberRole::parse(&r.role).map_err(|_| corrupt("member role", &r.role))?,
            user_id: r.user_id,
            email: r.email,
            added_at: r.added_at,
        })
    }
}

/// Live members, oldest first; at most `limit` after `after` (added_at, user_id).
pub async fn list_members(
    db: &Db,
    account_id: Uuid,
    after: Option<After>,
    limit: i64,
) -> StoreResult<Vec<Member>> {
    let rows: Vec<MemberRow> = sqlx::query_as(
        "select m.user_id, u.email, m.role, m.created_at as added_at
           from trading_account_memberships m join users u on u.id = m.user_id
          where m.trading_account_id = $1 and m.revoked_at is null
            and ($2::timestamptz is null or (m.created_at, m.user_id) > ($2, $3))
          order by m.created_at, m.user_id
          limit $4",
    )
    .bind(account_id)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    rows.into_iter().map(Member::try_from).collect()
}

pub async fn user_exists(db: &Db, id: Uuid) -> StoreResult<bool> {
    Ok(
        sqlx::query_scalar("select exists (select 1 from users where id = $1)")
            .bind(id)
            .fetch_one(&db.pool)
            .await?,
    )
}

/// An active user's id and email, by id or by email (case-insensitive).
pub async fn find_active_user(
    tx: &mut Tx,
    id: Option<Uuid>,
    email: Option<&str>,
) -> StoreResult<Option<(Uuid, String)>> {
    Ok(sqlx::query_as(
        "select id, email from users
          where status = 'active'
            and (($1::uuid is not null and id = $1) or ($2::text is not null and lower(email) = lower($2)))
          limit 1",
    )
    .bind(id)
    .bind(email)
    .fetch_optional(&mut **tx)
    .await?)
}

/// A new live membership; a live one for the same user already → Conflict (the
/// partial unique index decides between concurrent adds).
pub async fn add_member(
    tx: &mut Tx,
    account_id: Uuid,
    user_id: Uuid,
    role: MemberRole,
    granted_by: Uuid,
) -> StoreResult<DateTime<Utc>> {
    Ok(sqlx::query_scalar(
        "insert into trading_account_memberships (id, trading_account_id, user_id, role, granted_by)
         values ($1, $2, $3, $4, $5) returning created_at",
    )
    .bind(Uuid::now_v7())
    .bind(account_id)
    .bind(user_id)
    .bind(role.as_str())
    .bind(granted_by)
    .fetch_one(&mut **tx)
    .await?)
}

/// The live membership's role, locked for the rest of the transaction.
pub async fn member_role_for_update(
    tx: &mut Tx,
    account_id: Uuid,
    user_id: Uuid,
) -> StoreResult<Option<MemberRole>> {
    let role: Option<String> = sqlx::query_scalar(
        "select role from trading_account_memberships
          where trading_account_id = $1 and user_id = $2 and revoked_at is null
          for update",
    )
    .bind(account_id)
    .bind(user_id)
    .fetch_optional(&mut **tx)
    .await?;
    role.map(|r| MemberRole::parse(&r).map_err(|_| corrupt("member role", &r)))
        .transpose()
}

pub async fn set_member_role(
    tx: &mut Tx,
    account_id: Uuid,
    user_id: Uuid,
    role: MemberRole,
) -> StoreResult<Member> {
    let row: MemberRow = sqlx::query_as(
        "update trading_account_memberships m set role = $3, updated_at = now()
           from users u
          where u.id = m.user_id and m.trading_account_id = $1 and m.user_id = $2
            and m.revoked_at is null
          returning m.user_id, u.email, m.role, m.created_at as added_at",
    )
    .bind(account_id)
    .bind(user_id)
    .bind(role.as_str())
    .fetch_optional(&mut **tx)
    .await?
    .ok_or(StoreError::NotFound("member"))?;
    row.try_into()
}

pub async fn remove_member(tx: &mut Tx, account_id: Uuid, user_id: Uuid) -> StoreResult<()> {
    let done = sqlx::query(
        "update trading_account_memberships set revoked_at = now(), updated_at = now()
          where trading_account_id = $1 and user_id = $2 and revoked_at is null",
    )
    .bind(account_id)
    .bind(user_id)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound("member"));
    }
    Ok(())
}
