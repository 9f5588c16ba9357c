//! The ratio scenarios of issues 4 and 13, interleaved in one process: short
//! windows (400 ms) of each scenario in turn, the order reversed every other
//! round, many rounds. This machine is shared and its speed drifts by tens of
//! per cent within a minute, not always linearly; scenarios run a minute apart
//! compare machines, not code. Here the two sides of a ratio run within a second
//! of each other, dozens of times, and each ratio is the median over the rounds.
//!
//! Between windows every in-flight request completes first (the drain), so a
//! window's service CPU is its own scenario's; a request counts in a window only
//! if it started and ended inside it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::{VerifyApiKeyRequest, VerifyTokenRequest};

use crate::{channels, cpu_seconds, http1, read_lines, Tally};

/// What the scenarios need (files of keys and tokens, credentials).
pub struct MixArgs {
    pub addr: String,
    /// (b): the first line is the one warm key.
    pub keys: String,
    /// (j): 1,024 keys of 64 users.
    pub user_keys: String,
    /// (h): users' access tokens.
    pub tokens: String,
    /// Service-client access token (scope auth:verify).
    pub service_token: String,
    /// (i): a user's access token.
    pub bearer: String,
    pub phase_ms: u64,
    pub rounds: usize,
    pub concurrency: usize,
    pub connections: usize,
    pub server_pid: Option<u32>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Grpc,
    Http,
}

/// The scenarios in their forward order: each ratio's two sides are neighbours
/// ((j)/(a), (j)/(b), (h)/(b), (i)/(e), (e)/(d)), but (b)/(a), two apart.
const SCENARIOS: [(&str, Kind); 7] = [
    ("a_grpc_health", Kind::Grpc),
    ("j_verify_1024_keys_64_users", Kind::Grpc),
    ("b_verify_warm", Kind::Grpc),
    ("h_verify_token_64_users", Kind::Grpc),
    ("i_users_me_bearer", Kind::Http),
    ("e_users_me_api_key", Kind::Http),
    ("d_health_live", Kind::Http),
];

/// The window now open: which scenario, and a generation that changes at every
/// open and close (a request counts only if the generation did not change
/// while it ran). `None`: drained, nobody sends.
#[derive(Clone, Copy)]
struct Window {
    scenario: Option<usize>,
    generation: u64,
}

struct Shared {
    window: watch::Sender<Window>,
    generation: AtomicU64,
    in_flight: AtomicU64,
    counted: AtomicU64,
}

