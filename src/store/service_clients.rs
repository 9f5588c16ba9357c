//! Service clients (internal callers); secrets only as hashes (SHA-256, or
//! argon2id for secrets issued before).

use uuid::Uuid;

use super::{Db, StoreResult, Tx};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ServiceClientRecord {
    pub id: Uuid,
    pub client_id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub secret_hash: Option<String>,
    /// `status = 'active'` (`service_clients_status_check`: active or disabled).
    pub active: bool,
}

pub async fn by_client_id(db: &Db, client_id: &str) -> StoreResult<Option<ServiceClientRecord>> {
    Ok(sqlx::query_as::<_, ServiceClientRecord>(
        "select id, client_id, name, scopes, secret_hash, status = 'active' as active
           from service_clients where client_id = $1",
    )
    .bind(client_id)
    .fetch_optional(&db.pool)
    .await?)
}

pub async fn insert(
    tx: &mut Tx,
    client_id: &str,
    name: &str,
    scopes: &[String],
    secret_hash: &str,
) -> StoreResult<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(
        "insert into service_clients (id, client_id, name, scopes, secret_hash, secret_rotated_at)
         values ($1, $2, $3, $4, $5, now())",
    )
    .bind(id)
    .bind(client_id)
    .bind(name)
    .bind(scopes)
    .bind(secret_hash)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

/// Replaces the secret; returns false for an unknown client.
pub async fn set_secret(tx: &mut Tx, client_id: &str, secret_hash: &str) -> StoreResult<bool> {
    let n = sqlx::query(
        "update service_clients set secret_hash = $2, secret_rotated_at = now(), updated_at = now()
          where client_id = $1",
    )
    .bind(client_id)
    .bind(secret_hash)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// Replaces a secret's stored form by another of the same secret (not a
/// rotation), unless the secret changed meanwhile.
pub async fn upgrade_secret_hash(
    db: &Db,
    client_id: &str,
    old_hash: &str,
    new_hash: &str,
) -> StoreResult<()> {
    sqlx::query(
        "update service_clients set secret_hash = $3
          where client_id = $1 and secret_hash = $2",
    )
    .bind(client_id)
    .bind(old_hash)
    .bind(new_hash)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Scopes a service client may be given: the catalog plus the service scopes.
pub async fn known_scopes(db: &Db) -> StoreResult<Vec<String>> {
    Ok(sqlx::query_scalar::<_, String>("select name from scopes")
        .fetch_all(&db.pool)
        .await?)
}
