//! Login lockout and abuse throttles (issue 10 point 5, issue 11 points 5 and 9):
//! only checked, wrong passwords count; 503s never do; right passwords in parallel
//! never lock; a lock outlives Redis; an attacker's IP locks only itself; sign-ups
//! and denial audit rows are throttled; an API key edits a profile only with the
//! scope for it. Fault tests use servers of their own, never the shared ones.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{
    assert_problem, free_port, get_bearer, login_raw, test_vars, wait_for_port, TestApp,
    STRONG_PASSWORD,
};
use crate::own_postgres::OwnPostgres;

const WRONG: &str = "wrong-password-123";

fn email() -> String {
    format!(
        "u{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

async fn count(app: &TestApp, sql: &str, bind: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(bind)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn audit_count(app: &TestApp, action: &str) -> i64 {
    count(
        app,
        "select count(*) from audit_logs where action = $1",
        action,
    )
    .await
}

/// A login from `ip` (X-Forwarded-For, honoured in these tests' settings).
async fn login_from(app: &TestApp, ip: &str, email: &str, password: &str) -> u16 {
    reqwest::Client::new()
        .post(app.url("/v1/auth/login"))
        .header("x-forwarded-for", ip)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Settings for client IPs taken from X-Forwarded-For sent by the test (the test
/// client is a trusted proxy), a small limit and a short second check.
fn xff_vars(v: &mut std::collections::HashMap<String, String>) {
    v.insert("TRUSTED_PROXIES".into(), "127.0.0.1/32,::1/128".into());
    v.insert("LOGIN_MAX_ATTEMPTS".into(), "3".into());
    v.insert("LOGIN_LOCKED_DELAY_MS".into(), "300".into());
}

#[tokio::test]
async fn parallel_right_passwords_never_lock() {
    let app = TestApp::spawn().await; // LOGIN_MAX_ATTEMPTS=5 (development)
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let logins = (0..32).map(|_| {
        let url = app.url("/v1/auth/login");
        let e = e.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"email": e, "password": STRONG_PASSWORD}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    });
    let statuses: Vec<u16> = futures::future::join_all(logins)
        .await
        .into_iter()
        .map(|s| s.unwrap())
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(audit_count(&app, "auth.lockout").await, 0);
    // Nothing was counted: the full allowance of failures is still there.
    for _ in 0..4 {
        assert_eq!(login_raw(&app, &e, WRONG).await.status(), 401);
    }
    assert_eq!(login_raw(&app, &e, STRONG_PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn wrong_passwords_lock_exactly_at_the_limit_and_the_lock_is_audited() {
    let app = TestApp::spawn_with(|v| {
        v.insert("LOGIN_MAX_ATTEMPTS".into(), "3".into());
    })
    .await;
    let e = email();
    let user = app.register(&e, STRONG_PASSWORD).await;
    for _ in 0..2 {
        assert_eq!(login_raw(&app, &e, WRONG).await.status(), 401);
    }
    assert_eq!(audit_count(&app, "auth.lockout").await, 0);
    assert_eq!(login_raw(&app, &e, WRONG).await.status(), 401);
    let lockouts: Vec<Value> = sqlx::query_scalar(
        "select jsonb_build_object('target', target_id, 'details', details)
           from audit_logs where action = 'auth.lockout'",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(lockouts.len(), 1, "{lockouts:?}");
    assert_eq!(lockouts[0]["target"], user["id"]);
    assert_eq!(
        lockouts[0]["details"]["locks"],
        json!(["account", "client_ip"])
    );
    let res = login_raw(&app, &e, STRONG_PASSWORD).await;
    assert_problem(res, 401, "invalid_credentials").await;
    // More failures while locked neither count again nor audit another lock.
    assert_eq!(login_raw(&app, &e, WRONG).await.status(), 401);
    assert_eq!(audit_count(&app, "auth.lockout").await, 1);
}

#[tokio::test]
async fn an_attacker_ip_locks_itself_out_while_the_owner_still_logs_in() {
    let app = TestApp::spawn_with(xff_vars).await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let (attacker, owner, other) = ("10.66.0.1", "10.77.0.2", "10.88.0.3");
    for _ in 0..10 {
        assert_eq!(login_from(&app, attacker, &e, WRONG).await, 401);
    }
    assert_eq!(audit_count(&app, "auth.lockout").await, 1);
    // The attacker's address is locked hard: even the right password fails.
    assert_eq!(login_from(&app, attacker, &e, STRONG_PASSWORD).await, 401);
    // The owner, from an address that never failed, gets in after the second check.
    let started = Instant::now();
    assert_eq!(login_from(&app, owner, &e, STRONG_PASSWORD).await, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The owner's login does not lift the lock for the attacker.
    assert_eq!(login_from(&app, attacker, &e, STRONG_PASSWORD).await, 401);
    // An address that fails while the account is locked is locked out with it.
    assert_eq!(login_from(&app, other, &e, WRONG).await, 401);
    assert_eq!(login_from(&app, other, &e, STRONG_PASSWORD).await, 401);
    assert_eq!(login_from(&app, owner, &e, STRONG_PASSWORD).await, 200);
}

#[tokio::test]
async fn logins_answered_503_while_postgres_is_down_do_not_count() {
    let Some(pg) = OwnPostgres::init(|_| {}) else {
        eprintln!("SKIPPED logins_answered_503…: no PostgreSQL server binaries");
        return;
    };
    pg.start("");
    let url = pg.url("");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    user_service::store::db::MIGRATOR.run(&pool).await.unwrap();
    pool.close().await;
    let mut vars = test_vars(&url);
    vars.insert("LOGIN_MAX_ATTEMPTS".into(), "3".into());
    let app = TestApp::spawn_vars(vars).await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;

    pg.stop();
    let attempts = (0..8).map(|_| login_raw(&app, &e, WRONG));
    for res in futures::future::join_all(attempts).await {
        assert_problem(res, 503, "unavailable").await;
    }
    pg.start("");

    // Once PostgreSQL is back (the pool reconnects), the right password works.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = login_raw(&app, &e, STRONG_PASSWORD).await.status().as_u16();
        if s != 503 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 200);
    assert_eq!(audit_count(&app, "auth.lockout").await, 0);
    let counted: i64 = sqlx::query_scalar("select count(*) from login_failures")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(counted, 0);
}

/// A redis-server of the test's own on `port`, no persistence.
fn own_redis(port: u16) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server")
}

async fn redis_check(app: &TestApp) -> String {
    let body: Value = app.get("/health").await.json().await.unwrap();
    body["checks"]["redis"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn wait_for_redis_check(app: &TestApp, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while redis_check(app).await != want {
        assert!(Instant::now() < deadline, "redis check never became {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_lock_set_while_redis_is_down_survives_its_return() {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED a_lock_set_while_redis…: no redis-server");
        return;
    }
    let port = free_port();
    let mut redis = own_redis(port);
    assert!(wait_for_port(port).await, "redis-server did not start");
    let app = TestApp::spawn_with(|v| {
        v.insert("REDIS_URL".into(), format!("redis://127.0.0.1:{port}/0"));
        v.insert("LOGIN_MAX_ATTEMPTS".into(), "3".into());
    })
    .await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    wait_for_redis_check(&app, "ok").await;

    redis.kill().unwrap();
    redis.wait().unwrap();
    wait_for_redis_check(&app, "error").await;
    for _ in 0..3 {
        assert_eq!(login_raw(&app, &e, WRONG).await.status(), 401);
    }
    assert_eq!(audit_count(&app, "auth.lockout").await, 1);

    let mut redis = own_redis(port);
    assert!(wait_for_port(port).await, "redis-server did not restart");
    wait_for_redis_check(&app, "ok").await;
    let res = login_raw(&app, &e, STRONG_PASSWORD).await;
    assert_problem(res, 401, "invalid_credentials").await;
    redis.kill().unwrap();
    redis.wait().unwrap();
}

#[tokio::test]
async fn sign_ups_are_throttled_per_ip() {
    let app = TestApp::spawn_with(|v| {
        v.insert("REGISTER_IP_MAX_PER_HOUR".into(), "5".into());
    })
    .await;
    for _ in 0..5 {
        app.register(&email(), STRONG_PASSWORD).await;
    }
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": email(), "password": STRONG_PASSWORD, "full_name": "Sixth"}),
        )
        .await;
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    assert_problem(res, 429, "rate_limited").await;
    assert_eq!(audit_count(&app, "auth.register").await, 5);
}

#[tokio::test]
async fn a_stream_of_denied_requests_writes_few_audit_rows() {
    let app = TestApp::spawn().await;
    let (user_id, _, token) = app.user_with_token().await;
    for chunk in 0..20 {
        let requests = (0..10).map(|_| {
            let path = format!("/v1/trading-accounts/{}", uuid::Uuid::now_v7());
            let (app, token) = (&app, token.clone());
            async move { get_bearer(app, &path, &token).await.status().as_u16() }
        });
        for s in futures::future::join_all(requests).await {
            assert_eq!(s, 404, "chunk {chunk}");
        }
    }
    let actor = user_id.to_string();
    let rows = |action: &'static str| {
        let actor = actor.clone();
        let app = &app;
        async move {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from audit_logs where action = $1 and actor_id = $2",
            )
            .bind(action)
            .bind(actor)
            .fetch_one(&app.db)
            .await
            .unwrap()
        }
    };
    assert_eq!(rows("authz.denied").await, 20);
    assert_eq!(rows("authz.denied.throttled").await, 1);
    // Another actor still gets its own rows.
    let (_, _, other) = app.user_with_token().await;
    let path = format!("/v1/trading-accounts/{}", uuid::Uuid::now_v7());
    assert_eq!(get_bearer(&app, &path, &other).await.status(), 404);
    assert_eq!(audit_count(&app, "authz.denied").await, 21);
}

async fn create_key(app: &TestApp, token: &str, scopes: &[&str]) -> String {
    let res = app
        .http
        .post(app.url("/v1/api-keys"))
        .bearer_auth(token)
        .json(&json!({"name": "k", "scopes": scopes}))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body["key"].as_str().unwrap().to_string()
}

async fn with_key(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let req = reqwest::Client::new()
        .request(method, app.url(path))
        .header("x-api-key", key);
    match body {
        Some(b) => req.json(&b),
        None => req,
    }
    .send()
    .await
    .unwrap()
}

#[tokio::test]
async fn an_api_key_edits_the_profile_only_with_profile_write() {
    use reqwest::Method;
    let app = TestApp::spawn().await;
    let (_, _, token) = app.user_with_token().await;
    let read_only = create_key(&app, &token, &["accounts:read"]).await;
    let rename = json!({"full_name": "Renamed By Key"});
    let res = with_key(
        &app,
        Method::PATCH,
        "/v1/users/me",
        &read_only,
        Some(rename.clone()),
    )
    .await;
    assert_problem(res, 403, "forbidden").await;
    let me: Value = get_bearer(&app, "/v1/users/me", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["full_name"], "Test User");

    // Session-only operations refuse any key, whatever its scopes.
    let profile = create_key(&app, &token, &["profile:write"]).await;
    let password = json!({"current_password": STRONG_PASSWORD, "new_password": "amber-glacier-lantern-42-fjord"});
    for key in [&read_only, &profile] {
        let res = with_key(
            &app,
            Method::POST,
            "/v1/users/me/password",
            key,
            Some(password.clone()),
        )
        .await;
        assert_problem(res, 403, "forbidden").await;
        let res = with_key(&app, Method::GET, "/v1/users/me/sessions", key, None).await;
        assert_eq!(res.status(), 403);
    }

    let res = with_key(&app, Method::PATCH, "/v1/users/me", &profile, Some(rename)).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["full_name"], "Renamed By Key");
}

/// Rows that no longer count (a window or a lock that ran out) are swept for
/// every user; counts still in their window and locks still running stay.
#[tokio::test]
async fn the_sweeper_deletes_only_rows_that_no_longer_count() {
    let app = TestApp::spawn().await;
    let user = app.register(&email(), STRONG_PASSWORD).await;
    let uid: uuid::Uuid = user["id"].as_str().unwrap().parse().unwrap();
    // Development: LOGIN_LOCKOUT_SECONDS is the window too (900 s by default).
    for (ip, started, locked) in [
        ("10.0.0.1", "now() - interval '2 hours'", "null"),
        (
            "10.0.0.2",
            "now() - interval '2 hours'",
            "now() - interval '1 minute'",
        ),
        ("10.0.0.3", "now() - interval '1 minute'", "null"),
        (
            "10.0.0.4",
            "now() - interval '2 hours'",
            "now() + interval '1 hour'",
        ),
    ] {
        sqlx::query(&format!(
            "insert into login_failures (user_id, client_ip, failures, window_started_at, locked_until)
             values ($1, $2, 3, {started}, {locked})"
        ))
        .bind(uid)
        .bind(ip)
        .execute(&app.db)
        .await
        .unwrap();
    }
    // Other tests' replicas share the database and sweep at start too: what
    // this one deletes is not counted, only what is left of this user's rows.
    app.services.sweep_login_failures().await.unwrap();
    let left: Vec<String> = sqlx::query_scalar(
        "select client_ip from login_failures where user_id = $1 order by client_ip",
    )
    .bind(uid)
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(left, ["10.0.0.3", "10.0.0.4"]);
}