pub async fn mix(a: MixArgs) -> anyhow::Result<()> {
    let (tx, _) = watch::channel(Window {
        scenario: None,
        generation: 0,
    });
    let shared = Arc::new(Shared {
        window: tx,
        generation: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        counted: AtomicU64::new(0),
    });
    let one_key = read_lines(&a.keys)?.swap_remove(0);
    let user_keys = Arc::new(read_lines(&a.user_keys)?);
    let tokens = Arc::new(read_lines(&a.tokens)?);
    let auth: MetadataValue<_> = format!("Bearer {}", a.service_token).parse()?;
    let channels = channels(&a.addr, a.connections).await?;
    let n = a.concurrency;
    let mut workers = Vec::new();
    for i in 0..n {
        let ch = channels[i % channels.len()].clone();
        let mut health = HealthClient::new(ch.clone());
        let mut auth_client = AuthServiceClient::new(ch);
        let (shared, auth, one_key, user_keys, tokens) = (
            shared.clone(),
            auth.clone(),
            one_key.clone(),
            user_keys.clone(),
            tokens.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut tallies: Vec<Tally> = SCENARIOS.iter().map(|_| Tally::new()).collect();
            // Each worker walks its own stride of the key and token lists.
            let (mut k, mut t) = (i % user_keys.len(), i % tokens.len());
            let mut rx = shared.window.subscribe();
            loop {
                let Some(w) = next_window(&mut rx, Kind::Grpc).await else {
                    break;
                };
                shared.in_flight.fetch_add(1, Ordering::SeqCst);
                let start = Instant::now();
                let ok = match w.0 {
                    0 => health
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .map(|r| r.into_inner().status == 1)
                        .unwrap_or(false),
                    1 | 2 => {
                        let key = if w.0 == 1 {
                            k = (k + n) % user_keys.len();
                            user_keys[k].clone()
                        } else {
                            one_key.clone()
                        };
                        let mut req = tonic::Request::new(VerifyApiKeyRequest {
                            api_key: key,
                            ..Default::default()
                        });
                        req.metadata_mut().insert("authorization", auth.clone());
                        auth_client
                            .verify_api_key(req)
                            .await
                            .map(|r| r.into_inner().valid)
                            .unwrap_or(false)
                    }
                    _ => {
                        t = (t + n) % tokens.len();
                        let mut req = tonic::Request::new(VerifyTokenRequest {
                            token: tokens[t].clone(),
                        });
                        req.metadata_mut().insert("authorization", auth.clone());
                        auth_client
                            .verify_token(req)
                            .await
                            .map(|r| r.into_inner().valid)
                            .unwrap_or(false)
                    }
                };
                shared.count(&mut tallies[w.0], w.1, start, ok);
            }
            anyhow::Ok(tallies)
        }));
    }
    let base: hyper::Uri = a.addr.parse()?;
    let host = base.host().unwrap_or("127.0.0.1").to_string();
    let requests = Arc::new([
        HttpCall {
            scenario: 4,
            path: "/v1/users/me",
            header: Some(("authorization", format!("Bearer {}", a.bearer))),
        },
        HttpCall {
            scenario: 5,
            path: "/v1/users/me",
            header: Some(("x-api-key", one_key.clone())),
        },
        HttpCall {
            scenario: 6,
            path: "/health/live",
            header: None,
        },
    ]);
    for _ in 0..n {
        let mut sender = http1(&base).await?;
        let (shared, host, requests) = (shared.clone(), host.clone(), requests.clone());
        workers.push(tokio::spawn(async move {
            let mut tallies: Vec<Tally> = SCENARIOS.iter().map(|_| Tally::new()).collect();
            let mut rx = shared.window.subscribe();
            loop {
                let Some(w) = next_window(&mut rx, Kind::Http).await else {
                    break;
                };
                let call = requests
                    .iter()
                    .find(|r| r.scenario == w.0)
                    .expect("an HTTP scenario");
                let mut b = hyper::Request::builder()
                    .uri(call.path)
                    .header("host", host.as_str());
                if let Some((k, v)) = &call.header {
                    b = b.header(*k, v.as_str());
                }
                let req = b.body(Full::new(Bytes::new())).expect("request");
                shared.in_flight.fetch_add(1, Ordering::SeqCst);
                let start = Instant::now();
                let ok = match sender.send_request(req).await {
                    Ok(res) => res.status().is_success() && res.into_body().collect().await.is_ok(),
                    Err(_) => false,
                };
                shared.count(&mut tallies[w.0], w.1, start, ok);
                sender.ready().await?;
            }
            anyhow::Ok(tallies)
        }));
    }

    // One unmeasured round first: connections warm, caches full.
    let mut rounds: Vec<Vec<Measured>> = Vec::new();
    for round in 0..=a.rounds {
        let order: Vec<usize> = if round % 2 == 1 {
            (0..SCENARIOS.len()).collect()
        } else {
            (0..SCENARIOS.len()).rev().collect()
        };
        let mut this = vec![Measured::default(); SCENARIOS.len()];
        for s in order {
            this[s] = shared.window(s, a.phase_ms, a.server_pid).await;
        }
        if round > 0 {
            rounds.push(this);
        }
    }
    shared.close(None);
    let _ = shared.window.send(Window {
        scenario: Some(usize::MAX),
        generation: u64::MAX,
    });
    let mut totals: Vec<Tally> = SCENARIOS.iter().map(|_| Tally::new()).collect();
    for w in workers {
        for (total, t) in totals.iter_mut().zip(w.await??) {
            total.hist.add(&t.hist)?;
            total.errors += t.errors;
        }
    }
    for (s, (name, kind)) in SCENARIOS.iter().enumerate() {
        let of = |f: fn(&Measured) -> f64| rounds.iter().map(|r| f(&r[s])).sum::<f64>();
        let seconds = of(|m| m.seconds);
        let count = of(|m| m.requests);
        let h = &totals[s].hist;
        let server_cpu = a.server_pid.map(|_| of(|m| m.server_cpu));
        println!(
            "{}",
            serde_json::json!({
                "name": name,
                "concurrency": n,
                "connections": if *kind == Kind::Http { n } else { a.connections },
                "seconds": seconds,
                "requests": count as u64,
                "errors": totals[s].errors,
                "rps": count / seconds,
                "rounds_rps": rounds.iter().map(|r| r[s].requests / r[s].seconds).collect::<Vec<_>>(),
                "p50_us": h.value_at_quantile(0.50),
                "p99_us": h.value_at_quantile(0.99),
                "p999_us": h.value_at_quantile(0.999),
                "max_us": h.max(),
                "loadgen_cpu_us_per_req": of(|m| m.own_cpu) * 1e6 / count.max(1.0),
                "server_cpu_us_per_req": server_cpu.map(|c| c * 1e6 / count.max(1.0)),
                "server_cpu_share": server_cpu.map(|c| c / seconds),
            })
        );
    }
    Ok(())
}

