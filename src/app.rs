//! `App::build(settings)` wires stores → services → transports and binds the
//! listener (port 0 works for tests); `run_until_stopped()` serves gRPC and the
//! JSON gateway on that one port until the shutdown signal, then drains.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::shutdown::Shutdown;
use crate::store::{Cache, Db};
use crate::{grpc, http};

/// Everything a request handler may need; cheap to clone (one Arc).
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

pub struct AppInner {
    pub settings: Settings,
    pub db: Db,
    pub cache: Cache,
    pub shutdown: Shutdown,
    /// Background tasks that must finish (flush) before the process exits.
    pub tasks: TaskTracker,
    /// Users, sessions, tokens and service clients.
    pub identity: crate::service::identity::Identity,
    /// Roles and policies: CheckPermission and the scopes a user holds.
    pub policy: crate::service::policy::PolicyEngine,
    /// Trading accounts, memberships and broker credentials.
    pub accounts: crate::service::accounts::AccountsService,
    /// The audit trail, read by administrators.
    pub audit_log: crate::service::audit_log::AuditLog,
    /// Cross-replica cache invalidation: publish "key / user / account changed".
    pub invalidation: crate::service::invalidation::Invalidation,
    /// API keys and VerifyApiKey (cached, with the usage buffer).
    pub api_keys: crate::service::api_keys::ApiKeyService,
}

impl Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

pub struct App {
    listener: TcpListener,
    addr: SocketAddr,
    router: Router,
    state: AppState,
    health: grpc::Health,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let _ = crate::telemetry::metrics_handle();
        let db = Db::connect_lazy(&settings)?;
        let cache = Cache::connect(&settings)?;
        let addr = format!(
            "{}:{}",
            settings.user_service_host, settings.user_service_port
        );
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let addr = listener.local_addr()?;

        let key_ring = match &settings.credentials_encryption_keys {
            Some(spec) => Some(Arc::new(crate::crypto::aead::KeyRing::parse(spec)?)),
            None => None,
        };

        let invalidation = crate::service::invalidation::Invalidation::new(cache.clone());
        let identity = crate::service::identity::Identity::new(
            &settings,
            db.clone(),
            cache.clone(),
            invalidation.clone(),
        )?;
        let policy = crate::service::policy::PolicyEngine::new(db.clone(), &invalidation);
        let accounts = crate::service::accounts::AccountsService::new(
            db.clone(),
            key_ring,
            policy.clone(),
            invalidation.clone(),
        );
        let audit_log = crate::service::audit_log::AuditLog::new(db.clone(), policy.clone());
        let api_keys = crate::service::api_keys::ApiKeyService::new(
            &settings,
            db.clone(),
            cache.clone(),
            invalidation.clone(),
            policy.clone(),
            accounts.clone(),
        );
        let state = AppState(Arc::new(AppInner {
            settings,
            db,
            cache,
            shutdown: Shutdown::new(),
            tasks: TaskTracker::new(),
            identity,
            policy,
            accounts,
            audit_log,
            invalidation,
            api_keys,
        }));
        state
            .invalidation
            .start(state.shutdown.clone(), &state.tasks)
            .await;
        state.api_keys.usage_buffer().spawn_flusher(
            state.db.clone(),
            Duration::from_millis(state.settings.usage_log_flush_interval_ms),
            state.shutdown.clone(),
            &state.tasks,
        );

        let (grpc_routes, health) = grpc::routes(state.clone())?;
        let router = grpc_routes
            .into_axum_router()
            .merge(http::routes(state.clone()))
            .fallback(http::fallback)
            .method_not_allowed_fallback(http::method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(
                http::edge::EdgePolicy::new(&state.settings),
                http::edge::edge,
            ))
            .layer(axum::middleware::from_fn(http::observe::observe));

        Ok(Self {
            listener,
            addr,
            router,
            state,
            health,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Triggering it stops the server as SIGTERM does.
    pub fn shutdown(&self) -> Shutdown {
        self.state.shutdown.clone()
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let App {
            listener,
            addr,
            router,
            state,
            health,
        } = self;
        let shutdown = state.shutdown.clone();
        let grace = Duration::from_secs(state.settings.shutdown_grace_seconds);

        // gRPC health follows the database: NOT_SERVING while it is unreachable.
        health.set(state.db.ping().await).await;
        let watcher = {
            let (state, health) = (state.clone(), health.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = state.shutdown.wait() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    health.set(state.db.ping().await).await;
                }
            })
        };

        tracing::info!(%addr, environment = state.settings.app_env.as_str(), "user-service listening (gRPC + HTTP)");
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let stop = {
            let (shutdown, health) = (shutdown.clone(), health.clone());
            async move {
                shutdown.wait().await;
                // Load balancers see NOT_SERVING before the listener closes.
                health.set(false).await;
                tracing::info!("shutdown signal received, draining");
            }
        };
        let server = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop);

        let outcome = tokio::select! {
            r = server.into_future() => r.map_err(anyhow::Error::from),
            _ = async { shutdown.wait().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_seconds = grace.as_secs(), "grace period over, closing remaining connections");
                Ok(())
            }
        };
        shutdown.trigger();
        watcher.abort();

        // Buffered writes (usage logs …) flush now.
        state.tasks.close();
        if tokio::time::timeout(grace, state.tasks.wait())
            .await
            .is_err()
        {
            tracing::error!("background tasks did not finish within the grace period");
        }
        state.cache.quit().await;
        state.db.pool.close().await;
        tracing::info!("stopped");
        outcome
    }
}
