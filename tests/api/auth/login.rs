//! Sign-up, login, the session cookie, 401s for missing or bad credentials, the
//! password policy and email normalisation.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{assert_problem, get_bearer, login_raw, TestApp, STRONG_PASSWORD};

use super::{audit_count, email};

#[tokio::test]
async fn register_login_and_me() {
    let app = TestApp::spawn().await;
    let e = email();
    let user = app.register(&e.to_uppercase(), STRONG_PASSWORD).await;
    // Stored normalised; a new user is active with role user.
    assert_eq!(user["email"], e);
    assert_eq!(user["roles"], json!(["user"]));
    assert_eq!(user["status"], "active");
    assert!(user["id"].as_str().unwrap().parse::<uuid::Uuid>().is_ok());
    assert!(user["created_at"].is_string());
    assert!(user.get("password_hash").is_none());

    // The same mailbox in another case is a conflict.
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": format!("  {}", e.to_uppercase()), "password": STRONG_PASSWORD, "full_name": "X"}),
        )
        .await;
    assert_problem(res, 409, "conflict").await;

    // Login matches case-insensitively.
    let res = login_raw(&app, &e.to_uppercase(), STRONG_PASSWORD).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["user"]["id"], user["id"]);
    assert!(body["refresh_token"].as_str().unwrap().len() >= 43);

    let me = get_bearer(&app, "/v1/users/me", body["access_token"].as_str().unwrap()).await;
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.unwrap();
    assert_eq!(me, user);

    // The password is stored as argon2id with the OWASP parameters.
    let hash: String = sqlx::query_scalar("select password_hash from users where email = $1")
        .bind(&e)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    assert_eq!(audit_count(&app, "auth.register").await, 1);
    assert_eq!(audit_count(&app, "auth.login.succeeded").await, 1);
    // No secret in any audit row.
    let rows: Vec<String> =
        sqlx::query_scalar("select details::text || coalesce(user_agent,'') from audit_logs")
            .fetch_all(&app.db)
            .await
            .unwrap();
    for r in rows {
        assert!(!r.contains(STRONG_PASSWORD) && !r.contains("argon2"), "{r}");
    }
}

#[tokio::test]
async fn registration_can_be_turned_off() {
    let app = TestApp::spawn_with(|v| {
        v.insert("REGISTRATION_ENABLED".into(), "false".into());
    })
    .await;
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": email(), "password": STRONG_PASSWORD, "full_name": "X"}),
        )
        .await;
    assert_problem(res, 403, "forbidden").await;
}

