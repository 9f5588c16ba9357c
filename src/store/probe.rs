//! Whether the stores answer, for health checks and metrics: the only view of
//! the stores the transports get.

use super::db::PoolStats;
use super::{Cache, Db};

/// Cheap to clone.
#[derive(Clone)]
pub struct HealthProbe {
    db: Db,
    cache: Cache,
}

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreHealth {
    pub database: bool,
    pub redis: bool,
}

impl HealthProbe {
    pub fn new(db: Db, cache: Cache) -> Self {
        Self { db, cache }
    }

    /// Both stores, at once (each bounded: a second for PostgreSQL, Redis's
    /// command timeout).
    pub async fn check(&self) -> StoreHealth {
        let (database, redis) = tokio::join!(self.db.ping(), self.cache.ping());
        StoreHealth { database, redis }
    }

    /// PostgreSQL only: gRPC health follows the database.
    pub async fn database(&self) -> bool {
        self.db.ping().await
    }

    /// The request pool's occupancy.
    pub fn pool(&self) -> PoolStats {
        self.db.pool_stats()
    }
}
