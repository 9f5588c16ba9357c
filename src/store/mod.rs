//! PostgreSQL (sqlx) and Redis (fred). Nothing above this module sees sqlx::Error
//! or fred types: failures come out as `StoreError` with meaning attached.

pub mod accounts;
pub mod api_keys;
pub mod audit;
pub mod audit_log;
pub mod bus;
pub mod db;
pub mod invitations;
pub mod policies;
pub mod redis;
pub mod service_clients;
pub mod sessions;
pub mod users;

pub use db::Db;
pub use redis::Cache;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique or exclusion constraint: the string names what clashed.
    #[error("{0}")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Other(anyhow::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => StoreError::NotFound("row"),
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                StoreError::Unavailable("database unavailable".into())
            }
            sqlx::Error::Database(db) => match db.constraint() {
                Some(c) if db.is_unique_violation() => StoreError::Conflict(conflict_message(c)),
                _ => StoreError::Other(e.into()),
            },
            _ => StoreError::Other(e.into()),
        }
    }
}

/// Gives a named unique constraint its meaning for callers.
fn conflict_message(constraint: &str) -> String {
    match constraint {
        "users_email_lower_key" => "email is already registered".into(),
        "trading_account_memberships_active_key" => "user is already a member".into(),
        "trading_account_invitations_pending_key" => {
            "an invitation for this email is already pending".into()
        }
        "trading_accounts_owner_broker_key" => {
            "a trading account for this broker login already exists".into()
        }
        "service_clients_client_id_key" => "service client already exists".into(),
        other => format!("conflict on {other}"),
    }
}
