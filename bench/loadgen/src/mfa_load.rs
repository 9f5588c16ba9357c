//! Issue 14's scenarios for the load generator: enrolling the bench users in
//! TOTP (`seed-mfa`), and logins in two steps (`mfa-login`): the password step
//! costs one argon2 hash, the TOTP step only HMACs and a few queries. Each
//! code is accepted once, so logins go in rounds over many users, each user
//! giving at most the three codes of the current ±1 time steps.

use std::collections::HashMap;
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

/// CPU time of every thread of `pid` so far, in seconds, to the nanosecond
/// (`/proc/<pid>/task/*/schedstat`): the second steps of a round take tens of
/// milliseconds in all, too short for /proc/<pid>/stat's 10 ms ticks.
fn thread_cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

/// Per user, the next step with a code not yet used (the current one or the
/// next: one step of skew; never the previous, which may lapse between the
/// two phases of a round), and marks it used; `None` when every code of the
/// user is spent until the clock moves on.
fn take_step(used: &mut HashMap<usize, u64>, u: usize) -> Option<u64> {
    let now = now_step();
    let step = match used.get(&u) {
        Some(&l) if l > now => return None,
        Some(&l) => (l + 1).max(now),
        None => now,
    };
    used.insert(u, step);
    Some(step)
}

/// Runs `job(i, connection)` for every `i` of `0..n` over the connections
/// (one request in flight on each), in order per connection; answers the
/// results in `i` order and gives the connections back.
async fn over_connections<T, F, Fut>(
    senders: Vec<Sender>,
    n: usize,
    job: F,
) -> anyhow::Result<(Vec<T>, Vec<Sender>)>
where
    F: Fn(usize, Sender) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(T, Sender)>>,
{
    let width = senders.len();
    let job = &job;
    let tasks = senders
        .into_iter()
        .enumerate()
        .map(|(w, mut sender)| async move {
            let mut out = Vec::new();
            for i in (w..n).step_by(width) {
                let (t, s) = job(i, sender).await?;
                sender = s;
                out.push((i, t));
            }
            anyhow::Ok((out, sender))
        });
    let mut all = Vec::new();
    let mut senders = Vec::new();
    for (out, sender) in futures::future::try_join_all(tasks).await? {
        all.extend(out);
        senders.push(sender);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok((all.into_iter().map(|(_, t)| t).collect(), senders))
}

/// `mfa-login`: logins in two steps over `users` (`seed-mfa`'s lines) sharing
/// `password`, in rounds: every user's password step (`concurrency` at a
/// time), then every user's TOTP step, with the service's CPU taken around
/// each phase alone. Each TOTP code is accepted once, so a round needs a fresh
/// code per user; rounds go on while codes are left and `duration` lasts.
/// Prints `<name>` (whole logins: both steps' latency and CPU) and
/// `<name>_second_step` (POST /v1/auth/mfa alone).
pub async fn mfa_login(
    name: &str,
    base: &str,
    users: &str,
    password: &str,
    concurrency: usize,
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
    let uri: hyper::Uri = base.parse()?;
    let authority = uri
        .authority()
        .map_or("localhost", |a| a.as_str())
        .to_string();
    let mut senders = Vec::new();
    for _ in 0..concurrency.max(1) {
        senders.push(super::http1(&uri).await?);
    }
    let cpu = || server_pid.map_or(0.0, thread_cpu_seconds);
    let mut both = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut second = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut cpu_first, mut cpu_second, mut errors) = (0.0, 0.0, 0u64);
    let (mut wall, own_before) = (0.0, super::cpu_seconds("self"));
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < duration {
        let round: Vec<(usize, u64)> = (0..list.len())
            .filter_map(|u| take_step(&mut used, u).map(|s| (u, s)))
            .collect();
        if round.is_empty() {
            if both.is_empty() {
                // Every code is spent: wait for the clock (only before any round).
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            break;
        }
        let t0 = Instant::now();
        let c0 = cpu();
        let (firsts, back) = over_connections(senders, round.len(), |i, mut sender| {
            let (email, authority) = (list[round[i].0].0.clone(), authority.clone());
            async move {
                let start = Instant::now();
                let (s, body) = post(
                    &mut sender,
                    &authority,
                    "/v1/auth/login",
                    None,
                    serde_json::json!({ "email": email, "password": password }),
                )
                .await?;
                let token = (s == 200 && body["mfa_required"] == true)
                    .then(|| body["mfa_token"].as_str().map(str::to_string))
                    .flatten();
                Ok(((token, start.elapsed()), sender))
            }
        })
        .await?;
        let c1 = cpu();
        let (seconds, back) = over_connections(back, round.len(), |i, mut sender| {
            let (u, step) = round[i];
            let token = firsts[i].0.clone();
            let (secret, authority) = (list[u].1.clone(), authority.clone());
            async move {
                let Some(token) = token else {
                    return Ok((None, sender));
                };
                let start = Instant::now();
                let (s, _) = post(
                    &mut sender,
                    &authority,
                    "/v1/auth/mfa",
                    None,
                    serde_json::json!({
                        "mfa_token": token, "method": "totp", "code": code(&secret, step)?,
                    }),
                )
                .await?;
                Ok(((s == 200).then(|| start.elapsed()), sender))
            }
        })
        .await?;
        senders = back;
        cpu_first += c1 - c0;
        cpu_second += cpu() - c1;
        wall += t0.elapsed().as_secs_f64();
        for (f, s) in firsts.iter().zip(&seconds) {
            match s {
                Some(s) => {
                    let us = |d: &Duration| d.as_micros().max(1) as u64;
                    let _ = both.record(us(&f.1) + us(s));
                    let _ = second.record(us(s));
                }
                None => errors += 1,
            }
        }
    }
    let own_cpu = super::cpu_seconds("self") - own_before;
    let count = both.len();
    for (label, h, server_cpu) in [
        (name.to_string(), &both, cpu_first + cpu_second),
        (format!("{name}_second_step"), &second, cpu_second),
    ] {
        println!(
            "{}",
            serde_json::json!({
                "name": label,
                "concurrency": concurrency,
                "connections": concurrency,
                "seconds": wall,
                "requests": count,
                "errors": errors,
                "rps": count as f64 / wall.max(1e-9),
                "p50_us": h.value_at_quantile(0.50),
                "p99_us": h.value_at_quantile(0.99),
                "p999_us": h.value_at_quantile(0.999),
                "max_us": h.max(),
                "loadgen_cpu_us_per_req": own_cpu * 1e6 / count.max(1) as f64,
                "server_cpu_us_per_req": server_pid.map(|_| server_cpu * 1e6 / count.max(1) as f64),
                "server_cpu_share": server_pid.map(|_| server_cpu / wall.max(1e-9)),
            })
        );
    }
    Ok(())
}
