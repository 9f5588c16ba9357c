//! Issue 14's scenarios for the load generator: enrolling the bench users in
//! TOTP (`seed-mfa`), and logins in two steps (`mfa-login`): the password step
//! costs one argon2 hash, the TOTP step only HMACs and a few queries. Each
//! code is accepted once, so workers take turns over many users, each user
//! giving at most the three codes of the current ±1 time steps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

fn now_step() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        / 30
}

fn code(secret_b32: &str, step: u64) -> anyhow::Result<String> {
    let raw = totp_rs::Secret::Encoded(secret_b32.to_string())
        .to_bytes()
        .map_err(|e| anyhow::anyhow!("bad secret: {e:?}"))?;
    Ok(user_service::domain::mfa::totp_code_at_step(&raw, step))
}

/// POST `path` with a JSON body (and a bearer token): (status, JSON body).
async fn post(
    sender: &mut Sender,
    authority: &str,
    path: &str,
    bearer: Option<&str>,
    body: serde_json::Value,
) -> anyhow::Result<(u16, serde_json::Value)> {
    sender.ready().await?;
    let mut b = hyper::Request::post(path)
        .header("host", authority)
        .header("content-type", "application/json");
    if let Some(t) = bearer {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let res = sender
        .send_request(b.body(Full::new(Bytes::from(body.to_string())))?)
        .await?;
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or_default()))
}

/// Enrols every user of `users` (lines `email<TAB>access token`) in TOTP and
/// writes `email<TAB>base32 secret<TAB>step used` lines to `out`. The
/// confirming code is the previous step's, leaving the current and next steps
/// for logins.
pub async fn seed_mfa(base: &str, users: &str, out: &str) -> anyhow::Result<()> {
    let uri: hyper::Uri = base.parse()?;
    let authority = uri
        .authority()
        .map_or("localhost", |a| a.as_str())
        .to_string();
    let mut sender = super::http1(&uri).await?;
    let mut lines = Vec::new();
    for line in super::read_lines(users)? {
        let (email, token) = line
            .split_once('\t')
            .ok_or_else(|| anyhow::anyhow!("expected email<TAB>token"))?;
        let (s, e) = post(
            &mut sender,
            &authority,
            "/v1/users/me/mfa/totp",
            Some(token),
            serde_json::json!({}),
        )
        .await?;
        anyhow::ensure!(s == 201, "enrol {email}: {s} {e}");
        let secret = e["secret"].as_str().unwrap_or_default().to_string();
        let step = now_step() - 1;
        let c = code(&secret, step)?;
        let (s, b) = post(
            &mut sender,
            &authority,
            "/v1/users/me/mfa/totp/confirm",
            Some(token),
            serde_json::json!({ "code": c }),
        )
        .await?;
        anyhow::ensure!(s == 200, "confirm {email}: {s} {b}");
        lines.push(format!("{email}\t{secret}\t{step}"));
    }
    std::fs::write(out, lines.join("\n") + "\n")?;
    eprintln!("enrolled {} users in TOTP into {out}", lines.len());
    Ok(())
}

struct Run {
    measuring: AtomicBool,
    stop: AtomicBool,
    next: AtomicUsize,
    /// Per user, the last time step used.
    used: Mutex<HashMap<usize, u64>>,
}

impl Run {
    /// A user with a code still unused, and that code's step.
    fn take(&self, users: usize) -> Option<(usize, u64)> {
        let now = now_step();
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..users {
            let u = self.next.fetch_add(1, Ordering::Relaxed) % users;
            let step = match used.get(&u) {
                Some(&l) if l > now => continue,
                Some(&l) => (l + 1).max(now - 1),
                None => now - 1,
            };
            used.insert(u, step);
            return Some((u, step));
        }
        None
    }
}

struct Tallies {
    both: Histogram<u64>,
    second: Histogram<u64>,
    errors: u64,
}

