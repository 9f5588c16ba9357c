//! The browser and network edge (DESIGN §9, issues 10 and 11): CORS preflights,
//! security headers on every answer, validation errors that name the field and
//! never the value, and metrics labels that clients cannot multiply.

use std::collections::HashMap;

use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::json;

use crate::helpers::{
    assert_problem, free_port, fresh_database, test_vars, wait_for_port, TestApp, STRONG_PASSWORD,
};

const ALLOWED: &str = "http://localhost:3000";

fn preflight(app: &TestApp, path: &str, method: &str, origin: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(Method::OPTIONS, app.url(path))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header(
            "access-control-request-headers",
            "content-type,authorization,x-api-key,x-request-id",
        )
}

fn list(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

fn cors_headers(h: &HeaderMap) -> Vec<String> {
    h.keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

#[tokio::test]
async fn preflights_from_allowed_origins_answer_on_every_route() {
    let app = TestApp::spawn().await;
    let id = uuid::Uuid::new_v4();
    let routes = [
        ("/v1/auth/login", "POST"),
        ("/v1/auth/register", "POST"),
        ("/v1/auth/refresh", "POST"),
        ("/v1/auth/logout", "POST"),
        ("/v1/users/me", "GET"),
        ("/v1/users/me", "PATCH"),
        ("/v1/api-keys", "POST"),
        (&format!("/v1/api-keys/{id}") as &str, "DELETE"),
        (&format!("/v1/trading-accounts/{id}/credentials"), "PUT"),
        ("/health", "GET"),
    ];
    for origin in [ALLOWED, "http://localhost:5173"] {
        for (path, method) in routes {
            let res = preflight(&app, path, method, origin).send().await.unwrap();
            assert_eq!(res.status(), 204, "{method} {path} from {origin}");
            let h = res.headers();
            assert_eq!(h["access-control-allow-origin"], origin, "{path}");
            assert_eq!(h["access-control-allow-credentials"], "true");
            let methods = list(h, "access-control-allow-methods");
            for m in ["get", "post", "put", "patch", "delete"] {
                assert!(methods.contains(&m.to_string()), "{methods:?}");
            }
            let headers = list(h, "access-control-allow-headers");
            for wanted in ["content-type", "authorization", "x-api-key", "x-request-id"] {
                assert!(headers.contains(&wanted.to_string()), "{headers:?}");
            }
            let max_age: u64 = h["access-control-max-age"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(max_age > 0);
            assert!(list(h, "vary").contains(&"origin".to_string()));
            assert_eq!(h["x-content-type-options"], "nosniff");
        }
    }

    // The actual request from the allowed origin is readable by that page.
    let res = reqwest::Client::new()
        .post(app.url("/v1/auth/login"))
        .header("origin", ALLOWED)
        .json(&json!({"email": "nobody@example.com", "password": "wrong-password-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["access-control-allow-origin"], ALLOWED);
    assert_eq!(res.headers()["access-control-allow-credentials"], "true");
    assert!(list(res.headers(), "vary").contains(&"origin".to_string()));
}

#[tokio::test]
async fn other_origins_get_no_cors_headers() {
    let app = TestApp::spawn().await;
    for origin in [
        "http://evil.example",
        "http://localhost:3000.evil.example",
        "https://localhost:3000",
        "http://127.0.0.1:3000",
        "null",
    ] {
        let res = preflight(&app, "/v1/auth/login", "POST", origin)
            .send()
            .await
            .unwrap();
        assert_ne!(res.status(), 204, "{origin}");
        assert!(
            cors_headers(res.headers()).is_empty(),
            "{origin}: {:?}",
            res.headers()
        );
        assert!(list(res.headers(), "vary").contains(&"origin".to_string()));

        let res = reqwest::Client::new()
            .get(app.url("/health"))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(
            cors_headers(res.headers()).is_empty(),
            "{origin}: {:?}",
            res.headers()
        );
        assert!(list(res.headers(), "vary").contains(&"origin".to_string()));
    }
    // No Origin at all (a server-side caller): no CORS headers, Vary all the same.
    let res = app.get("/health").await;
    assert!(cors_headers(res.headers()).is_empty());
    assert!(list(res.headers(), "vary").contains(&"origin".to_string()));
}

fn assert_security_headers(what: &str, h: &HeaderMap, hsts: bool) {
    assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(h["x-frame-options"], "DENY", "{what}");
    assert_eq!(
        h["content-security-policy"], "default-src 'none'; frame-ancestors 'none'",
        "{what}"
    );
    assert_eq!(h["referrer-policy"], "no-referrer", "{what}");
    if hsts {
        assert_eq!(
            h["strict-transport-security"], "max-age=63072000; includeSubDomains",
            "{what}"
        );
    } else {
        assert!(!h.contains_key("strict-transport-security"), "{what}");
    }
}

fn assert_no_store(what: &str, h: &HeaderMap) {
    let cc = list(h, "cache-control");
    assert!(cc.contains(&"no-store".to_string()), "{what}: {cc:?}");
}

/// Every kind of answer the gateway gives, each checked for the headers.
async fn check_security_headers(app: &TestApp, hsts: bool) {
    let c = reqwest::Client::new();
    let email = format!(
        "h{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": email, "password": STRONG_PASSWORD, "full_name": "H"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    assert_security_headers("register", res.headers(), hsts);
    assert_no_store("register", res.headers());

    let res = c
        .post(app.url("/v1/auth/login"))
        .json(&json!({"email": email, "password": STRONG_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_security_headers("login", res.headers(), hsts);
    assert_no_store("login", res.headers());
    let tokens: serde_json::Value = res.json().await.unwrap();

    let res = c
        .post(app.url("/v1/auth/refresh"))
        .json(&json!({"refresh_token": tokens["refresh_token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_security_headers("refresh", res.headers(), hsts);
    assert_no_store("refresh", res.headers());
    let tokens: serde_json::Value = res.json().await.unwrap();
    let access = tokens["access_token"].as_str().unwrap();

    let res = c
        .get(app.url("/v1/users/me"))
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_security_headers("me", res.headers(), hsts);
    assert_no_store("me", res.headers());

    let res = c
        .post(app.url("/v1/api-keys"))
        .bearer_auth(access)
        .json(&json!({"name": "k", "scopes": ["orders:read"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_security_headers("api key", res.headers(), hsts);
    assert_no_store("api key", res.headers());

    let (client_id, secret) = app.service_client(&["auth:verify"]).await;
    let res = app.service_token_raw(&client_id, &secret).await;
    assert_eq!(res.status(), 200);
    assert_security_headers("service token", res.headers(), hsts);
    assert_no_store("service token", res.headers());

    // Errors of every kind.
    let login = app.url("/v1/auth/login");
    let errors = [
        (c.get(app.url("/no/such/route")), 404, "not_found"),
        (c.get(app.url("/v1/users/me")), 401, "invalid_token"),
        (c.delete(&login), 405, "method_not_allowed"),
        (
            c.post(&login)
                .header("content-type", "application/json")
                .body(vec![b' '; 2 * 1024 * 1024]),
            413,
            "payload_too_large",
        ),
        (
            c.post(&login)
                .header("content-type", "text/plain")
                .body("{}"),
            415,
            "unsupported_media_type",
        ),
        (
            c.post(&login).json(&json!({"email": 1})),
            400,
            "validation_failed",
        ),
    ];
    for (req, status, code) in errors {
        let res = req.send().await.unwrap();
        assert_security_headers(code, res.headers(), hsts);
        assert_no_store(code, res.headers());
        assert_problem(res, status, code).await;
    }
    let res = app.service_token_raw(&client_id, "wrong").await;
    assert_security_headers("invalid_client", res.headers(), hsts);
    assert_no_store("invalid_client", res.headers());
    assert_problem(res, 401, "invalid_client").await;
    for path in [
        "/health",
        "/health/live",
        "/openapi.json",
        "/.well-known/jwks.json",
    ] {
        let res = c.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert_security_headers(path, res.headers(), hsts);
    }
}

#[tokio::test]
async fn every_gateway_answer_carries_the_security_headers() {
    let app = TestApp::spawn().await;
    check_security_headers(&app, false).await;
}

#[tokio::test]
async fn staging_adds_strict_transport_security() {
    // App::build does not run the start-up checks, so the dev stores will do.
    let app = TestApp::spawn_with(|v| {
        v.insert("APP_ENV".into(), "staging".into());
    })
    .await;
    assert_eq!(
        app.settings.app_env,
        user_service::config::Environment::Staging
    );
    check_security_headers(&app, true).await;
}

// ---- validation errors name the path, never the value ----

async fn errors_of(res: reqwest::Response, secret: &str) -> Vec<(String, String)> {
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(!text.contains(secret), "the value leaked: {text}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["code"], "validation_failed", "{text}");
    body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["field"].as_str().unwrap().to_string(),
                e["code"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn one(field: &str, code: &str) -> Vec<(String, String)> {
    vec![(field.to_string(), code.to_string())]
}

#[tokio::test]
async fn validation_errors_name_the_json_path_never_the_value() {
    let app = TestApp::spawn().await;
    let (_, _, token) = app.user_with_token().await;
    let c = reqwest::Client::new();
    let login = |body: serde_json::Value| c.post(app.url("/v1/auth/login")).json(&body).send();

    // Type errors.
    let res = login(json!({"email": 12345, "password": "x"}))
        .await
        .unwrap();
    assert_eq!(errors_of(res, "12345").await, one("email", "invalid_type"));
    let res = login(json!({"email": "a@example.com", "password": ["hunter2-secret"]}))
        .await
        .unwrap();
    assert_eq!(
        errors_of(res, "hunter2-secret").await,
        one("password", "invalid_type")
    );
    // Missing fields.
    let res = login(json!({"password": "pw-7781-secret"})).await.unwrap();
    assert_eq!(
        errors_of(res, "pw-7781-secret").await,
        one("email", "required")
    );
    // Unknown fields: the name is the field; its value stays out.
    let res = login(json!({"email": "a@example.com", "password": "x", "otp": "val-4242-secret"}))
        .await
        .unwrap();
    assert_eq!(
        errors_of(res, "val-4242-secret").await,
        one("otp", "unknown_field")
    );

    // Inside arrays: the index is part of the path.
    let keys = |body: serde_json::Value| {
        c.post(app.url("/v1/api-keys"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let res = keys(json!({"name": "k", "scopes": ["orders:read", 987654]}))
        .await
        .unwrap();
    assert_eq!(
        errors_of(res, "987654").await,
        one("scopes[1]", "invalid_type")
    );
    let res = keys(json!({"name": "k", "scopes": ["orders:read"], "trading_account_ids": ["not-a-uuid-31337"]}))
        .await
        .unwrap();
    assert_eq!(
        errors_of(res, "31337").await,
        one("trading_account_ids[0]", "invalid")
    );
    let res = keys(json!({"name": "k", "scopes": ["orders:read"], "expires_at": "tomorrow-at-55"}))
        .await
        .unwrap();
    assert_eq!(
        errors_of(res, "tomorrow-at-55").await,
        one("expires_at", "invalid")
    );

    // Refresh through a body, and the service-token form.
    let res = c
        .post(app.url("/v1/auth/refresh"))
        .json(&json!({"refresh_token": 8675309}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        errors_of(res, "8675309").await,
        one("refresh_token", "invalid_type")
    );
    let res = c
        .post(app.url("/v1/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_secret", "s3cr3t-424242"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(errors_of(res, "424242").await, one("client_id", "required"));
    // Query strings too.
    let res = c
        .get(app.url("/v1/api-keys?limit=abc-99123"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(errors_of(res, "99123").await, one("limit", "invalid"));

    // Not JSON at all: the body as a whole, and where it broke.
    let res = c
        .post(app.url("/v1/auth/login"))
        .header("content-type", "application/json")
        .body(r#"{"email": "x@example.com", "password": "p4ss-secret"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        errors_of(res, "p4ss-secret").await,
        one("body", "invalid_json")
    );
    let res = c
        .post(app.url("/v1/auth/login"))
        .header("content-type", "application/json")
        .body(r#"{"email": "x@example.com", "password": "p"} trailing-77"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        errors_of(res, "trailing-77").await,
        one("body", "invalid_json")
    );
}

// ---- metrics labels cannot be multiplied by clients ----

/// The series the process exports (sample lines of the exposition format).
fn series(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.rsplit_once(' ').map_or(l, |(name, _)| name))
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// `n` junk requests, all unique: made-up paths, made-up methods (on real and
/// made-up routes), and gRPC calls to made-up methods under our packages and
/// `grpc.`. `round` keeps every batch's names new.
async fn junk(base: &str, channel: tonic::transport::Channel, round: &str, n: usize) {
    use futures::stream::{self, StreamExt};
    let http = reqwest::Client::new();
    stream::iter(0..n)
        .for_each_concurrent(16, |i| {
            let (http, channel) = (http.clone(), channel.clone());
            async move {
                match i % 4 {
                    0 => {
                        let _ = http.get(format!("{base}/junk/{round}/{i}")).send().await;
                    }
                    1 => {
                        let m = Method::from_bytes(format!("J{round}X{i}").as_bytes()).unwrap();
                        let _ = http.request(m, format!("{base}/v1/users/me")).send().await;
                    }
                    2 => {
                        // A gRPC content type over HTTP/1.1, as a scanner sends it.
                        let _ = http
                            .post(format!(
                                "{base}/stocksblitz.user.v1.AuthService/J{round}{i}"
                            ))
                            .header("content-type", "application/grpc")
                            .body(vec![0u8; 5])
                            .send()
                            .await;
                    }
                    _ => {
                        let path = if i % 8 == 3 {
                            format!("/stocksblitz.j{round}.S{i}/M")
                        } else {
                            format!("/grpc.j{round}.S/M{i}")
                        };
                        let mut grpc = tonic::client::Grpc::new(channel);
                        if grpc.ready().await.is_ok() {
                            let codec = tonic_prost::ProstCodec::<(), ()>::default();
                            let res = grpc
                                .unary(tonic::Request::new(()), path.parse().unwrap(), codec)
                                .await;
                            assert_eq!(
                                res.unwrap_err().code(),
                                tonic::Code::Unimplemented,
                                "{path}"
                            );
                        }
                    }
                }
            }
        })
        .await;
}

#[tokio::test]
async fn junk_paths_and_methods_do_not_grow_metrics_or_memory() {
    // A process of its own, so its memory and metrics are only what this test sends.
    let database_url = fresh_database().await;
    let port = free_port();
    let mut vars: HashMap<String, String> = test_vars(&database_url);
    vars.insert("USER_SERVICE_PORT".into(), port.to_string());
    vars.insert("LOG_LEVEL".into(), "error".into());
    vars.insert("ENV_FILE".into(), "/dev/null".into());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&vars)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    assert!(wait_for_port(port).await, "the service listens");
    let base = format!("http://127.0.0.1:{port}");
    let channel = tonic::transport::Channel::from_shared(base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let scrape = || async {
        let body = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        body
    };

    // Warm up: the "unmatched" and "other" series exist, the allocator has its pools.
    junk(&base, channel.clone(), "w", 2_000).await;
    scrape().await;
    let before = scrape().await;
    let rss_before = rss_kib(pid);

    junk(&base, channel.clone(), "r", 12_000).await;
    let after = scrape().await;
    let rss_after = rss_kib(pid);
    let _ = child.kill().await;
    let (b, a) = (series(&before), series(&after));
    let new: Vec<&&str> = a.iter().filter(|s| !b.contains(s)).collect();
    assert!(
        new.is_empty(),
        "{} new series after junk requests, e.g. {:?}",
        new.len(),
        &new[..new.len().min(5)]
    );
    assert_eq!(a.len(), b.len());
    assert!(
        !after.contains("junk") && !after.contains("Jr") && !after.contains(".jr"),
        "a client-chosen name became a label"
    );
    for label in [
        r#"route="unmatched""#,
        r#"method="other""#,
        r#"rpc="unmatched""#,
    ] {
        assert!(after.contains(label), "{label} missing");
    }
    println!("RSS {rss_before} KiB -> {rss_after} KiB after 12000 junk requests");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}
