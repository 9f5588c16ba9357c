//! PostgreSQL (sqlx) and Redis (fred). Nothing above this module sees sqlx::Error
//! or fred types: failures come out as `StoreError` with meaning attached.

pub mod accounts;
pub mod api_keys;
pub mod audit;
pub mod audit_log;
pub mod bus;
pub mod db;
pub mod imports;
pub mod invitations;
pub mod login_failures;
pub mod mfa;
pub mod outbox;
pub mod passkeys;
pub mod policies;
pub mod probe;
pub mod recovery;
pub mod redis;
pub mod service_clients;
pub mod session_cache;
pub mod sessions;
pub mod users;

pub use db::{Db, Tx};
pub use probe::{HealthProbe, StoreHealth};
pub use redis::Cache;
pub use session_cache::SessionCache;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique or exclusion constraint: the string names what clashed.
    #[error("{0}")]
    Conflict(String),
    /// A unique constraint on one field the caller chose: the field (its JSON
    /// name) and what clashed.
    #[error("{message}")]
    Taken {
        field: &'static str,
        message: String,
    },
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
                Some(c) if db.is_unique_violation() => match conflict_field(c) {
                    Some(field) => StoreError::Taken {
                        field,
                        message: conflict_message(c),
                    },
                    None => StoreError::Conflict(conflict_message(c)),
                },
                _ => match db.code().as_deref().and_then(unavailable_reason) {
                    Some(reason) => {
                        tracing::warn!(sqlstate = db.code().as_deref(), error = %db, reason, "database unavailable");
                        StoreError::Unavailable(format!("database unavailable: {reason}"))
                    }
                    None => StoreError::Other(e.into()),
                },
            },
            _ => StoreError::Other(e.into()),
        }
    }
}

/// SQLSTATEs that mean "the database cannot serve this now, retry later" rather
/// than a bug: a statement that ran out of time, a server shutting down or
/// starting, too many connections.
fn unavailable_reason(sqlstate: &str) -> Option<&'static str> {
    Some(match sqlstate {
        "57014" => "statement timeout (or cancelled)",
        "57P01" => "server shutting down (admin shutdown)",
        "57P02" => "server crash shutdown",
        "57P03" => "server not accepting connections yet",
        "53300" => "too many connections",
        "55P03" => "lock not available",
        s if s.starts_with("08") => "connection failure",
        _ => return None,
    })
}

/// The request field a unique constraint holds, where one field decides it.
fn conflict_field(constraint: &str) -> Option<&'static str> {
    Some(match constraint {
        "users_email_lower_key" => "email",
        "trading_accounts_owner_broker_key" => "broker_user_id",
        _ => return None,
    })
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