/// `mfa-login`: logins in two steps over `users` (`seed-mfa`'s lines)
/// sharing `password`. Prints two result lines: `<name>` (both steps) and
/// `<name>_second_step` (POST /v1/auth/mfa alone).
#[allow(clippy::too_many_arguments)]
pub async fn mfa_login(
    name: &str,
    base: &str,
    users: &str,
    password: &str,
    concurrency: usize,
    warmup: f64,
    duration: f64,
    server_pid: Option<u32>,
) -> anyhow::Result<()> {
    let mut used = HashMap::new();
    let mut list = Vec::new();
    for (i, l) in super::read_lines(users)?.into_iter().enumerate() {
        let f: Vec<&str> = l.split('\t').collect();
        anyhow::ensure!(f.len() == 3, "expected email<TAB>secret<TAB>step");
        used.insert(i, f[2].parse::<u64>()?);
        list.push((f[0].to_string(), f[1].to_string()));
    }
    anyhow::ensure!(!list.is_empty(), "no users");
    let users = list;
    let users = Arc::new(users);
    let uri: hyper::Uri = base.parse()?;
    let authority = uri
        .authority()
        .map_or("localhost", |a| a.as_str())
        .to_string();
    let run = Arc::new(Run {
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        next: AtomicUsize::new(0),
        used: Mutex::new(used),
    });
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let mut sender = super::http1(&uri).await?;
        let (run, users, authority, password) = (
            run.clone(),
            users.clone(),
            authority.clone(),
            password.to_string(),
        );
        workers.push(tokio::spawn(async move {
            let mut t = Tallies {
                both: Histogram::new_with_bounds(1, 60_000_000, 3)?,
                second: Histogram::new_with_bounds(1, 60_000_000, 3)?,
                errors: 0,
            };
            while !run.stop.load(Ordering::Relaxed) {
                let Some((u, step)) = run.take(users.len()) else {
                    // Every user's codes are spent until the clock moves on.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (email, secret) = &users[u];
                let start = Instant::now();
                let (s, first) = post(
                    &mut sender,
                    &authority,
                    "/v1/auth/login",
                    None,
                    serde_json::json!({ "email": email, "password": password }),
                )
                .await?;
                let second_start = Instant::now();
                let ok = if s == 200 && first["mfa_required"] == true {
                    let (s, _) = post(
                        &mut sender,
                        &authority,
                        "/v1/auth/mfa",
                        None,
                        serde_json::json!({
                            "mfa_token": first["mfa_token"],
                            "method": "totp",
                            "code": code(secret, step)?,
                        }),
                    )
                    .await?;
                    s == 200
                } else {
                    false
                };
                if run.measuring.load(Ordering::Relaxed) {
                    if ok {
                        let _ = t.both.record(start.elapsed().as_micros().max(1) as u64);
                        let _ = t
                            .second
                            .record(second_start.elapsed().as_micros().max(1) as u64);
                    } else {
                        t.errors += 1;
                    }
                }
            }
            anyhow::Ok(t)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let cpu_before = (
        super::cpu_seconds("self"),
        server_pid.map(|p| super::cpu_seconds(&p.to_string())),
    );
    run.measuring.store(true, Ordering::Relaxed);
    let measured = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(duration)).await;
    run.measuring.store(false, Ordering::Relaxed);
    let elapsed = measured.elapsed().as_secs_f64();
    let own_cpu = super::cpu_seconds("self") - cpu_before.0;
    let server_cpu = server_pid
        .zip(cpu_before.1)
        .map(|(p, before)| super::cpu_seconds(&p.to_string()) - before);
    run.stop.store(true, Ordering::Relaxed);
    let mut both = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut second = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for w in workers {
        let t = w.await??;
        both.add(&t.both)?;
        second.add(&t.second)?;
        errors += t.errors;
    }
    for (label, h, whole) in [
        (name.to_string(), &both, true),
        (format!("{name}_second_step"), &second, false),
    ] {
        let count = h.len();
        // The service's CPU covers both steps: shown once, on the whole login.
        let server_cpu = server_cpu.filter(|_| whole);
        println!(
            "{}",
            serde_json::json!({
                "name": label,
                "concurrency": concurrency,
                "connections": concurrency,
                "seconds": elapsed,
                "requests": count,
                "errors": errors,
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
    }
    Ok(())
}
