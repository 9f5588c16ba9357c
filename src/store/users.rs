//! Users and their roles.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{StoreError, StoreResult};
use crate::domain::user::User;

/// A user row with the password hash, which never leaves the service layer.
#[derive(Debug, sqlx::FromRow)]
pub struct UserRecord {
    pub id: Uuid,
    pub email: String,
    pub full_name: String,
    pub password_hash: Option<String>,
    pub status: String,
    pub email_verified: bool,
    pub created_at: DateTime<Utc>,
    pub roles: Vec<String>,
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
    conn: &mut PgConnection,
    id: Uuid,
    email: &str,
    full_name: &str,
    password_hash: &str,
    roles: &[String],
) -> StoreResult<UserRecord> {
    sqlx::query("insert into users (id, email, full_name, password_hash) values ($1, $2, $3, $4)")
        .bind(id)
        .bind(email)
        .bind(full_name)
        .bind(password_hash)
        .execute(&mut *conn)
        .await?;
    set_roles(&mut *conn, id, roles).await?;
    by_id(conn, id).await?.ok_or(StoreError::NotFound("user"))
}

/// Replaces the user's roles; unknown role names are ignored (the caller checks).
pub async fn set_roles(
    conn: &mut PgConnection,
    user_id: Uuid,
    roles: &[String],
) -> StoreResult<()> {
    sqlx::query("delete from user_roles where user_id = $1")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "insert into user_roles (user_id, role_id) select $1, id from roles where name = any($2)",
    )
    .bind(user_id)
    .bind(roles)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn by_email(pool: &PgPool, email: &str) -> StoreResult<Option<UserRecord>> {
    Ok(
        sqlx::query_as::<_, UserRecord>(&format!("{SELECT} where lower(u.email) = lower($1)"))
            .bind(email)
            .fetch_optional(pool)
            .await?,
    )
}

pub async fn by_id(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<UserRecord>> {
    Ok(
        sqlx::query_as::<_, UserRecord>(&format!("{SELECT} where u.id = $1"))
            .bind(id)
            .fetch_optional(conn)
            .await?,
    )
}

pub async fn get(pool: &PgPool, id: Uuid) -> StoreResult<Option<UserRecord>> {
    Ok(
        sqlx::query_as::<_, UserRecord>(&format!("{SELECT} where u.id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

/// Locks the row for the rest of the transaction (password change, admin edits).
pub async fn lock(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<UserRecord>> {
    Ok(
        sqlx::query_as::<_, UserRecord>(&format!("{SELECT} where u.id = $1 for update of u"))
            .bind(id)
            .fetch_optional(conn)
            .await?,
    )
}

pub async fn set_full_name(conn: &mut PgConnection, id: Uuid, full_name: &str) -> StoreResult<()> {
    sqlx::query("update users set full_name = $2, updated_at = now() where id = $1")
        .bind(id)
        .bind(full_name)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_password_hash(conn: &mut PgConnection, id: Uuid, hash: &str) -> StoreResult<()> {
    sqlx::query("update users set password_hash = $2, updated_at = now() where id = $1")
        .bind(id)
        .bind(hash)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_status(conn: &mut PgConnection, id: Uuid, status: &str) -> StoreResult<()> {
    sqlx::query("update users set status = $2, updated_at = now() where id = $1")
        .bind(id)
        .bind(status)
        .execute(conn)
        .await?;
    Ok(())
}

/// Admin listing: newest first, keyset-paginated on (created_at, id).
pub async fn list(
    pool: &PgPool,
    email_contains: Option<&str>,
    status: Option<&str>,
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
    Ok(sqlx::query_as::<_, UserRecord>(&format!(
        "{SELECT}
          where ($1::text is null or lower(u.email) like $1)
            and ($2::text is null or u.status = $2)
            and ($3::timestamptz is null or (u.created_at, u.id) < ($3, $4))
          order by u.created_at desc, u.id desc
          limit $5"
    ))
    .bind(pattern)
    .bind(status)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
