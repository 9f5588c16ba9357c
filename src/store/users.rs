//! Users and their roles.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Db, StoreError, StoreResult, Tx};
use crate::domain::mfa::Factors;
use crate::domain::user::{Role, User, UserStatus};

/// A user row with the password hash, which never leaves the service layer.
#[derive(Debug)]
pub struct UserRecord {
    pub id: Uuid,
    pub email: String,
    pub full_name: String,
    pub password_hash: Option<String>,
    pub status: UserStatus,
    pub email_verified: bool,
    pub created_at: DateTime<Utc>,
    pub roles: Vec<Role>,
}

/// The row as PostgreSQL answers it.
#[derive(sqlx::FromRow)]
struct UserRow {
    id: Uuid,
    email: String,
    full_name: String,
    password_hash: Option<String>,
    status: String,
    email_verified: bool,
    created_at: DateTime<Utc>,
    roles: Vec<String>,
}

impl TryFrom<UserRow> for UserRecord {
    type Error = StoreError;

    fn try_from(r: UserRow) -> StoreResult<Self> {
        Ok(UserRecord {
            status: user_status(&r.status)?,
            roles: Role::from_names(&r.roles),
            id: r.id,
            email: r.email,
            full_name: r.full_name,
            password_hash: r.password_hash,
            email_verified: r.email_verified,
            created_at: r.created_at,
        })
    }
}

/// `users_status_check` allows no other value.
pub(super) fn user_status(s: &str) -> StoreResult<UserStatus> {
    UserStatus::parse(s)
        .ok_or_else(|| StoreError::Other(anyhow::anyhow!("users.status holds {s:?}")))
}

fn names(roles: &[Role]) -> Vec<&'static str> {
    roles.iter().map(|r| r.as_str()).collect()
}

fn record(row: Option<UserRow>) -> StoreResult<Option<UserRecord>> {
    row.map(UserRecord::try_from).transpose()
}

impl UserRecord {
    pub fn into_user(self) -> User {
        User {
            id: self.id,
            email: self.email,
            full_name: self.full_name,
            roles: self.roles,
            status: self.status,
            email_verified: self.email_verified,
            created_at: self.created_at,
        }
    }
}

const SELECT: &str = "select u.id, u.email, u.full_name, u.password_hash, u.status, u.created_at,
        u.email_verified,
        coalesce(array(select r.name from user_roles ur join roles r on r.id = ur.role_id
                        where ur.user_id = u.id order by r.name), '{}') as roles
   from users u";

pub async fn insert(
    tx: &mut Tx,
    id: Uuid,
    email: &str,
    full_name: &str,
    password_hash: &str,
    roles: &[Role],
) -> StoreResult<UserRecord> {
    sqlx::query("insert into users (id, email, full_name, password_hash) values ($1, $2, $3, $4)")
        .bind(id)
        .bind(email)
        .bind(full_name)
        .bind(password_hash)
        .execute(&mut **tx)
        .await?;
    set_roles(tx, id, roles).await?;
    by_id(tx, id).await?.ok_or(StoreError::NotFound("user"))
}

/// Replaces the user's roles.
pub async fn set_roles(tx: &mut Tx, user_id: Uuid, roles: &[Role]) -> StoreResult<()> {
    sqlx::query("delete from user_roles where user_id = $1")
        .bind(user_id)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "insert into user_roles (user_id, role_id) select $1, id from roles where name = any($2)",
    )
    .bind(user_id)
    .bind(names(roles))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn by_email(db: &Db, email: &str) -> StoreResult<Option<UserRecord>> {
    record(
        sqlx::query_as::<_, UserRow>(&format!("{SELECT} where lower(u.email) = lower($1)"))
            .bind(email)
            .fetch_optional(&db.pool)
            .await?,
    )
}

/// A login's first read, in one round trip: the user by email and their second
/// factors (as `mfa::factors` counts them).
pub async fn by_email_with_factors(
    db: &Db,
    email: &str,
) -> StoreResult<Option<(UserRecord, Factors)>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        user: UserRow,
        totp: bool,
        passkeys: i64,
        recovery_codes_left: i64,
    }
    let row = sqlx::query_as::<_, Row>(&format!(
        "select u.*, {} from ({SELECT} where lower(u.email) = lower($1)) u",
        super::mfa::factor_columns("u.id")
    ))
    .bind(email)
    .fetch_optional(&db.pool)
    .await?;
    row.map(|r| {
        let factors = Factors {
            totp: r.totp,
            passkeys: r.passkeys,
            recovery_codes_left: r.recovery_codes_left,
        };
        Ok((UserRecord::try_from(r.user)?, factors))
    })
    .transpose()
}

pub async fn by_id(tx: &mut Tx, id: Uuid) -> StoreResult<Option<UserRecord>> {
    record(
        sqlx::query_as::<_, UserRow>(&format!("{SELECT} where u.id = $1"))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?,
    )
}

pub async fn get(db: &Db, id: Uuid) -> StoreResult<Option<UserRecord>> {
    record(
        sqlx::query_as::<_, UserRow>(&format!("{SELECT} where u.id = $1"))
            .bind(id)
            .fetch_optional(&db.pool)
            .await?,
    )
}

/// Locks the row for the rest of the transaction (password change, admin edits).
pub async fn lock(tx: &mut Tx, id: Uuid) -> StoreResult<Option<UserRecord>> {
    record(
        sqlx::query_as::<_, UserRow>(&format!("{SELECT} where u.id = $1 for update of u"))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?,
    )
}

pub async fn set_full_name(tx: &mut Tx, id: Uuid, full_name: &str) -> StoreResult<()> {
    sqlx::query("update users set full_name = $2, updated_at = now() where id = $1")
        .bind(id)
        .bind(full_name)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn set_password_hash(tx: &mut Tx, id: Uuid, hash: &str) -> StoreResult<()> {
    sqlx::query("update users set password_hash = $2, updated_at = now() where id = $1")
        .bind(id)
        .bind(hash)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn set_status(tx: &mut Tx, id: Uuid, status: UserStatus) -> StoreResult<()> {
    sqlx::query("update users set status = $2, updated_at = now() where id = $1")
        .bind(id)
        .bind(status.as_str())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Admin listing: newest first, keyset-paginated on (created_at, id).
pub async fn list(
    db: &Db,
    email_contains: Option<&str>,
    status: Option<UserStatus>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> StoreResult<Vec<UserRecord>> {
    let pattern = email_contains.map(|s| {
        format!(
            "%{}%",
            s.to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )
    });
    sqlx::query_as::<_, UserRow>(&format!(
        "{SELECT}
          where ($1::text is null or lower(u.email) like $1)
            and ($2::text is null or u.status = $2)
            and ($3::timestamptz is null or (u.created_at, u.id) < ($3, $4))
          order by u.created_at desc, u.id desc
          limit $5"
    ))
    .bind(pattern)
    .bind(status.map(UserStatus::as_str))
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(&db.pool)
    .await?
    .into_iter()
    .map(UserRecord::try_from)
    .collect()
}
