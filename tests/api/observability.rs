//! GET /metrics (open in development, guarded elsewhere) and Sentry reporting of
//! errors, the latter through the real binary and a fake Sentry endpoint.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::helpers::{assert_problem, TestApp};

async fn scrape(app: &TestApp) -> String {
    let res = app.get("/metrics").await;
    assert_eq!(res.status().as_u16(), 200);
    let ct = res.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    res.text().await.unwrap()
}

#[tokio::test]
async fn metrics_in_development_show_requests_pool_and_store_health() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/health").await.status().as_u16(), 200);
    let mut body = String::new();
    // The request sample is recorded when its response body ends, just after the
    // client has read it.
    for _ in 0..20 {
        body = scrape(&app).await;
        if body.contains(r#"route="/health""#) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health_count = body
        .lines()
        .find(|l| {
            l.starts_with("http_requests_total{")
                && l.contains(r#"route="/health""#)
                && l.contains(r#"status="200""#)
        })
        .unwrap_or_else(|| panic!("no /health counter in:\n{body}"));
    assert!(
        health_count
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            >= 1.0
    );
    assert!(
        body.contains("http_request_duration_seconds_bucket{"),
        "{body}"
    );
    for gauge in [
        r#"db_pool_connections{state="idle"}"#,
        r#"db_pool_connections{state="in_use"}"#,
        "database_up 1",
        "redis_up 1",
        "api_key_usage_buffer_depth ",
        "user_service_build_info{",
    ] {
        assert!(body.contains(gauge), "missing {gauge} in:\n{body}");
    }
    let max = app.settings.database_max_connections;
    assert!(
        body.contains(&format!("db_pool_max_connections {max}\n")),
        "{body}"
    );
}

#[tokio::test]
async fn metrics_outside_development_need_a_local_peer_or_the_token() {
    let app = TestApp::spawn_with(|v| {
        v.insert("APP_ENV".into(), "staging".into());
        v.insert("METRICS_TOKEN".into(), "scrape-me-0123456789".into());
    })
    .await;
    // Straight from loopback (the host's own Prometheus): allowed.
    scrape(&app).await;

    // Through a proxy (X-Forwarded-For set by Nginx): hidden without the token.
    let via_proxy = || {
        app.http
            .get(app.url("/metrics"))
            .header("x-forwarded-for", "203.0.113.7")
    };
    assert_problem(via_proxy().send().await.unwrap(), 404, "not_found").await;
    let wrong = via_proxy().bearer_auth("nope").send().await.unwrap();
    assert_problem(wrong, 404, "not_found").await;
    let ok = via_proxy()
        .bearer_auth("scrape-me-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    assert!(ok.text().await.unwrap().contains("database_up"));
}

#[tokio::test]
async fn metrics_in_production_without_a_token_refuse_every_forwarded_caller() {
    let app = TestApp::spawn_with(|v| {
        v.insert("APP_ENV".into(), "production".into());
        v.remove("METRICS_TOKEN");
    })
    .await;
    let res = app
        .http
        .get(app.url("/metrics"))
        .header("x-forwarded-for", "10.1.2.3")
        .bearer_auth("")
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "not_found").await;
}

/// A stand-in for Sentry: answers every HTTP request with 200 and reports
/// (path, body) of each POST.
async fn fake_sentry() -> (u16, mpsc::UnboundedReceiver<(String, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    let mut parts = head.split_whitespace();
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    if method == "POST" {
                        let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]);
                        let _ = tx.send((path.to_string(), body.to_string()));
                    }
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                        .await;
                    return;
                }
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn sentry_receives_the_error_that_stops_start_up() {
    let (port, mut events) = fake_sentry().await;
    // An unparsable DATABASE_URL makes App::build fail after tracing and Sentry are up.
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ENV_FILE", ".env.dev")
        .envs(crate::helpers::test_keys().iter().cloned())
        .env("APP_ENV", "development")
        .env("DATABASE_URL", "not a database url")
        .env("REDIS_URL", crate::helpers::redis_url())
        .env("USER_SERVICE_HOST", "127.0.0.1")
        .env("USER_SERVICE_PORT", "0")
        .env("LOG_LEVEL", "warning")
        .env("SENTRY_DSN", format!("http://public@127.0.0.1:{port}/1"))
        .env_remove("RUST_LOG")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the binary exits")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:{stdout}\nstderr:{stderr}"
    );
    assert!(
        stdout.contains("DATABASE_URL is not a valid PostgreSQL URL"),
        "the failure is logged through tracing: {stdout}"
    );

    let (path, body) = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("Sentry received an envelope before the process exited")
        .unwrap();
    assert_eq!(path, "/api/1/envelope/");
    assert!(body.contains(r#""type":"event""#), "{body}");
    assert!(body.contains("user-service stopped on an error"), "{body}");
    assert!(body.contains(r#""environment":"development""#), "{body}");
}
