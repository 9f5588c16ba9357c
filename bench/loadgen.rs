//! Load generator for scripts/bench: N concurrent streams over M HTTP/2
//! connections (gRPC), or N keep-alive HTTP/1.1 connections, for a fixed
//! duration; latencies in an HDR histogram. Prints one JSON object per run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::VerifyApiKeyRequest;

#[derive(Parser)]
#[command(about = "user-service load generator")]
struct Cli {
    /// Label printed with the results.
    #[arg(long, default_value = "run")]
    name: String,
    /// Concurrent in-flight requests (streams or HTTP connections).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the gRPC streams share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured seconds (after `warmup`).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Unmeasured seconds first (connections open, caches warm).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// grpc.health.v1.Health/Check (the empty-RPC baseline).
    Health {
        #[arg(long)]
        addr: String,
    },
    /// AuthService/VerifyApiKey with a service token; keys are cycled.
    Verify {
        #[arg(long)]
        addr: String,
        /// File with one API key per line.
        #[arg(long)]
        keys: String,
        /// Use only the first N keys of the file (1 = one warm key).
        #[arg(long)]
        limit: Option<usize>,
        /// Service-client access token (scope auth:verify).
        #[arg(long)]
        token: String,
    },
    /// HTTP GET over keep-alive HTTP/1.1 connections, one per concurrent request.
    Http {
        #[arg(long)]
        url: String,
        /// Extra header, `Name: value`.
        #[arg(long)]
        header: Vec<String>,
    },
}

/// What every worker tallies.
struct Tally {
    hist: Histogram<u64>,
    errors: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            errors: 0,
        }
    }
}

/// Shared clock: workers record only once `measuring` is set, stop at `stop`.
struct Clock {
    measuring: AtomicBool,
    stop: AtomicBool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let clock = Arc::new(Clock {
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let mut workers = Vec::with_capacity(cli.concurrency);
    match &cli.mode {
        Mode::Health { addr } => {
            let channels = channels(addr, cli.connections).await?;
            for i in 0..cli.concurrency {
                let mut client = HealthClient::new(channels[i % channels.len()].clone());
                let clock = clock.clone();
                workers.push(tokio::spawn(async move {
                    let mut t = Tally::new();
                    while !clock.stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        let ok = client
                            .check(HealthCheckRequest {
                                service: String::new(),
                            })
                            .await
                            .map(|r| r.into_inner().status == 1)
                            .unwrap_or(false);
                        record(&clock, &mut t, start, ok);
                    }
                    t
                }));
            }
        }
        Mode::Verify {
            addr,
            keys,
            limit,
            token,
        } => {
            let mut list: Vec<String> = std::fs::read_to_string(keys)?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            if let Some(n) = limit {
                list.truncate(*n);
            }
            anyhow::ensure!(!list.is_empty(), "no keys in {keys}");
            let list = Arc::new(list);
            let auth: MetadataValue<_> = format!("Bearer {token}").parse()?;
            let channels = channels(addr, cli.connections).await?;
            let n = cli.concurrency;
            for i in 0..n {
                let mut client = AuthServiceClient::new(channels[i % channels.len()].clone());
                let (clock, list, auth) = (clock.clone(), list.clone(), auth.clone());
                workers.push(tokio::spawn(async move {
                    let mut t = Tally::new();
                    // Each worker walks its own stride of the key list.
                    let mut k = i % list.len();
                    while !clock.stop.load(Ordering::Relaxed) {
                        let mut req = tonic::Request::new(VerifyApiKeyRequest {
                            api_key: list[k].clone(),
                            ..Default::default()
                        });
                        req.metadata_mut().insert("authorization", auth.clone());
                        let start = Instant::now();
                        let ok = client
                            .verify_api_key(req)
                            .await
                            .map(|r| r.into_inner().valid)
                            .unwrap_or(false);
                        record(&clock, &mut t, start, ok);
                        k = (k + n) % list.len();
                    }
                    t
                }));
            }
        }
        Mode::Http { url, header } => {
            let uri: hyper::Uri = url.parse()?;
            let host = uri.host().unwrap_or("127.0.0.1").to_string();
            let port = uri.port_u16().unwrap_or(80);
            let path = uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            let headers: Vec<(String, String)> = header
                .iter()
                .filter_map(|h| h.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            for _ in 0..cli.concurrency {
                let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                stream.set_nodelay(true)?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await?;
                tokio::spawn(conn);
                let (clock, path, host, headers) =
                    (clock.clone(), path.clone(), host.clone(), headers.clone());
                workers.push(tokio::spawn(async move {
                    let mut t = Tally::new();
                    while !clock.stop.load(Ordering::Relaxed) {
                        let mut b = hyper::Request::get(path.as_str()).header("host", host.as_str());
                        for (k, v) in &headers {
                            b = b.header(k.as_str(), v.as_str());
                        }
                        let req = b.body(Empty::<Bytes>::new()).expect("request");
                        let start = Instant::now();
                        let ok = match sender.send_request(req).await {
                            Ok(res) => {
                                let ok = res.status().is_success();
                                ok && res.into_body().collect().await.is_ok()
                            }
                            Err(_) => false,
                        };
                        record(&clock, &mut t, start, ok);
                        if sender.ready().await.is_err() {
                            break;
                        }
                    }
                    t
                }));
            }
        }
    }

    tokio::time::sleep(Duration::from_secs_f64(cli.warmup)).await;
    clock.measuring.store(true, Ordering::Relaxed);
    let measured = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(cli.duration)).await;
    clock.measuring.store(false, Ordering::Relaxed);
    let elapsed = measured.elapsed().as_secs_f64();
    clock.stop.store(true, Ordering::Relaxed);

    let mut total = Tally::new();
    for w in workers {
        let t = w.await?;
        total.hist.add(&t.hist)?;
        total.errors += t.errors;
    }
    let h = &total.hist;
    let count = h.len();
    println!(
        "{}",
        serde_json::json!({
            "name": cli.name,
            "concurrency": cli.concurrency,
            "connections": cli.connections,
            "seconds": elapsed,
            "requests": count,
            "errors": total.errors,
            "rps": count as f64 / elapsed,
            "p50_us": h.value_at_quantile(0.50),
            "p99_us": h.value_at_quantile(0.99),
            "p999_us": h.value_at_quantile(0.999),
            "max_us": h.max(),
        })
    );
    Ok(())
}

/// Counts a completed request if the measured window is open.
fn record(clock: &Clock, t: &mut Tally, start: Instant, ok: bool) {
    if !clock.measuring.load(Ordering::Relaxed) {
        return;
    }
    if ok {
        let us = start.elapsed().as_micros().max(1) as u64;
        let _ = t.hist.record(us.min(60_000_000));
    } else {
        t.errors += 1;
    }
}

/// `m` separate HTTP/2 connections (each Endpoint::connect opens its own).
async fn channels(addr: &str, m: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(m.max(1));
    for _ in 0..m.max(1) {
        out.push(
            Endpoint::from_shared(addr.to_string())?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await?,
        );
    }
    Ok(out)
}
