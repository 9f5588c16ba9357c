//! Two replicas on different ports sharing one PostgreSQL database and one Redis
//! prefix: whatever one of them learns (a login, a logout, a failed attempt) holds on
//! the other, because replicas keep no state of their own.

use std::time::{Duration, Instant};

use crate::helpers::{
    assert_problem, fresh_database, get_bearer, login_raw, logout_bearer, test_vars, TestApp,
    STRONG_PASSWORD,
};

/// Two instances from the same variables (port 0 each): same database, same prefix.
async fn two_replicas(
    adjust: impl FnOnce(&mut std::collections::HashMap<String, String>),
) -> (TestApp, TestApp) {
    let mut vars = test_vars(&fresh_database().await);
    adjust(&mut vars);
    let first = TestApp::spawn_vars(vars.clone()).await;
    let second = TestApp::spawn_vars(vars).await;
    assert_ne!(first.port, second.port);
    (first, second)
}

async fn me(app: &TestApp, token: &str) -> reqwest::Response {
    get_bearer(app, "/v1/users/me", token).await
}

#[tokio::test]
async fn a_login_on_one_replica_is_good_on_the_other() {
    let (first, second) = two_replicas(|_| {}).await;
    let (id, email, access) = first.user_with_token().await;
    let res = me(&second, &access).await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["id"], id.to_string());
    assert_eq!(body["email"], email);

    // The refresh token issued by the first replica rotates on the second.
    let login: serde_json::Value = login_raw(&first, &email, STRONG_PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let refreshed = reqwest::Client::new()
        .post(second.url("/v1/auth/refresh"))
        .json(&serde_json::json!({"refresh_token": login["refresh_token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 200);
    let refreshed: serde_json::Value = refreshed.json().await.unwrap();
    let new_access = refreshed["access_token"].as_str().unwrap();
    assert_eq!(me(&first, new_access).await.status(), 200);
}

#[tokio::test]
async fn a_session_ended_on_one_replica_is_refused_by_the_other_within_a_second() {
    let (first, second) = two_replicas(|_| {}).await;
    let (_, _, access) = first.user_with_token().await;
    // Both replicas have seen (and may have cached) the session as live.
    assert_eq!(me(&first, &access).await.status(), 200);
    assert_eq!(me(&second, &access).await.status(), 200);

    let res = logout_bearer(&first, &access).await;
    assert_eq!(res.status(), 204);
    let ended = Instant::now();
    loop {
        let res = me(&second, &access).await;
        if res.status() == 401 {
            assert_problem(res, 401, "invalid_token").await;
            break;
        }
        assert!(
            ended.elapsed() < Duration::from_secs(1),
            "the second replica still accepts an ended session after {:?}",
            ended.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn login_attempt_counters_are_shared_between_replicas() {
    // Five failures lock the account: three on one replica and two on the other
    // reach five only if both replicas count into the same place.
    let (first, second) = two_replicas(|v| {
        v.insert("LOGIN_MAX_ATTEMPTS".into(), "5".into());
    })
    .await;
    let email = format!(
        "s{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    first.register(&email, STRONG_PASSWORD).await;
    for (app, n) in [(&first, 3), (&second, 2)] {
        for _ in 0..n {
            let res = login_raw(app, &email, "not-the-password-at-all").await;
            assert_problem(res, 401, "invalid_credentials").await;
        }
    }
    // Locked everywhere: the right password is refused on both replicas.
    for app in [&first, &second] {
        let res = login_raw(app, &email, STRONG_PASSWORD).await;
        assert_problem(res, 401, "invalid_credentials").await;
    }
}
