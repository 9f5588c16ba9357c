//! Refresh-token rotation and reuse, idle sessions, the cookie refresh, listing and
//! ending sessions, and a password change ending the others.

use serde_json::{json, Value};

use crate::helpers::{assert_problem, get_bearer, login_raw, TestApp, STRONG_PASSWORD};

use super::{audit_count, email};

// ---- refresh, sessions, password change ----

async fn login_pair(app: &TestApp, e: &str) -> (String, String) {
    let body: Value = login_raw(app, e, STRONG_PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    (
        body["access_token"].as_str().unwrap().to_string(),
        body["refresh_token"].as_str().unwrap().to_string(),
    )
}

async fn refresh(app: &TestApp, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(app.url("/v1/auth/refresh"))
        .json(&json!({ "refresh_token": token }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_session() {
    let app = TestApp::spawn().await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let (access1, refresh1) = login_pair(&app, &e).await;

    let res = refresh(&app, &refresh1).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let (access2, refresh2) = (
        body["access_token"].as_str().unwrap().to_string(),
        body["refresh_token"].as_str().unwrap().to_string(),
    );
    assert_ne!(refresh1, refresh2);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["user"]["email"], e);
    assert_eq!(
        get_bearer(&app, "/v1/users/me", &access2).await.status(),
        200
    );
    // Only the SHA-256 of a token is stored.
    use sha2::Digest as _;
    for (value, want) in [
        (refresh2.as_bytes().to_vec(), 0i64),
        (sha2::Sha256::digest(&refresh2).to_vec(), 1),
    ] {
        let n: i64 =
            sqlx::query_scalar("select count(*) from refresh_tokens where token_hash = $1")
                .bind(value)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(n, want);
    }

    // Reusing the first token: refused, and the whole session ends.
    let res = refresh(&app, &refresh1).await;
    assert_problem(res, 401, "invalid_token").await;
    assert_problem(refresh(&app, &refresh2).await, 401, "invalid_token").await;
    for t in [&access1, &access2] {
        assert_eq!(get_bearer(&app, "/v1/users/me", t).await.status(), 401);
    }
    assert_eq!(audit_count(&app, "auth.refresh.reused").await, 1);
    assert_problem(refresh(&app, "made-up").await, 401, "invalid_token").await;
}

#[tokio::test]
async fn a_session_idle_past_the_timeout_ends_on_its_next_use() {
    let app = TestApp::spawn_with(|v| {
        v.insert("SESSION_IDLE_TIMEOUT_SECONDS".into(), "120".into());
    })
    .await;
    let e = email();
    let user = app.register(&e, STRONG_PASSWORD).await;
    let user_id: uuid::Uuid = user["id"].as_str().unwrap().parse().unwrap();
    let session_of = |sid: uuid::Uuid| {
        let db = app.db.clone();
        async move {
            sqlx::query_as::<_, (Option<String>, bool)>(
                "select revoked_reason, last_seen_at > now() - interval '5 seconds'
                   from sessions where id = $1",
            )
            .bind(sid)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    // Moves the session's last activity `secs` into the past (timeout: 120 s).
    let seen_ago = |sid: uuid::Uuid, secs: f64| {
        let db = app.db.clone();
        async move {
            sqlx::query(
                "update sessions set last_seen_at = now() - make_interval(secs => $2)
                  where id = $1",
            )
            .bind(sid)
            .bind(secs)
            .execute(&db)
            .await
            .unwrap();
        }
    };
    let live_session = || {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, uuid::Uuid>(
                "select id from sessions where user_id = $1 and revoked_at is null
                  order by created_at desc limit 1",
            )
            .bind(user_id)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };

    // GET /v1/users/me with `access` after `secs` without activity, its session's
    // state read from PostgreSQL (the Redis copy dropped).
    let me_after = |sid: uuid::Uuid, secs: f64, access: &str| {
        let (app, access) = (&app, access.to_string());
        async move {
            seen_ago(sid, secs).await;
            app.services.invalidation.session_changed(sid).await;
            get_bearer(app, "/v1/users/me", &access).await.status()
        }
    };

    // Used within the window: a request with the access token counts as activity
    // (when its state is read from PostgreSQL), and so does a refresh.
    let (access0, refresh1) = login_pair(&app, &e).await;
    let sid = live_session().await;
    assert_eq!(me_after(sid, 110.0, &access0).await, 200);
    assert_eq!(
        session_of(sid).await,
        (None, true),
        "a request marks the session seen"
    );
    seen_ago(sid, 110.0).await;
    let res = refresh(&app, &refresh1).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        session_of(sid).await,
        (None, true),
        "refresh marks the session seen"
    );

    // Idle past the window: the refresh token is refused and the session ends,
    // audited.
    seen_ago(sid, 180.0).await;
    let res = refresh(&app, body["refresh_token"].as_str().unwrap()).await;
    assert_eq!(res.status(), 401);
    assert_eq!(session_of(sid).await.0.as_deref(), Some("idle_timeout"));
    let audited = |sid: uuid::Uuid| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from audit_logs where action = 'auth.session.idle_timeout'
                    and target_id = $1 and actor_id = $2",
            )
            .bind(sid.to_string())
            .bind(user_id.to_string())
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    assert_eq!(audited(sid).await, 1);

    // An access token of an idle session is refused as soon as its cached state
    // is looked up again, and the session ends the same way.
    let (access, _) = login_pair(&app, &e).await;
    let sid = live_session().await;
    assert_eq!(
        get_bearer(&app, "/v1/users/me", &access).await.status(),
        200
    );
    assert_eq!(me_after(sid, 180.0, &access).await, 401);
    assert_eq!(session_of(sid).await.0.as_deref(), Some("idle_timeout"));
    assert_eq!(
        audited(sid).await,
        1,
        "ended on the access path, audited once"
    );
}

#[tokio::test]
async fn refresh_with_no_body_uses_the_session_cookie() {
    let app = TestApp::spawn().await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    // The shared client keeps cookies.
    let res = app
        .post_json(
            "/v1/auth/login",
            &json!({"email": e, "password": STRONG_PASSWORD}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let res = app
        .http
        .post(app.url("/v1/auth/refresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .starts_with("sb_session="));
    // The rotated cookie still authenticates; logout clears it.
    assert_eq!(app.get("/v1/users/me").await.status(), 200);
    let res = app
        .http
        .post(app.url("/v1/auth/logout"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert!(res.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(app.get("/v1/users/me").await.status(), 401);
    let res = reqwest::Client::new()
        .post(app.url("/v1/auth/refresh"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "invalid_token").await;
}

#[tokio::test]
async fn sessions_are_listed_and_ended() {
    let app = TestApp::spawn().await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let (a, _) = login_pair(&app, &e).await;
    let res = reqwest::Client::new()
        .post(app.url("/v1/auth/login"))
        .header("user-agent", "second-device/1.0")
        .json(&json!({"email": e, "password": STRONG_PASSWORD}))
        .send()
        .await
        .unwrap();
    let b = res.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string();

    let list: Value = get_bearer(&app, "/v1/users/me/sessions", &a)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["next_cursor"], Value::Null);
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for k in [
        "id",
        "created_at",
        "last_seen_at",
        "ip",
        "user_agent",
        "current",
    ] {
        assert!(items[0].get(k).is_some(), "{k} missing");
    }
    assert_eq!(items.iter().filter(|s| s["current"] == true).count(), 1);
    let other = items.iter().find(|s| s["current"] == false).unwrap();
    assert_eq!(other["user_agent"], "second-device/1.0");
    assert_eq!(other["ip"], "127.0.0.1");

    // Another user cannot end it (404, not 403).
    let (_, _, stranger) = app.user_with_token().await;
    let del = |t: String, id: String| {
        let url = app.url(&format!("/v1/users/me/sessions/{id}"));
        async move {
            reqwest::Client::new()
                .delete(url)
                .bearer_auth(t)
                .send()
                .await
                .unwrap()
        }
    };
    let id = other["id"].as_str().unwrap().to_string();
    assert_problem(del(stranger, id.clone()).await, 404, "not_found").await;
    assert_eq!(get_bearer(&app, "/v1/users/me", &b).await.status(), 200);
    assert_eq!(del(a.clone(), id.clone()).await.status(), 204);
    assert_eq!(get_bearer(&app, "/v1/users/me", &b).await.status(), 401);
    assert_eq!(get_bearer(&app, "/v1/users/me", &a).await.status(), 200);
    assert_problem(del(a.clone(), id).await, 404, "not_found").await;
    assert_eq!(audit_count(&app, "session.ended").await, 1);
}

#[tokio::test]
async fn password_change_ends_the_other_sessions() {
    let app = TestApp::spawn().await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let (a, _) = login_pair(&app, &e).await;
    let (b, b_refresh) = login_pair(&app, &e).await;
    let change = |current: &str, new: &str| {
        let body = json!({"current_password": current, "new_password": new});
        let req = reqwest::Client::new()
            .post(app.url("/v1/users/me/password"))
            .bearer_auth(&a)
            .json(&body);
        async move { req.send().await.unwrap() }
    };
    let res = change("not-my-password-9", "granite-meadow-falcon-42").await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "current_password");
    let res = change(STRONG_PASSWORD, "password1234").await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "password");

    assert_eq!(
        change(STRONG_PASSWORD, "granite-meadow-falcon-42")
            .await
            .status(),
        204
    );
    assert_eq!(get_bearer(&app, "/v1/users/me", &a).await.status(), 200);
    assert_eq!(get_bearer(&app, "/v1/users/me", &b).await.status(), 401);
    assert_problem(refresh(&app, &b_refresh).await, 401, "invalid_token").await;
    assert_eq!(login_raw(&app, &e, STRONG_PASSWORD).await.status(), 401);
    assert_eq!(
        login_raw(&app, &e, "granite-meadow-falcon-42")
            .await
            .status(),
        200
    );
    assert_eq!(audit_count(&app, "user.password.changed").await, 1);
}
