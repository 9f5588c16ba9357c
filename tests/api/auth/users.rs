//! Profile edits, user administration (list, filter, disable) and the admin CLI.

use serde_json::{json, Value};
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::{VerifyReason, VerifyTokenRequest};

use crate::helpers::{assert_problem, get_bearer, login_raw, TestApp, STRONG_PASSWORD};

use super::{audit_count, email};

#[tokio::test]
async fn patch_me_changes_the_full_name() {
    let app = TestApp::spawn().await;
    let (_, _, t) = app.user_with_token().await;
    let patch = |body: Value| {
        reqwest::Client::new()
            .patch(app.url("/v1/users/me"))
            .bearer_auth(&t)
            .json(&body)
            .send()
    };
    let res = patch(json!({"full_name": "  Erin Example "}))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<Value>().await.unwrap()["full_name"],
        "Erin Example"
    );
    let me: Value = get_bearer(&app, "/v1/users/me", &t)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["full_name"], "Erin Example");
    assert_problem(
        patch(json!({"full_name": ""})).await.unwrap(),
        400,
        "validation_failed",
    )
    .await;
    assert_problem(
        patch(json!({"email": "x@example.com"})).await.unwrap(),
        400,
        "validation_failed",
    )
    .await;
}

// ---- administration ----

#[tokio::test]
async fn admins_list_filter_and_page_users() {
    let app = TestApp::spawn().await;
    let (admin_id, _, admin) = app.user_with_token().await;
    let (_, _, plain) = app.user_with_token().await;
    assert_problem(
        get_bearer(&app, "/v1/admin/users", &plain).await,
        403,
        "forbidden",
    )
    .await;
    app.make_admin(admin_id).await;
    for i in 0..3 {
        app.register(&format!("zeta{i}@paging.example"), STRONG_PASSWORD)
            .await;
    }
    let page1: Value = get_bearer(&app, "/v1/admin/users?email=PAGING&limit=2", &admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page1["items"].as_array().unwrap().len(), 2);
    let cursor = page1["next_cursor"].as_str().unwrap().to_string();
    let page2: Value = get_bearer(
        &app,
        &format!("/v1/admin/users?email=paging&limit=2&cursor={cursor}"),
        &admin,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert_eq!(page2["next_cursor"], Value::Null);
    let mut seen: Vec<String> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["items"].as_array().unwrap())
        .map(|u| u["email"].as_str().unwrap().to_string())
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            "zeta0@paging.example",
            "zeta1@paging.example",
            "zeta2@paging.example"
        ]
    );
    let disabled: Value = get_bearer(&app, "/v1/admin/users?status=disabled", &admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(disabled["items"], json!([]));
    assert_problem(
        get_bearer(&app, "/v1/admin/users?limit=0", &admin).await,
        400,
        "validation_failed",
    )
    .await;
}