#[tokio::test]
async fn login_sets_the_session_cookie_which_authenticates() {
    let app = TestApp::spawn().await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let res = app
        .post_json(
            "/v1/auth/login",
            &json!({"email": e, "password": STRONG_PASSWORD}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_string();
    // Development: SESSION_COOKIE_SECURE=false, so no __Host- prefix and no Secure.
    assert!(cookie.starts_with("sb_session="), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Lax"), "{cookie}");
    assert!(cookie.contains("Path=/"), "{cookie}");
    assert!(!cookie.contains("Secure"), "{cookie}");
    // The shared client keeps the cookie: it alone authenticates.
    let me = app.get("/v1/users/me").await;
    assert_eq!(me.status(), 200);
    assert_eq!(me.json::<Value>().await.unwrap()["email"], e);

    // Secure environments use the __Host- prefix and Secure.
    let secure = TestApp::spawn_with(|v| {
        v.insert("SESSION_COOKIE_SECURE".into(), "true".into());
        v.insert("SESSION_COOKIE_SAMESITE".into(), "strict".into());
    })
    .await;
    secure.register(&e, STRONG_PASSWORD).await;
    let res = login_raw(&secure, &e, STRONG_PASSWORD).await;
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("__Host-sb_session="), "{cookie}");
    assert!(
        cookie.contains("; Secure") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
}

#[tokio::test]
async fn missing_or_bad_credentials_are_401_invalid_token() {
    let app = TestApp::spawn().await;
    let res = app.get("/v1/users/me").await;
    assert_eq!(
        res.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert_problem(res, 401, "invalid_token").await;
    for auth in [
        "Bearer",
        "Bearer garbage",
        "Basic dXNlcjpwdw==",
        "Bearer a.b.c",
    ] {
        let res = reqwest::Client::new()
            .get(app.url("/v1/users/me"))
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        assert_problem(res, 401, "invalid_token").await;
    }
    let res = reqwest::Client::new()
        .get(app.url("/v1/users/me"))
        .header("cookie", "sb_session=not-a-session")
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "invalid_token").await;
}

// ---- password policy and email normalisation ----

#[tokio::test]
async fn password_policy_refusals_say_why() {
    let app = TestApp::spawn().await;
    let e = "carol.jones@example.com";
    let cases = [
        ("short-Pw1", "too_short"),
        ("password1234", "too_weak"),
        ("qwertyuiopasdf", "too_weak"),
        ("my-carol.jones-is-strong-77", "contains_email"),
    ];
    for (pw, code) in cases {
        let res = app
            .post_json(
                "/v1/auth/register",
                &json!({"email": e, "password": pw, "full_name": "Carol"}),
            )
            .await;
        let body = assert_problem(res, 400, "validation_failed").await;
        assert_eq!(body["errors"][0]["field"], "password", "{pw}: {body}");
        assert_eq!(body["errors"][0]["code"], code, "{pw}: {body}");
        assert!(!body["errors"][0]["message"].as_str().unwrap().is_empty());
    }
    // Over the hard cap: refused before any hashing, so it answers fast.
    let started = std::time::Instant::now();
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": e, "password": "ж".repeat(257), "full_name": "Carol"}),
        )
        .await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["code"], "too_long");
    assert!(started.elapsed() < Duration::from_millis(500));
    // Login refuses it the same way (no hashing of huge inputs).
    let res = login_raw(&app, e, &"x".repeat(300)).await;
    assert_problem(res, 400, "validation_failed").await;
    assert_eq!(audit_count(&app, "auth.register").await, 0);

    // 64 characters without any composition rule, and exactly 256 (counted in
    // characters, not bytes), are accepted and not truncated.
    let long64 = "the quiet harbour keeps seven lanterns burning until dawn arrives";
    assert_eq!(long64.chars().count(), 65);
    app.register(e, long64).await;
    assert_eq!(login_raw(&app, e, long64).await.status(), 200);
    assert_eq!(login_raw(&app, e, &long64[..64]).await.status(), 401);
    let e2 = email();
    let random: String = (0..8)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let pw256: String = format!("ж{}", &random[..255]);
    assert_eq!(pw256.chars().count(), 256);
    app.register(&e2, &pw256).await;
    assert_eq!(login_raw(&app, &e2, &pw256).await.status(), 200);
}

#[tokio::test]
async fn emails_are_normalised_before_lookup() {
    let app = TestApp::spawn().await;
    // Fullwidth letters and surrounding space: NFKC, trim, lower-case.
    let user = app
        .register("  ＤＡＶＥ@Example.com ", STRONG_PASSWORD)
        .await;
    assert_eq!(user["email"], "dave@example.com");
    assert_eq!(
        login_raw(&app, "DAVE@EXAMPLE.COM", STRONG_PASSWORD)
            .await
            .status(),
        200
    );
    assert_eq!(
        login_raw(&app, "ｄａｖｅ@example.com", STRONG_PASSWORD)
            .await
            .status(),
        200
    );
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": "Dave@EXAMPLE.com", "password": STRONG_PASSWORD, "full_name": "D"}),
        )
        .await;
    assert_problem(res, 409, "conflict").await;
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": "not-an-email", "password": STRONG_PASSWORD, "full_name": "D"}),
        )
        .await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "email");
}
