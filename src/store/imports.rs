//! Users moved in from the FastAPI user_service (`admin import-users`), and the
//! replacement of their legacy password hashes after their first login.

use uuid::Uuid;

use super::{Db, StoreResult, Tx};
use crate::domain::import::ImportedUser;
use crate::domain::user::Role;

/// Inserts the user with its roles unless the email is taken (whatever its case):
/// false then, and nothing is written. Idempotent, so an import can be re-run.
pub async fn insert(tx: &mut Tx, id: Uuid, user: &ImportedUser) -> StoreResult<bool> {
    let inserted = sqlx::query(
        "insert into users (id, email, full_name, password_hash, status, email_verified,
                            created_at, updated_at)
         values ($1, $2, $3, $4, $5, $6, coalesce($7, now()), now())
         on conflict ((lower(email))) do nothing",
    )
    .bind(id)
    .bind(user.email.as_str())
    .bind(&user.full_name)
    .bind(&user.password_hash)
    .bind(user.status)
    .bind(user.email_verified)
    .bind(user.created_at)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if inserted {
        super::users::set_roles(tx, id, &Role::from_names(&user.roles)).await?;
    }
    Ok(inserted)
}

/// Whether a user has this email, whatever its case (a dry run's question).
pub async fn email_taken(db: &Db, email: &str) -> StoreResult<bool> {
    Ok(
        sqlx::query_scalar("select exists (select 1 from users where lower(email) = lower($1))")
            .bind(email)
            .fetch_one(&db.pool)
            .await?,
    )
}

/// Replaces the user's password hash if it is still `old`: a password changed
/// meanwhile is never overwritten. True when replaced.
pub async fn replace_password_hash(
    tx: &mut Tx,
    id: Uuid,
    old: &str,
    new: &str,
) -> StoreResult<bool> {
    Ok(sqlx::query(
        "update users set password_hash = $3, updated_at = now()
          where id = $1 and password_hash = $2",
    )
    .bind(id)
    .bind(old)
    .bind(new)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1)
}
