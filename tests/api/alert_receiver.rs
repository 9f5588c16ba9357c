//! A small HTTP server standing in for the alert service: it records every
//! `POST /v1/notifications` (headers and body) and answers as the test tells it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;
use tokio::sync::Notify;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub idempotency_key: Option<String>,
    pub authorization: Option<String>,
    pub body: Value,
    pub at: Instant,
}

#[derive(Default)]
struct Inner {
    got: Mutex<Vec<Received>>,
    /// Requests still to refuse with 503 before answering 200.
    refuse: AtomicUsize,
    /// Refuse everything (500).
    refuse_all: std::sync::atomic::AtomicBool,
    /// Each answer waits this long first (milliseconds).
    delay_ms: AtomicUsize,
    /// When set, the first request signals `arrived` and waits for `release`.
    hold: Mutex<Option<(Arc<Notify>, Arc<Notify>)>>,
}

#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    inner: Arc<Inner>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .route("/v1/notifications", post(receive))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { url, inner }
    }

    /// The next `n` requests are refused with 503.
    pub fn refuse_next(&self, n: usize) {
        self.inner.refuse.store(n, Ordering::SeqCst);
    }

    pub fn refuse_all(&self, on: bool) {
        self.inner.refuse_all.store(on, Ordering::SeqCst);
    }

    pub fn delay(&self, d: Duration) {
        self.inner
            .delay_ms
            .store(d.as_millis() as usize, Ordering::SeqCst);
    }

    /// Holds the next request: returns (arrived, release).
    pub fn hold_next(&self) -> (Arc<Notify>, Arc<Notify>) {
        let pair = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        *self.inner.hold.lock().unwrap() = Some(pair.clone());
        pair
    }

    pub fn all(&self) -> Vec<Received> {
        self.inner.got.lock().unwrap().clone()
    }

    /// The first message matching `pred`, waiting up to 10 s for it.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Received {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.all().into_iter().find(|r| pred(&r.body)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} notification arrived; got {:?}",
                self.all().iter().map(|r| &r.body).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The message of `template` to `to`, waiting for it.
    pub async fn message(&self, template: &str, to: &str) -> Value {
        self.wait_for(template, |b| b["template"] == template && b["to"] == to)
            .await
            .body
    }

    /// How many messages of `template` to `to` arrived so far.
    pub fn count(&self, template: &str, to: &str) -> usize {
        self.all()
            .iter()
            .filter(|r| r.body["template"] == template && r.body["to"] == to)
            .count()
    }
}

async fn receive(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: String) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    inner.got.lock().unwrap().push(Received {
        idempotency_key: header("idempotency-key"),
        authorization: header("authorization"),
        body: serde_json::from_str(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    });
    let hold = inner.hold.lock().unwrap().take();
    if let Some((arrived, release)) = hold {
        arrived.notify_one();
        release.notified().await;
    }
    let delay = inner.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    if inner.refuse_all.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let refused = inner
        .refuse
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if refused {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// Variables that send an app's notifications to `receiver`, polled fast.
pub fn to_receiver(v: &mut std::collections::HashMap<String, String>, receiver: &Receiver) {
    v.insert("NOTIFY_SINK".into(), "http".into());
    v.insert("ALERT_SERVICE_URL".into(), receiver.url.clone());
    v.insert("NOTIFY_POLL_INTERVAL_MS".into(), "50".into());
    v.insert("NOTIFY_BACKOFF_BASE_MS".into(), "100".into());
    v.insert("NOTIFY_BACKOFF_MAX_MS".into(), "400".into());
}
