//! The PostgreSQL pool and migrations.

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::StoreResult;
use crate::config::Settings;
use crate::domain::audit::AuditEntry;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL pool. Only store/ runs statements on it: the service reads
/// through store functions taking `&Db` and writes in a `Tx`.
#[derive(Clone)]
pub struct Db {
    // pub(crate) until every service file reads through store functions.
    pub(super) pool: PgPool,
}

impl Db {
    /// Connects lazily, so the service starts (and reports NOT_SERVING) while the
    /// database is down, and recovers when it comes back. Every statement is
    /// bounded by DATABASE_STATEMENT_TIMEOUT_MS (set at connection start), and a
    /// request waits at most DATABASE_ACQUIRE_TIMEOUT_MS for a connection.
    pub fn connect_lazy(settings: &Settings) -> anyhow::Result<Self> {
        Self::connect_with_statement_timeout(settings, settings.database_statement_timeout_ms)
    }

    /// For migrations and operator commands: no statement timeout (an index
    /// build may take minutes).
    pub fn connect_unbounded(settings: &Settings) -> anyhow::Result<Self> {
        Self::connect_with_statement_timeout(settings, 0)
    }

    fn connect_with_statement_timeout(
        settings: &Settings,
        timeout_ms: u64,
    ) -> anyhow::Result<Self> {
        let opts: PgConnectOptions = settings
            .database_url
            .expose_secret()
            .parse()
            .map_err(|_| anyhow::anyhow!("DATABASE_URL is not a valid PostgreSQL URL"))?;
        let opts = opts
            .application_name("user-service")
            .options([("statement_timeout", timeout_ms.to_string())]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.database_max_connections)
            .min_connections(0)
            .acquire_timeout(Duration::from_millis(settings.database_acquire_timeout_ms))
            .idle_timeout(Duration::from_secs(300))
            .connect_lazy_with(opts);
        Ok(Self { pool })
    }

    /// The schema owner's pool for `migrate`: DATABASE_MIGRATION_URL, or
    /// DATABASE_URL when it is unset (development).
    pub fn connect_migrator(settings: &Settings) -> anyhow::Result<Self> {
        match &settings.database_migration_url {
            None => Self::connect_unbounded(settings),
            Some(url) => {
                let mut owner = settings.clone();
                owner.database_url = url.clone();
                Self::connect_unbounded(&owner).map_err(|_| {
                    anyhow::anyhow!("DATABASE_MIGRATION_URL is not a valid PostgreSQL URL")
                })
            }
        }
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// `select 1` within a second: the readiness signal for health checks.
    pub async fn ping(&self) -> bool {
        matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                sqlx::query_scalar::<_, i32>("select 1").fetch_one(&self.pool)
            )
            .await,
            Ok(Ok(1))
        )
    }

    /// Whether this pool's connections to PostgreSQL are encrypted (TLS).
    pub async fn uses_tls(&self) -> StoreResult<bool> {
        Ok(sqlx::query_scalar::<_, bool>(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Closes every connection (waits for those in use to come back).
    pub async fn close(&self) {
        self.pool.close().await
    }

    /// Pool occupancy for the metrics endpoint.
    pub fn pool_stats(&self) -> PoolStats {
        PoolStats {
            size: self.pool.size(),
            idle: self.pool.num_idle() as u32,
            max: self.pool.options().get_max_connections(),
        }
    }

    /// Opens a unit of work: every write of one use case, and its audit rows,
    /// commit or roll back together. Dropped without `commit`, it rolls back.
    pub async fn begin(&self) -> StoreResult<Tx> {
        Ok(Tx(self.pool.begin().await?))
    }
}

/// One database transaction, as the service sees it: it can be committed and
/// can take audit rows; store functions do the rest on it.
pub struct Tx(sqlx::Transaction<'static, sqlx::Postgres>);

impl Tx {
    pub async fn commit(self) -> StoreResult<()> {
        Ok(self.0.commit().await?)
    }

    /// Writes an audit row inside this transaction, so it commits or rolls back
    /// with the change it describes.
    pub async fn audit(&mut self, entry: &AuditEntry) -> StoreResult<()> {
        super::audit::insert(&mut self.0, entry).await
    }
}

// Store functions take `&mut PgConnection`; a `&mut Tx` coerces to one. Only
// store/ can name PgConnection, so the service cannot run SQL on it.
impl std::ops::Deref for Tx {
    type Target = sqlx::PgConnection;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Connections open (`size`), of which `idle`, against the configured `max`.
#[derive(Clone, Copy, Debug)]
pub struct PoolStats {
    pub size: u32,
    pub idle: u32,
    pub max: u32,
}
