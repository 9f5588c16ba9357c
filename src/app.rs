//! `App::build(settings)` builds the `Services` graph, hands the transports the
//! services they call, and binds the listener (port 0 works for tests);
//! `run_until_stopped()` serves gRPC and the JSON gateway on that one port until
//! the shutdown signal, then drains.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::service::Services;
use crate::shutdown::Shutdown;
use crate::{grpc, http};

/// After the grace period, what background tasks still get to flush.
const FLUSH_MARGIN: Duration = Duration::from_secs(2);
/// How long each store gets to close at exit.
const STORE_CLOSE: Duration = Duration::from_secs(1);

pub struct App {
    listener: TcpListener,
    addr: SocketAddr,
    router: Router,
    settings: Settings,
    services: Services,
    shutdown: Shutdown,
    /// Background tasks that must finish (flush) before the process exits.
    tasks: TaskTracker,
    health: grpc::Health,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let _ = crate::telemetry::metrics_handle();
        let services = Services::build(&settings)?;
        let addr = format!(
            "{}:{}",
            settings.user_service_host, settings.user_service_port
        );
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let addr = listener.local_addr()?;

        let shutdown = Shutdown::new();
        let tasks = TaskTracker::new();
        services.start(&shutdown, &tasks).await;

        let (grpc_routes, health) = grpc::routes(&services)?;
        let gateway = http::AppState::new(
            services.clone(),
            http::HttpConfig::from_settings(&settings),
            shutdown.clone(),
            tasks.clone(),
        );
        let router = grpc_routes
            .into_axum_router()
            .merge(http::routes(gateway))
            .fallback(http::fallback)
            .method_not_allowed_fallback(http::method_not_allowed)
            // Client networks are checked before any other work; the edge layer
            // outside it still puts the security headers on that refusal.
            .layer(axum::middleware::from_fn_with_state(
                http::network::NetworkGuard::new(&settings),
                http::network::guard,
            ))
            // Requests the grace period cannot finish answer 503 from here,
            // with the edge layer's headers.
            .layer(axum::middleware::from_fn(crate::server::cancel_at_deadline))
            .layer(axum::middleware::from_fn_with_state(
                http::edge::EdgePolicy::new(&settings),
                http::edge::edge,
            ))
            .layer(axum::middleware::from_fn(http::observe::observe));

        Ok(Self {
            listener,
            addr,
            router,
            settings,
            services,
            shutdown,
            tasks,
            health,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The graph this server runs (tests call services directly).
    pub fn services(&self) -> Services {
        self.services.clone()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Triggering it stops the server as SIGTERM does.
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let App {
            listener,
            addr,
            router,
            settings,
            services,
            shutdown,
            tasks,
            health,
        } = self;
        let grace = Duration::from_secs(settings.shutdown_grace_seconds);

        // gRPC health follows the database: NOT_SERVING while it is unreachable.
        health.set(services.probe.database().await).await;
        let watcher = {
            let (probe, health, shutdown) =
                (services.probe.clone(), health.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    health.set(probe.database().await).await;
                }
            })
        };

        let fd_limit = crate::server::raise_fd_limit();
        let limits = crate::server::Limits::from_settings(&settings, fd_limit);
        tracing::info!(
            %addr,
            environment = settings.app_env.as_str(),
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
        tasks.close();
        if tokio::time::timeout_at(deadline + FLUSH_MARGIN, tasks.wait())
            .await
            .is_err()
        {
            tracing::error!("background tasks did not finish within the grace period");
        }
        services.close(STORE_CLOSE).await;
        tracing::info!("stopped");
        Ok(())
    }
}
