//! The connection layer under axum and tonic: accepts, bounds and times out
//! client connections, and drains them on shutdown.
//!
//! - At most `max_connections` are open. At the bound a new connection sheds the
//!   oldest one with no request in flight (idle keep-alives, connections that
//!   never sent a request, slow headers), so a client holding thousands of idle
//!   connections cannot keep health checks or VerifyApiKey out; when every
//!   connection is busy the new one is closed.
//! - HTTP/1.1: headers must arrive within the header-read timeout (also the
//!   limit for a connection's first request), and a connection with nothing in
//!   flight for the idle timeout is closed. HTTP/2: PING keepalive and a bound on
//!   concurrent streams.
//! - On shutdown the listener closes, each connection shuts down gracefully
//!   (idle HTTP/1.1 connections close cleanly, answers in flight carry
//!   `Connection: close`, HTTP/2 gets GOAWAY) and at the deadline whatever still
//!   runs is dropped — connection tasks and HTTP/2 stream tasks alike — so an
//!   uncommitted transaction rolls back instead of committing after the client
//!   saw its connection drop.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::Settings;
use crate::shutdown::Shutdown;

/// The connection limits in force.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub h2_keepalive_interval: Duration,
    pub h2_max_concurrent_streams: u32,
}

impl Limits {
    /// From the settings; MAX_CLIENT_CONNECTIONS defaults to what the file-
    /// descriptor limit allows after a reserve for the stores and the process.
    pub fn from_settings(settings: &Settings, fd_limit: u64) -> Self {
        let reserve = 256 + u64::from(settings.database_max_connections);
        let by_fds = fd_limit.saturating_sub(reserve).max(64) as usize;
        Self {
            max_connections: settings
                .max_client_connections
                .unwrap_or(by_fds.min(DEFAULT_MAX_CONNECTIONS)),
            header_read_timeout: Duration::from_secs(settings.http_header_read_timeout_seconds),
            idle_timeout: Duration::from_secs(settings.http_idle_timeout_seconds),
            h2_keepalive_interval: Duration::from_secs(settings.http2_keepalive_interval_seconds),
            h2_max_concurrent_streams: settings.http2_max_concurrent_streams,
        }
    }
}

/// Upper default however many descriptors the machine allows: idle connections
/// still cost memory (buffers, an HTTP/2 state).
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Raises the soft RLIMIT_NOFILE to the hard limit where allowed; returns the
/// soft limit in force afterwards.
pub fn raise_fd_limit() -> u64 {
    #[cfg(unix)]
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    }
    #[cfg(not(unix))]
    1024
}

/// Runs spawned futures (hyper's HTTP/2 stream tasks) so that the hard stop
/// drops them, and tracks them so the drain can wait for them.
#[derive(Clone)]
struct Exec {
    hard_stop: CancellationToken,
    tasks: TaskTracker,
    /// Cancelled at the deadline: handlers still running are dropped (their
    /// transactions roll back) and answer 503 / UNAVAILABLE.
    cancel_requests: CancellationToken,
}

impl Exec {
    fn spawn<F>(&self, fut: F)
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let hard_stop = self.hard_stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = hard_stop.cancelled() => {}
            }
        });
    }
}

impl<F> hyper::rt::Executor<F> for Exec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.spawn(fut);
    }
}

/// What the shedding and the timeouts need to know of one connection.
struct Activity {
    in_flight: AtomicUsize,
    served: AtomicUsize,
    /// Milliseconds since `epoch` when the last request finished (or the
    /// connection opened).
    last_active_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    /// When this connection is to be closed for doing nothing: the header
    /// timeout before its first request, the idle timeout after; None while a
    /// request is in flight.
    fn idle_deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let limit = if self.served.load(Ordering::Relaxed) == 0 {
            limits.header_read_timeout
        } else {
            limits.idle_timeout
        };
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        Some(self.epoch + last + limit)
    }
}

