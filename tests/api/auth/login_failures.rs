//! Failed logins: indistinguishable answers, the lockout and its reset, bursts,
//! Redis down, and the per-IP throttle.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    assert_problem, get_bearer, login_raw, logout_bearer, TestApp, STRONG_PASSWORD,
};

use super::{audit_count, email};

// ---- login without leaks, lockout ----

fn lockout_vars(max: &'static str) -> impl FnOnce(&mut std::collections::HashMap<String, String>) {
    move |v| {
        v.insert("LOGIN_MAX_ATTEMPTS".into(), max.into());
        v.insert("TRUSTED_PROXIES".into(), "127.0.0.1/32".into());
    }
}

#[tokio::test]
async fn login_failures_are_indistinguishable() {
    let app = TestApp::spawn_with(lockout_vars("3")).await;
    let wrong = email();
    app.register(&wrong, STRONG_PASSWORD).await;
    let disabled = email();
    app.register(&disabled, STRONG_PASSWORD).await;
    sqlx::query("update users set status = 'disabled' where email = $1")
        .bind(&disabled)
        .execute(&app.db)
        .await
        .unwrap();
    let locked = email();
    app.register(&locked, STRONG_PASSWORD).await;
    for _ in 0..3 {
        login_raw(&app, &locked, "not-the-password-at-all").await;
    }

    // Each path is timed a few times and its fastest answer kept: a load spike on
    // a shared machine slows one sample, never makes a path skip its argon2 work.
    // The wrong password is tried twice only (a third would lock the account).
    let paths = [
        (None, STRONG_PASSWORD, 3),                     // unknown
        (Some(wrong.clone()), "not-the-password-1", 2), // wrong password
        (Some(disabled.clone()), STRONG_PASSWORD, 3),   // disabled, right password
        (Some(locked.clone()), STRONG_PASSWORD, 3),     // locked, right password
    ];
    let mut answers = Vec::new();
    let mut fastest = Vec::new();
    for (who, pw, samples) in &paths {
        let mut best = Duration::MAX;
        for _ in 0..*samples {
            let who = who.clone().unwrap_or_else(email);
            let started = std::time::Instant::now();
            let res = login_raw(&app, &who, pw).await;
            best = best.min(started.elapsed());
            let status = res.status().as_u16();
            let headers = res.headers().clone();
            let body: Value = res.json().await.unwrap();
            assert!(headers.get("set-cookie").is_none());
            answers.push((status, body));
        }
        fastest.push(best);
    }
    let (s0, b0) = &answers[0];
    assert_eq!(*s0, 401);
    assert_eq!(b0["code"], "invalid_credentials");
    for (s, b) in &answers[1..] {
        assert_eq!((s, b), (s0, b0));
    }
    // Every path runs one argon2 verification: no path is many times faster.
    eprintln!("fastest login failures (unknown, wrong, disabled, locked): {fastest:?}");
    let min = *fastest.iter().min().unwrap();
    let max = *fastest.iter().max().unwrap();
    assert!(
        max < min * 5 + Duration::from_millis(50),
        "timings differ: {fastest:?}"
    );
    // Failures are audited with the reason, for operators only.
    let reasons: Vec<String> = sqlx::query_scalar(
        "select details->>'reason' from audit_logs where action = 'auth.login.failed' order by id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    for r in ["unknown_user", "wrong_password", "disabled", "locked"] {
        assert!(reasons.iter().any(|x| x == r), "{r} missing in {reasons:?}");
    }
}

#[tokio::test]
async fn lockout_after_the_limit_and_a_success_resets_the_count() {
    let app = TestApp::spawn_with(|v| {
        lockout_vars("3")(v);
        v.insert("LOGIN_LOCKOUT_SECONDS".into(), "3".into());
    })
    .await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    // Two failures, then a success: the count starts again.
    for _ in 0..2 {
        assert_eq!(
            login_raw(&app, &e, "wrong-password-123").await.status(),
            401
        );
    }
    assert_eq!(login_raw(&app, &e, STRONG_PASSWORD).await.status(), 200);
    for _ in 0..2 {
        assert_eq!(
            login_raw(&app, &e, "wrong-password-123").await.status(),
            401
        );
    }
    assert_eq!(login_raw(&app, &e, STRONG_PASSWORD).await.status(), 200);

    // Three failures lock the account: from the address that failed, the right
    // password fails, whatever the case of the email. (An address that never
    // failed gets a delayed check instead: tests/api/lockout.rs.)
    for _ in 0..3 {
        assert_eq!(
            login_raw(&app, &e, "wrong-password-123").await.status(),
            401
        );
    }
    for _ in 0..3 {
        let res = login_raw(&app, &e.to_uppercase(), STRONG_PASSWORD).await;
        assert_problem(res, 401, "invalid_credentials").await;
    }
    assert_eq!(audit_count(&app, "auth.lockout").await, 1);
    // After the window, the right password works again.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(login_raw(&app, &e, STRONG_PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn a_parallel_burst_cannot_evaluate_more_than_the_limit() {
    let app = TestApp::spawn().await; // LOGIN_MAX_ATTEMPTS=5 (development)
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let burst = (0..50).map(|i| {
        let url = app.url("/v1/auth/login");
        let e = e.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"email": e, "password": format!("wrong-guess-{i}")}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    });
    for s in futures::future::join_all(burst).await {
        assert_eq!(s.unwrap(), 401);
    }
    let evaluated: i64 = sqlx::query_scalar(
        "select count(*) from audit_logs where action = 'auth.login.failed' and details->>'reason' = 'wrong_password'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(evaluated <= 5, "{evaluated} password checks in the burst");
    assert_eq!(login_raw(&app, &e, STRONG_PASSWORD).await.status(), 401);
}

#[tokio::test]
async fn lockout_holds_when_redis_is_down() {
    let app = TestApp::spawn_with(|v| {
        v.insert("REDIS_URL".into(), "redis://127.0.0.1:1/0".into());
        v.insert("LOGIN_MAX_ATTEMPTS".into(), "3".into());
    })
    .await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    // Sessions still work through PostgreSQL.
    let token = app.login(&e, STRONG_PASSWORD).await;
    assert_eq!(get_bearer(&app, "/v1/users/me", &token).await.status(), 200);
    for _ in 0..3 {
        assert_eq!(
            login_raw(&app, &e, "wrong-password-123").await.status(),
            401
        );
    }
    let res = login_raw(&app, &e, STRONG_PASSWORD).await;
    assert_problem(res, 401, "invalid_credentials").await;
    // Logout is still immediate.
    let res = logout_bearer(&app, &token).await;
    assert_eq!(res.status(), 204);
    assert_eq!(get_bearer(&app, "/v1/users/me", &token).await.status(), 401);
}

#[tokio::test]
async fn per_ip_throttle_when_configured() {
    let app = TestApp::spawn_with(|v| {
        v.insert("LOGIN_IP_MAX_PER_MINUTE".into(), "3".into());
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            login_raw(&app, &email(), "whatever-password")
                .await
                .status(),
            401
        );
    }
    let res = login_raw(&app, &email(), "whatever-password").await;
    assert!(res.headers().get("retry-after").is_some());
    assert_problem(res, 429, "rate_limited").await;
}