#[tokio::test]
async fn disabling_a_user_ends_their_sessions_at_once() {
    let app = TestApp::spawn().await;
    let (admin_id, _, admin) = app.user_with_token().await;
    app.make_admin(admin_id).await;
    let (victim_id, victim_email, victim) = app.user_with_token().await;
    let svc = app.service_token(&["auth:verify"]).await;
    let mut grpc = AuthServiceClient::new(app.grpc_with_token(&svc).await);
    assert!(
        grpc.verify_token(VerifyTokenRequest {
            token: victim.clone()
        })
        .await
        .unwrap()
        .into_inner()
        .valid
    );

    let patch = |t: &str, id: uuid::Uuid, body: Value| {
        reqwest::Client::new()
            .patch(app.url(&format!("/v1/admin/users/{id}")))
            .bearer_auth(t)
            .json(&body)
            .send()
    };
    // Only admins.
    assert_problem(
        patch(&victim, admin_id, json!({"status": "disabled"}))
            .await
            .unwrap(),
        403,
        "forbidden",
    )
    .await;
    assert_problem(
        patch(&admin, victim_id, json!({"roles": ["root"]}))
            .await
            .unwrap(),
        400,
        "validation_failed",
    )
    .await;
    assert_problem(
        patch(&admin, uuid::Uuid::new_v4(), json!({"status": "disabled"}))
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;

    let res = patch(&admin, victim_id, json!({"status": "disabled"}))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "disabled");
    assert_problem(
        get_bearer(&app, "/v1/users/me", &victim).await,
        401,
        "invalid_token",
    )
    .await;
    let v = grpc
        .verify_token(VerifyTokenRequest {
            token: victim.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    assert_eq!(v.reason, VerifyReason::UserDisabled as i32);
    assert_problem(
        login_raw(&app, &victim_email, STRONG_PASSWORD).await,
        401,
        "invalid_credentials",
    )
    .await;

    // Re-enabled: a new login works; roles change at once for live sessions.
    assert_eq!(
        patch(&admin, victim_id, json!({"status": "active"}))
            .await
            .unwrap()
            .status(),
        200
    );
    let fresh = app.login(&victim_email, STRONG_PASSWORD).await;
    assert_eq!(
        get_bearer(&app, "/v1/admin/users", &fresh).await.status(),
        403
    );
    let res = patch(
        &admin,
        victim_id,
        json!({"roles": ["user", "admin", "user"]}),
    )
    .await
    .unwrap();
    assert_eq!(
        res.json::<Value>().await.unwrap()["roles"],
        json!(["admin", "user"])
    );
    // The live session sees its new role on the very next request.
    assert_eq!(
        get_bearer(&app, "/v1/admin/users", &fresh).await.status(),
        200
    );
    // An admin cannot lock themselves out.
    assert_problem(
        patch(&admin, admin_id, json!({"status": "disabled"}))
            .await
            .unwrap(),
        403,
        "forbidden",
    )
    .await;

    let changes: Vec<Value> = sqlx::query_scalar(
        "select details from audit_logs where action = 'user.updated' and target_id = $1 order by id",
    )
    .bind(victim_id.to_string())
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(changes.len(), 3);
    assert_eq!(changes[0]["status"]["to"], "disabled");
    assert_eq!(changes[0]["sessions_ended"], 1);
}

// ---- operator CLI ----

fn cli(app: &TestApp, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ENV_FILE", ".env.dev")
        .envs(crate::helpers::test_keys().iter().cloned())
        .env("DATABASE_URL", &app.database_url)
        .env("REDIS_URL", crate::helpers::redis_url())
        .env("REDIS_KEY_PREFIX", &app.settings.redis_key_prefix)
        .env("LOG_LEVEL", "error")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn cli_creates_users_and_service_clients() {
    let app = TestApp::spawn().await;
    let e = email();
    let (ok, out, err) = cli(
        &app,
        &[
            "admin",
            "create-user",
            "--email",
            &e,
            "--full-name",
            "First Admin",
            "--role",
            "admin",
            "--password-stdin",
        ],
        &format!("{STRONG_PASSWORD}\n"),
    );
    assert!(ok, "{err}");
    let user: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(user["email"], e);
    assert_eq!(user["roles"], json!(["admin"]));
    let t = app.login(&e, STRONG_PASSWORD).await;
    assert_eq!(get_bearer(&app, "/v1/admin/users", &t).await.status(), 200);
    assert_eq!(audit_count(&app, "user.created").await, 1);
    // Weak passwords are refused here too, saying why.
    let (ok, _, err) = cli(
        &app,
        &[
            "admin",
            "create-user",
            "--email",
            &email(),
            "--full-name",
            "X",
            "--password-stdin",
        ],
        "password\n",
    );
    assert!(!ok && err.contains("password"), "{err}");

    let (ok, out, err) = cli(
        &app,
        &[
            "admin",
            "create-service-client",
            "reports",
            "--scopes",
            "auth:verify,users:read",
        ],
        "",
    );
    assert!(ok, "{err}");
    let c: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(c["client_id"], "reports");
    let token = |secret: String| {
        reqwest::Client::new()
            .post(app.url("/v1/auth/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "reports"),
                ("client_secret", &secret),
            ])
            .send()
    };
    let old = c["client_secret"].as_str().unwrap().to_string();
    let res = token(old.clone()).await.unwrap();
    assert_eq!(
        res.json::<Value>().await.unwrap()["scope"],
        "auth:verify users:read"
    );

    let (ok, out, err) = cli(
        &app,
        &["admin", "rotate-service-client-secret", "reports"],
        "",
    );
    assert!(ok, "{err}");
    let rotated: Value = serde_json::from_str(out.trim()).unwrap();
    let new = rotated["client_secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_problem(token(old).await.unwrap(), 401, "invalid_client").await;
    assert_eq!(token(new).await.unwrap().status(), 200);
    assert_eq!(audit_count(&app, "service_client.secret.rotated").await, 1);
    let (ok, _, _) = cli(
        &app,
        &["admin", "rotate-service-client-secret", "nobody"],
        "",
    );
    assert!(!ok);
    let (ok, _, _) = cli(
        &app,
        &[
            "admin",
            "create-service-client",
            "bad",
            "--scopes",
            "root:all",
        ],
        "",
    );
    assert!(!ok);
}