/// Counts a request in flight until dropped (the response is ready, or the
/// request future was dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        a.served.fetch_add(1, Ordering::Relaxed);
        Self(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Entry {
    activity: Arc<Activity>,
    close: CancellationToken,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Table {
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, Entry>>,
}

impl Table {
    /// Registers a new connection, first shedding the oldest idle one when at
    /// `max`; None when at `max` and every connection is busy.
    fn admit(&self, max: usize) -> Option<(u64, Arc<Activity>, CancellationToken)> {
        let mut open = self.open.lock().expect("connection table");
        if open.len() >= max {
            let idle = open
                .iter()
                .find(|(_, e)| e.activity.in_flight.load(Ordering::Acquire) == 0)
                .map(|(id, _)| *id)?;
            if let Some(shed) = open.remove(&idle) {
                shed.close.cancel();
            }
            metrics::counter!("user_service_connections_shed_total").increment(1);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            activity: Arc::new(Activity::new()),
            close: CancellationToken::new(),
        };
        let handles = (id, entry.activity.clone(), entry.close.clone());
        open.insert(id, entry);
        metrics::gauge!("user_service_connections_open").set(open.len() as f64);
        Some(handles)
    }

    fn remove(&self, id: u64) {
        let mut open = self.open.lock().expect("connection table");
        open.remove(&id);
        metrics::gauge!("user_service_connections_open").set(open.len() as f64);
    }
}

/// Serves `router` on `listener` until `shutdown`, then drains until
/// `grace` has passed; returns once every connection is closed or dropped,
/// with the deadline the grace period set.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: Shutdown,
    grace: Duration,
) -> Instant {
    let exec = Exec {
        hard_stop: CancellationToken::new(),
        tasks: TaskTracker::new(),
        cancel_requests: CancellationToken::new(),
    };
    let mut builder = auto::Builder::new(exec.clone());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.h2_keepalive_interval)
        .keep_alive_timeout(limits.h2_keepalive_interval)
        .max_concurrent_streams(limits.h2_max_concurrent_streams);
    let builder = Arc::new(builder);
    let table = Arc::new(Table::default());

    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait for descriptors to come back
                    // rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some((id, activity, close)) = table.admit(limits.max_connections) else {
            metrics::counter!("user_service_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = serve_connection(
            builder.clone(),
            stream,
            peer,
            router.clone(),
            limits,
            activity,
            close,
            shutdown.clone(),
            exec.cancel_requests.clone(),
        );
        let table = table.clone();
        exec.spawn(async move {
            conn.await;
            table.remove(id);
        });
    }
    // New connections are refused from here on.
    drop(listener);
    let deadline = Instant::now() + grace;

    exec.tasks.close();
    if tokio::time::timeout_at(deadline, exec.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_seconds = grace.as_secs(),
            "grace period over, cancelling the requests still running"
        );
        // They answer 503 and their connections close; a moment to write that,
        // then whatever is left is dropped.
        exec.cancel_requests.cancel();
        if tokio::time::timeout(Duration::from_millis(500), exec.tasks.wait())
            .await
            .is_err()
        {
            exec.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_millis(500), exec.tasks.wait()).await;
        }
    }
    deadline
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    builder: Arc<auto::Builder<Exec>>,
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    activity: Arc<Activity>,
    close: CancellationToken,
    shutdown: Shutdown,
    cancel_requests: CancellationToken,
) {
    let tracked = activity.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut()
            .insert(CancelAtDeadline(cancel_requests.clone()));
        let in_flight = InFlight::start(&tracked);
        let router = router.clone();
        async move {
            let response = router.oneshot(req).await.unwrap_or_else(|e| match e {});
            drop(in_flight);
            Ok::<_, Infallible>(response)
        }
    });
    let conn = builder.serve_connection(TokioIo::new(Linger::new(stream)), service);
    tokio::pin!(conn);
    // After a graceful close is asked for, a connection with nothing in flight
    // gets this long to finish (a client mid-way through its headers).
    let mut closing_since: Option<Instant> = None;
    loop {
        let wake = match (closing_since, activity.idle_deadline(&limits)) {
            (Some(since), _) => since + Duration::from_secs(2),
            (None, Some(deadline)) => deadline,
            (None, None) => Instant::now() + limits.idle_timeout,
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = close.cancelled(), if closing_since.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing_since = Some(Instant::now());
            }
            _ = shutdown.wait(), if closing_since.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing_since = Some(Instant::now());
            }
            _ = tokio::time::sleep_until(wake) => {
                let idle = activity.in_flight.load(Ordering::Acquire) == 0;
                match closing_since {
                    // Still not closed, nothing in flight: drop it.
                    Some(_) if idle => return,
                    Some(_) => {}
                    None if activity
                        .idle_deadline(&limits)
                        .is_some_and(|d| d <= Instant::now()) =>
                    {
                        conn.as_mut().graceful_shutdown();
                        closing_since = Some(Instant::now());
                    }
                    None => {}
                }
            }
        }
    }
}

/// Cancelled when the grace period is over; carried by each request to
/// [`cancel_at_deadline`].
#[derive(Clone)]
struct CancelAtDeadline(CancellationToken);

/// Middleware, inside the edge layer so the answer still carries the security
/// headers: at the end of the grace period the handler is dropped (its
/// transaction rolls back) and the request answers 503 / `UNAVAILABLE`.
pub async fn cancel_at_deadline(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Some(CancelAtDeadline(cancel)) = req.extensions().get::<CancelAtDeadline>().cloned() else {
        return next.run(req).await;
    };
    let grpc = crate::http::is_grpc(req.headers());
    tokio::select! {
        res = next.run(req) => res,
        _ = cancel.cancelled() => cancelled_response(grpc),
    }
}

/// What a request the grace period could not finish answers.
fn cancelled_response(grpc: bool) -> axum::response::Response {
    use axum::response::IntoResponse;
    let detail = "the service is shutting down, retry";
    if grpc {
        return tonic::Status::unavailable(detail)
            .into_http::<axum::body::Body>()
            .into_response();
    }
    let mut res = crate::http::problem::Problem::new(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        detail,
    )
    .into_response();
    res.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    res
}

/// A TCP stream that closes lingeringly: when hyper drops it, the write side is
/// shut (FIN) and whatever the client still sends is read and discarded for a
/// moment before the socket closes. Closing with unread data would make the
/// kernel answer with a reset, which the client may see before our answer; a
/// request that raced the close of an idle keep-alive connection then sees a
/// clean end of stream instead.
struct Linger(Option<TcpStream>);

impl Linger {
    fn new(stream: TcpStream) -> Self {
        Self(Some(stream))
    }

    fn stream(self: std::pin::Pin<&mut Self>) -> std::pin::Pin<&mut TcpStream> {
        std::pin::Pin::new(
            self.get_mut()
                .0
                .as_mut()
                .expect("stream present until drop"),
        )
    }
}

const LINGER: Duration = Duration::from_secs(2);
/// Sockets lingering at most at once; beyond, they close at once (a flood of
/// shed connections must not hold descriptors for the linger time).
const MAX_LINGERING: usize = 256;
static LINGERING: AtomicUsize = AtomicUsize::new(0);

impl Drop for Linger {
    fn drop(&mut self) {
        let (Some(mut stream), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        if LINGERING.fetch_add(1, Ordering::AcqRel) >= MAX_LINGERING {
            LINGERING.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(LINGER, async {
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            LINGERING.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

impl tokio::io::AsyncRead for Linger {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Linger {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}