/// (i), (e), (d): the path and the credential header of each.
struct HttpCall {
    scenario: usize,
    path: &'static str,
    header: Option<(&'static str, String)>,
}

/// One window's figures.
#[derive(Clone, Copy, Default)]
struct Measured {
    seconds: f64,
    requests: f64,
    server_cpu: f64,
    own_cpu: f64,
}

impl Shared {
    /// Drains, opens a window of scenario `s` for `ms`, closes it.
    async fn window(&self, s: usize, ms: u64, server_pid: Option<u32>) -> Measured {
        self.close(None);
        let drained = Instant::now();
        while self.in_flight.load(Ordering::SeqCst) > 0
            && drained.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        self.counted.store(0, Ordering::SeqCst);
        let server_before = thread_cpu_ns(server_pid);
        let own_before = cpu_seconds("self");
        let opened = Instant::now();
        self.close(Some(s));
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.close(None);
        let seconds = opened.elapsed().as_secs_f64();
        let requests = self.counted.load(Ordering::SeqCst) as f64;
        Measured {
            seconds,
            requests,
            server_cpu: cpu_between(&server_before, &thread_cpu_ns(server_pid)),
            own_cpu: cpu_seconds("self") - own_before,
        }
    }

    /// Ends the open window (a request running now will not count) and opens
    /// `next`'s, or none.
    fn close(&self, next: Option<usize>) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.window.send(Window {
            scenario: next,
            generation,
        });
    }

    fn count(&self, t: &mut Tally, generation: u64, start: Instant, ok: bool) {
        if self.generation.load(Ordering::SeqCst) == generation {
            if ok {
                let us = start.elapsed().as_micros().max(1) as u64;
                let _ = t.hist.record(us.min(60_000_000));
                self.counted.fetch_add(1, Ordering::SeqCst);
            } else {
                t.errors += 1;
            }
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits for a window of this worker's kind; its scenario and generation.
/// `None` when the run is over.
async fn next_window(rx: &mut watch::Receiver<Window>, kind: Kind) -> Option<(usize, u64)> {
    loop {
        let w = *rx.borrow_and_update();
        match w.scenario {
            Some(usize::MAX) => return None,
            Some(s) if SCENARIOS[s].1 == kind => return Some((s, w.generation)),
            _ => {
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        }
    }
}

/// CPU nanoseconds of each of a process's threads (their schedstat; /proc/<pid>/stat
/// counts in 10 ms ticks, coarse for a 400 ms window).
fn thread_cpu_ns(pid: Option<u32>) -> HashMap<String, u64> {
    let Some(Ok(dir)) = pid.map(|p| std::fs::read_dir(format!("/proc/{p}/task"))) else {
        return HashMap::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|t| {
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            let ns = s.split_whitespace().next()?.parse::<u64>().ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), ns))
        })
        .collect()
}

/// CPU seconds the process's threads used between two samples: a thread born
/// in between counts whole, one that ended loses its share (a blocking-pool
/// thread leaving must not make the sum go down).
fn cpu_between(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> f64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum::<u64>() as f64
        / 1e9
}
