//! Load generator for scripts/bench: N concurrent streams over M HTTP/2
//! connections (gRPC), or N keep-alive HTTP/1.1 connections, for a fixed
//! duration; latencies in an HDR histogram. Prints one JSON object per run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::{VerifyApiKeyRequest, VerifyTokenRequest};

// Issue 14: TOTP enrolment of the bench users and two-step logins.
mod mfa_load;
// Issue 13: keys and tokens enough to fill the caches.
mod fill;
// Issues 4 and 13: the ratio scenarios interleaved in short windows.
mod mix;

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
    /// The service's process id: its CPU time over the measured window is
    /// reported per request (what a call costs the service, whoever saturates).
    #[arg(long)]
    server_pid: Option<u32>,
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
    /// AuthService/VerifyToken with a service token; users' access tokens are
    /// cycled.
    VerifyToken {
        #[arg(long)]
        addr: String,
        /// File with one user access token per line.
        #[arg(long)]
        tokens: String,
        /// Service-client access token (scope auth:verify).
        #[arg(long)]
        token: String,
    },
    /// Creates API keys through POST /v1/api-keys (a user's access token) and
    /// writes them, one per line, to `out`. Not a measurement.
    SeedKeys {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long)]
        out: String,
    },
    /// Enrols users in TOTP (lines `email<TAB>access token`); writes
    /// `email<TAB>base32 secret` lines to `out`. Not a measurement.
    SeedMfa {
        #[arg(long)]
        url: String,
        #[arg(long)]
        users: String,
        #[arg(long)]
        out: String,
    },
    /// Logins in two steps (password, then TOTP) over the users `seed-mfa`
    /// wrote; prints `<name>` and `<name>_second_step`.
    MfaLogin {
        #[arg(long)]
        url: String,
        #[arg(long)]
        users: String,
        #[arg(long)]
        password: String,
    },
    /// Mints an access token per session and an API key per session's user, as
    /// the service would (its settings from this environment). Not a measurement.
    Mint {
        /// Lines `user_id<TAB>session_id`.
        #[arg(long)]
        sessions: String,
        #[arg(long)]
        tokens_out: String,
        #[arg(long)]
        secrets_out: String,
        /// CSV for `\copy api_keys (id, user_id, name, prefix, key_hash)`.
        #[arg(long)]
        keys_csv: String,
    },
    /// Verifies every key, then every token, once (VerifyApiKey, VerifyToken):
    /// fills the service's caches.
    VerifyEach {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        keys: String,
        #[arg(long)]
        tokens: String,
        /// Service-client access token (scope auth:verify).
        #[arg(long)]
        token: String,
    },
    /// The ratio scenarios (a) gRPC health, (j) VerifyApiKey over many keys,
    /// (b) one key, (h) VerifyToken, (i) GET /v1/users/me with a bearer token,
    /// (e) with an API key, (d) GET /health/live, interleaved in windows of
    /// `phase_ms` for `rounds` rounds (mix.rs); one JSON line per scenario.
    Mix {
        #[arg(long)]
        addr: String,
        /// API keys; the first is (b)'s and (e)'s.
        #[arg(long)]
        keys: String,
        /// (j)'s keys.
        #[arg(long)]
        user_keys: String,
        /// (h)'s users' access tokens.
        #[arg(long)]
        tokens: String,
        /// Service-client access token (scope auth:verify).
        #[arg(long)]
        token: String,
        /// (i)'s user access token.
        #[arg(long)]
        bearer: String,
        #[arg(long, default_value_t = 400)]
        phase_ms: u64,
        #[arg(long, default_value_t = 25)]
        rounds: usize,
    },
    /// Renders the JSON lines of earlier runs as the markdown results table.
    Report {
        /// File of JSON lines printed by earlier runs.
        #[arg(long)]
        results: String,
        /// Peak RSS of the service (VmHWM), KiB.
        #[arg(long)]
        rss_kib: u64,
        /// Free-form lines (machine, settings) put above the table.
        #[arg(long)]
        note: Vec<String>,
        /// Cores the service may use: the argon2 bound on logins is this many
        /// hashes at a time.
        #[arg(long, default_value_t = 1)]
        service_cores: u32,
        /// Logins must reach this share of the argon2 bound: 0.9 split, 0.85
        /// with the stores on the service's core (issue 13 point 5).
        #[arg(long, default_value_t = 0.9)]
        login_target: f64,
    },
    /// HTTP GET (or, with `body`, a JSON POST) over keep-alive HTTP/1.1
    /// connections, one per concurrent request.
    Http {
        #[arg(long)]
        url: String,
        /// Extra header, `Name: value`.
        #[arg(long)]
        header: Vec<String>,
        /// JSON body: the request becomes a POST.
        #[arg(long)]
        body: Option<String>,
        /// File of JSON bodies, one per line: connection `i` posts line
        /// `i % lines` (e.g. logins of many users, one in flight per user).
        #[arg(long, conflicts_with = "body")]
        bodies: Option<String>,
        /// The status that counts as an answer (a flood of refusals: 401);
        /// default any 2xx.
        #[arg(long)]
        expect_status: Option<u16>,
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
    match &cli.mode {
        Mode::SeedKeys {
            url,
            token,
            count,
            out,
        } => return seed_keys(url, token, *count, cli.concurrency, out).await,
        Mode::Report {
            results,
            rss_kib,
            note,
            service_cores,
            login_target,
        } => return report(results, *rss_kib, note, *service_cores, *login_target),
        Mode::SeedMfa { url, users, out } => return mfa_load::seed_mfa(url, users, out).await,
        Mode::Mix {
            addr,
            keys,
            user_keys,
            tokens,
            token,
            bearer,
            phase_ms,
            rounds,
        } => {
            return mix::mix(mix::MixArgs {
                addr: addr.clone(),
                keys: keys.clone(),
                user_keys: user_keys.clone(),
                tokens: tokens.clone(),
                service_token: token.clone(),
                bearer: bearer.clone(),
                phase_ms: *phase_ms,
                rounds: *rounds,
                concurrency: cli.concurrency,
                connections: cli.connections,
                server_pid: cli.server_pid,
            })
            .await
        }
        Mode::Mint {
            sessions,
            tokens_out,
            secrets_out,
            keys_csv,
        } => return fill::mint(sessions, tokens_out, secrets_out, keys_csv),
        Mode::VerifyEach {
            addr,
            keys,
            tokens,
            token,
        } => {
            return fill::verify_each(
                &cli.name,
                addr,
                keys,
                tokens,
                token,
                cli.concurrency,
                cli.connections,
            )
            .await
        }
        Mode::MfaLogin {
            url,
            users,
            password,
        } => {
            return mfa_load::mfa_login(
                &cli.name,
                url,
                users,
                password,
                cli.concurrency,
                cli.duration,
                cli.server_pid,
            )
            .await
        }
        _ => {}
    }
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
            let mut list = read_lines(keys)?;
            if let Some(n) = limit {
                list.truncate(*n);
            }
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
        Mode::VerifyToken {
            addr,
            tokens,
            token,
        } => {
            let list = Arc::new(read_lines(tokens)?);
            let auth: MetadataValue<_> = format!("Bearer {token}").parse()?;
            let channels = channels(addr, cli.connections).await?;
            let n = cli.concurrency;
            for i in 0..n {
                let mut client = AuthServiceClient::new(channels[i % channels.len()].clone());
                let (clock, list, auth) = (clock.clone(), list.clone(), auth.clone());
                workers.push(tokio::spawn(async move {
                    let mut t = Tally::new();
                    let mut k = i % list.len();
                    while !clock.stop.load(Ordering::Relaxed) {
                        let mut req = tonic::Request::new(VerifyTokenRequest {
                            token: list[k].clone(),
                        });
                        req.metadata_mut().insert("authorization", auth.clone());
                        let start = Instant::now();
                        let ok = client
                            .verify_token(req)
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
        Mode::Http {
            url,
            header,
            body,
            bodies,
            expect_status,
        } => {
            let expect_status = *expect_status;
            let bodies: Vec<Option<String>> = match bodies {
                Some(file) => read_lines(file)?.into_iter().map(Some).collect(),
                None => vec![body.clone()],
            };
            anyhow::ensure!(!bodies.is_empty(), "no bodies");
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
            for w in 0..cli.concurrency {
                let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                stream.set_nodelay(true)?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await?;
                tokio::spawn(conn);
                let (clock, path, host, headers, body) = (
                    clock.clone(),
                    path.clone(),
                    host.clone(),
                    headers.clone(),
                    bodies[w % bodies.len()].clone().map(Bytes::from),
                );
                workers.push(tokio::spawn(async move {
                    let mut t = Tally::new();
                    while !clock.stop.load(Ordering::Relaxed) {
                        let method = if body.is_some() { "POST" } else { "GET" };
                        let mut b = hyper::Request::builder()
                            .method(method)
                            .uri(path.as_str())
                            .header("host", host.as_str());
                        if body.is_some() {
                            b = b.header("content-type", "application/json");
                        }
                        for (k, v) in &headers {
                            b = b.header(k.as_str(), v.as_str());
                        }
                        let req = b
                            .body(Full::new(body.clone().unwrap_or_default()))
                            .expect("request");
                        let start = Instant::now();
                        let ok = match sender.send_request(req).await {
                            Ok(res) => {
                                let ok = match expect_status {
                                    Some(s) => res.status().as_u16() == s,
                                    None => res.status().is_success(),
                                };
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
        Mode::SeedKeys { .. }
        | Mode::Report { .. }
        | Mode::SeedMfa { .. }
        | Mode::MfaLogin { .. }
        | Mode::Mint { .. }
        | Mode::Mix { .. }
        | Mode::VerifyEach { .. } => unreachable!("handled above"),
    }

    tokio::time::sleep(Duration::from_secs_f64(cli.warmup)).await;
    let cpu_before = (
        cpu_seconds("self"),
        cli.server_pid.map(|p| cpu_seconds(&p.to_string())),
    );
    clock.measuring.store(true, Ordering::Relaxed);
    let measured = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(cli.duration)).await;
    clock.measuring.store(false, Ordering::Relaxed);
    let elapsed = measured.elapsed().as_secs_f64();
    let own_cpu = cpu_seconds("self") - cpu_before.0;
    let server_cpu = cli
        .server_pid
        .zip(cpu_before.1)
        .map(|(p, before)| cpu_seconds(&p.to_string()) - before);
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
            // HTTP/1.1 holds one connection per stream; gRPC shares --connections.
            "connections": if matches!(cli.mode, Mode::Http { .. }) { cli.concurrency } else { cli.connections },
            "seconds": elapsed,
            "requests": count,
            "errors": total.errors,
            "rps": count as f64 / elapsed,
            "p50_us": h.value_at_quantile(0.50),
            "p99_us": h.value_at_quantile(0.99),
            "p999_us": h.value_at_quantile(0.999),
            "max_us": h.max(),
            "loadgen_cpu_us_per_req": own_cpu * 1e6 / count.max(1) as f64,
            "server_cpu_us_per_req": server_cpu.map(|c| c * 1e6 / count.max(1) as f64),
            "server_cpu_share": server_cpu.map(|c| c / elapsed),
        })
    );
    Ok(())
}

/// The non-empty lines of a file (keys, tokens); an error when there are none.
fn read_lines(path: &str) -> anyhow::Result<Vec<String>> {
    let list: Vec<String> = std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    anyhow::ensure!(!list.is_empty(), "nothing in {path}");
    Ok(list)
}

/// User plus system CPU seconds of a process (`self` or a pid), from /proc;
/// 0 where that cannot be read.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11..13).map_or(0.0, |t| {
        t.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / clock_ticks_per_second()
}

/// USER_HZ, the unit of /proc CPU times (100 on Linux unless built otherwise).
fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|hz: &f64| *hz > 0.0)
            .unwrap_or(100.0)
    })
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

/// One keep-alive HTTP/1.1 connection to `uri`'s host.
async fn http1(
    uri: &hyper::Uri,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>> {
    let host = uri.host().unwrap_or("127.0.0.1");
    let stream = tokio::net::TcpStream::connect((host, uri.port_u16().unwrap_or(80))).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn seed_keys(
    base: &str,
    token: &str,
    count: usize,
    concurrency: usize,
    out: &str,
) -> anyhow::Result<()> {
    let uri: hyper::Uri = format!("{}/v1/api-keys", base.trim_end_matches('/')).parse()?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.clamp(1, 32) {
        let mut sender = http1(&uri).await?;
        let (uri, token, next) = (uri.clone(), token.to_string(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut keys = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                sender.ready().await?;
                let body = serde_json::json!({
                    "name": format!("bench-{}", keys.len()),
                    "scopes": ["orders:read", "market_data:read"],
                });
                let req = hyper::Request::post(uri.path())
                    .header(
                        "host",
                        uri.authority().map(|a| a.as_str()).unwrap_or("localhost"),
                    )
                    .header("authorization", format!("Bearer {token}"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(Bytes::from(body.to_string())))?;
                let res = sender.send_request(req).await?;
                let status = res.status();
                let bytes = res.into_body().collect().await?.to_bytes();
                anyhow::ensure!(status.as_u16() == 201, "create key: {status} {bytes:?}");
                let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                keys.push(v["key"].as_str().unwrap_or_default().to_string());
            }
            anyhow::Ok(keys)
        }));
    }
    let mut all = Vec::with_capacity(count);
    for w in workers {
        all.extend(w.await??);
    }
    std::fs::write(out, all.join("\n") + "\n")?;
    eprintln!("seeded {} keys into {out}", all.len());
    Ok(())
}

fn report(
    results: &str,
    rss_kib: u64,
    notes: &[String],
    service_cores: u32,
    login_target: f64,
) -> anyhow::Result<()> {
    let runs: Vec<serde_json::Value> = std::fs::read_to_string(results)?
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let by = |name: &str| runs.iter().find(|r| r["name"] == name);
    let all_of = |name: &str| -> Vec<&serde_json::Value> {
        runs.iter().filter(|r| r["name"] == name).collect()
    };
    let field = |name: &str, f: &str| -> Vec<f64> {
        all_of(name).iter().filter_map(|r| r[f].as_f64()).collect()
    };
    let rps = |name: &str| mean(&field(name, "rps"));
    // Per-round throughput: a `mix` run's rounds, else one value per run.
    let round_rps = |name: &str| -> Vec<f64> {
        let runs = all_of(name);
        match runs.as_slice() {
            [one] if one["rounds_rps"].is_array() => one["rounds_rps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_f64())
                .collect(),
            _ => field(name, "rps"),
        }
    };
    // The ratio scenarios run in rounds of short slices (scripts/bench), the
    // order reversed every other round. A ratio is the median over the rounds
    // of the two scenarios' throughput in the same round: the machine's speed
    // drifts by tens of per cent within a minute, and a slice's neighbour ran
    // seconds away, not a minute.
    let ratios = |a: &str, b: &str| -> Vec<f64> {
        round_rps(a)
            .iter()
            .zip(round_rps(b))
            .filter(|(_, d)| *d > 0.0)
            .map(|(n, d)| n / d)
            .collect()
    };
    let ratio = |a: &str, b: &str| median(&ratios(a, b));
    let spread = |a: &str, b: &str| {
        let r = ratios(a, b);
        if r.len() < 2 {
            String::new()
        } else {
            let (lo, hi) = min_max(&r);
            format!(" (rounds: {lo:.2}–{hi:.2}, n = {})", r.len())
        }
    };
    let mut md = String::new();
    for n in notes {
        md.push_str(&format!("{n}\n"));
    }
    md.push_str("\nScenarios measured in rounds (interleaved windows, or several runs): req/s over all of them (the rounds' range); a ratio below is the median over the rounds of its two sides' throughput in the same round.\n");
    md.push_str("\n| scenario | streams / conns | requests | errors | req/s | p50 µs | p99 µs | p99.9 µs | max µs | service CPU µs/req | service core busy | load generator CPU µs/req |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut seen: Vec<&str> = Vec::new();
    for r in runs.iter().filter(|r| r["requests"].is_u64()) {
        let name = r["name"].as_str().unwrap_or("?");
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let slices = all_of(name);
        let sum = |f: &str| slices.iter().filter_map(|r| r[f].as_u64()).sum::<u64>();
        let worst = |f: &str| {
            slices
                .iter()
                .filter_map(|r| r[f].as_u64())
                .max()
                .unwrap_or(0)
        };
        let med = |f: &str| median(&field(name, f));
        let opt = |f: &str, scale: f64, unit: &str| {
            let v = field(name, f);
            if v.is_empty() {
                "?".to_string()
            } else {
                format!("{:.1}{unit}", mean(&v) * scale)
            }
        };
        let rounds = round_rps(name);
        let rps_cell = if rounds.len() > 1 {
            let (lo, hi) = min_max(&rounds);
            format!(
                "{:.0} ({lo:.0}–{hi:.0}, {} rounds)",
                rps(name),
                rounds.len()
            )
        } else {
            format!("{:.0}", rps(name))
        };
        md.push_str(&format!(
            "| {name} | {} / {} | {} | {} | {rps_cell} | {:.0} | {:.0} | {} | {} | {} | {} | {} |\n",
            r["concurrency"],
            r["connections"],
            sum("requests"),
            sum("errors"),
            med("p50_us"),
            med("p99_us"),
            worst("p999_us"),
            worst("max_us"),
            opt("server_cpu_us_per_req", 1.0, ""),
            opt("server_cpu_share", 100.0, " %"),
            opt("loadgen_cpu_us_per_req", 1.0, ""),
        ));
    }
    let b_over_a = ratio("b_verify_warm", "a_grpc_health");
    let e_over_d = ratio("e_users_me_api_key", "d_health_live");
    let b = by("b_verify_warm");
    let p99_b = b
        .map(|_| median(&field("b_verify_warm", "p99_us")) as u64)
        .unwrap_or(u64::MAX);
    // A closed loop keeps every stream busy, so its latency is mostly queueing:
    // the mean is streams / throughput (Little's law), shown beside the p99.
    let little_ms = b
        .and_then(|r| Some(r["concurrency"].as_f64()? / rps("b_verify_warm") * 1000.0))
        .unwrap_or(0.0);
    let rss_mib = rss_kib as f64 / 1024.0;
    let mark = |ok: bool| if ok { "met" } else { "MISSED" };
    // Issue 13: tokens at the cost of keys, many keys at the cost of one.
    let mut ratio_rows = String::new();
    for (a, b, bound, label) in [
        (
            "h_verify_token_64_users",
            "b_verify_warm",
            0.8,
            "(h) VerifyToken / (b) VerifyApiKey",
        ),
        (
            "i_users_me_bearer",
            "e_users_me_api_key",
            0.8,
            "(i) bearer /v1/users/me / (e) X-API-Key",
        ),
        (
            "j_verify_1024_keys_64_users",
            "a_grpc_health",
            0.7,
            "(j) VerifyApiKey 1,024 keys / (a) health",
        ),
        (
            "j_verify_1024_keys_64_users",
            "b_verify_warm",
            0.9,
            "(j) 1,024 keys / (b) one key",
        ),
    ] {
        if by(a).is_some() && by(b).is_some() {
            let r = ratio(a, b);
            ratio_rows.push_str(&format!(
                "| {label} ≥ {bound} | {r:.2}{} | {} |\n",
                spread(a, b),
                mark(r >= bound)
            ));
        }
    }
    md.push_str("\n| target | measured | |\n|---|---:|---|\n");
    md.push_str(&format!(
        "| (b)/(a) ≥ 0.8 | {b_over_a:.2}{} | {} |\n",
        spread("b_verify_warm", "a_grpc_health"),
        mark(b_over_a >= 0.8)
    ));
    md.push_str(&format!(
        "| (e)/(d) ≥ 0.7 | {e_over_d:.2}{} | {} |\n",
        spread("e_users_me_api_key", "d_health_live"),
        mark(e_over_d >= 0.7)
    ));
    md.push_str(&format!(
        "| p99 (b) at 64 streams < 2 ms (mean bound by Little's law: {little_ms:.2} ms) | {:.2} ms | {} |\n",
        p99_b as f64 / 1000.0,
        mark(p99_b < 2000)
    ));
    md.push_str(&format!(
        "| peak RSS < 150 MiB | {rss_mib:.1} MiB | {} |\n",
        mark(rss_mib < 150.0)
    ));
    md.push_str(&ratio_rows);
    // Logins: argon2 is the whole cost by design, so the bound is the service's
    // cores divided by one hash's time (`user-service admin time-argon2`, run on
    // the service's core while the service is idle, before and after (f):
    // their mean).
    let hash_ms: Vec<f64> = runs
        .iter()
        .filter_map(|r| r["argon2_ms_per_hash"].as_f64())
        .collect();
    if !hash_ms.is_empty() {
        let ms = hash_ms.iter().sum::<f64>() / hash_ms.len() as f64;
        let bound = f64::from(service_cores) * 1000.0 / ms;
        let logins = rps("f_login");
        md.push_str(&format!(
            "| logins/s ≥ {login_target} × ({service_cores} core ÷ {ms:.1} ms argon2 = {bound:.1}/s) | {logins:.1} ({:.2} ×) | {} |\n",
            logins / bound,
            mark(logins >= login_target * bound)
        ));
    }
    let p99_of = |name: &str| by(name).map(|_| median(&field(name, "p99_us")) as u64);
    if let (Some(flood), Some(idle)) = (
        p99_of("g_verify_under_login_flood"),
        p99_of("b_verify_warm"),
    ) {
        md.push_str(&format!(
            "| p99 (b) under a login flood ≤ 2 × idle p99 ({:.2} ms) | {:.2} ms ({:.2} ×) | {} |\n",
            idle as f64 / 1000.0,
            flood as f64 / 1000.0,
            flood as f64 / idle.max(1) as f64,
            mark(flood <= 2 * idle)
        ));
    }
    // Issue 14: a login with TOTP costs one argon2 hash plus what the second
    // step costs, and that is no hash (service CPU, measured around the
    // second steps alone).
    let cpu_of = |name: &str| by(name).and_then(|r| r["server_cpu_us_per_req"].as_f64());
    if let (Some(step), Some(hash)) = (
        cpu_of("k_login_totp_second_step"),
        (!hash_ms.is_empty()).then(|| hash_ms.iter().sum::<f64>() / hash_ms.len() as f64),
    ) {
        md.push_str(&format!(
            "| (k) TOTP second step, service CPU < 0.1 × one argon2 hash ({hash:.1} ms) | {:.0} µs ({:.3} ×) | {} |\n",
            step,
            step / 1000.0 / hash,
            mark(step / 1000.0 < 0.1 * hash)
        ));
        // Against the password step of the same rounds: (f) runs seconds
        // earlier, and this machine's speed drifts by tens of per cent.
        if let Some(totp) = cpu_of("k_login_totp") {
            let password = totp - step;
            md.push_str(&format!(
                "| (k) login with TOTP ÷ its password step (service CPU, same rounds) ≤ 1.1 | {totp:.0} µs ÷ {password:.0} µs = {:.2} | {} |\n",
                totp / password,
                mark(totp / password <= 1.1)
            ));
        }
    }
    if let (Some(flood), Some(idle)) =
        (p99_of("l_verify_under_totp_flood"), p99_of("b_verify_warm"))
    {
        md.push_str(&format!(
            "| p99 (b) under a wrong-TOTP flood ≤ 2 × idle p99 ({:.2} ms) | {:.2} ms ({:.2} ×) | {} |\n",
            idle as f64 / 1000.0,
            flood as f64 / 1000.0,
            flood as f64 / idle.max(1) as f64,
            mark(flood <= 2 * idle)
        ));
    }
    print!("{md}");
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}
