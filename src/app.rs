//! `App::build(settings)` wires stores → services → transports and binds the
//! listener (port 0 works for tests); `run_until_stopped()` serves gRPC and the
//! JSON gateway on that one port until the shutdown signal, then drains.

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::shutdown::Shutdown;
use crate::store::{Cache, Db};
use crate::{grpc, http};

/// After the grace period, what background tasks still get to flush.
const FLUSH_MARGIN: Duration = Duration::from_secs(2);
/// How long each store gets to close at exit.
const STORE_CLOSE: Duration = Duration::from_secs(1);

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
    /// Invitations to trading accounts: membership only with the invitee's consent.
    pub invitations: crate::service::invitations::InvitationsService,
    /// Second factors, the login's second step and step-up (issue 14).
    pub mfa: crate::service::mfa::MfaService,
    /// Passkeys (WebAuthn): registration, passwordless login, second factor.
    pub passkeys: crate::service::passkeys::PasskeyService,
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
        let mfa = crate::service::mfa::MfaService::new(db.clone(), key_ring.clone(), &settings);
        let accounts = crate::service::accounts::AccountsService::new(
            db.clone(),
            key_ring,
            policy.clone(),
            invalidation.clone(),
            mfa.step_up.clone(),
        )
        // REQUIRE_VERIFIED_EMAIL, for accounts, invitations and keys.
        .with_email_gate(crate::service::recovery::EmailGate::new(
            db.clone(),
            &settings,
        ));
        let audit_log = crate::service::audit_log::AuditLog::new(db.clone(), policy.clone());
        let invitations =
            crate::service::invitations::InvitationsService::new(db.clone(), accounts.clone());
        let api_keys = crate::service::api_keys::ApiKeyService::new(
            &settings,
            db.clone(),
            cache.clone(),
            invalidation.clone(),
            policy.clone(),
            accounts.clone(),
        );
        let passkeys = crate::service::passkeys::PasskeyService::new(&settings, db.clone())?
            .with_step_up(mfa.step_up.clone());
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
            invitations,
            mfa,
            passkeys,
        }));
        state
            .invalidation
            .start(state.shutdown.clone(), &state.tasks)
            .await;
        state
            .invalidation
            .start_pg(&state.db, state.shutdown.clone(), &state.tasks)
            .await;
        // Hook (issue 15): this replica's notification dispatcher (the outbox).
        crate::service::notify::Dispatcher::new(&state.settings, state.db.clone())?
            .spawn(state.shutdown.clone(), &state.tasks);
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
            // Client networks are checked before any other work; the edge layer
            // outside it still puts the security headers on that refusal.
            .layer(axum::middleware::from_fn_with_state(
                http::network::NetworkGuard::new(&state),
                http::network::guard,
            ))
            // Requests the grace period cannot finish answer 503 from here,
            // with the edge layer's headers.
            .layer(axum::middleware::from_fn(crate::server::cancel_at_deadline))
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

        let fd_limit = crate::server::raise_fd_limit();
        let limits = crate::server::Limits::from_settings(&state.settings, fd_limit);
        tracing::info!(
            %addr,
            environment = state.settings.app_env.as_str(),
            fd_limit,
            max_connections = limits.max_connections,
            header_read_timeout_s = limits.header_read_timeout.as_secs(),
            idle_timeout_s = limits.idle_timeout.as_secs(),
            h2_max_concurrent_streams = limits.h2_max_concurrent_streams,
            "user-service listening (gRPC + HTTP)"
        );
        let stop = {
            let (shutdown, health) = (shutdown.clone(), health.clone());
            tokio::spawn(async move {
                shutdown.wait().await;
                // Load balancers see NOT_SERVING while the connections drain.
                health.set(false).await;
                tracing::info!("shutdown signal received, draining");
            })
        };
        // Returns by the deadline whatever the requests and the stores do: what
        // still runs then is dropped, so its transaction rolls back.
        let deadline =
            crate::server::serve(listener, router, limits, shutdown.clone(), grace).await;
        shutdown.trigger();
        watcher.abort();
        stop.abort();

        // Buffered writes (usage logs …) flush now, within a small margin after
        // the grace period; the stores get a second each to close.
        state.tasks.close();
        if tokio::time::timeout_at(deadline + FLUSH_MARGIN, state.tasks.wait())
            .await
            .is_err()
        {
            tracing::error!("background tasks did not finish within the grace period");
        }
        if tokio::time::timeout(STORE_CLOSE, state.cache.quit())
            .await
            .is_err()
        {
            tracing::warn!("redis did not close in time");
        }
        if tokio::time::timeout(STORE_CLOSE, state.db.pool.close())
            .await
            .is_err()
        {
            tracing::warn!("database pool did not close in time");
        }
        tracing::info!("stopped");
        Ok(())
    }
}
