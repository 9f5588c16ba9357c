//! Migrations, the audit-log trigger, health (HTTP and gRPC), reflection, the
//! problem+json shape, one-port routing and graceful shutdown.

use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection, PgPool};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::helpers::{admin_database_url, assert_problem, test_vars, TestApp};

#[tokio::test]
async fn migrations_apply_from_zero_and_rerun_cleanly() {
    let name = format!(
        "us_t_{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let mut admin = PgConnection::connect(&admin_database_url()).await.unwrap();
    admin
        .execute(format!(r#"create database "{name}""#).as_str())
        .await
        .unwrap();
    let mut url = url::Url::parse(&admin_database_url()).unwrap();
    url.set_path(&format!("/{name}"));
    let pool = PgPool::connect(url.as_str()).await.unwrap();
    let migrator = &user_service::store::db::MIGRATOR;
    migrator.run(&pool).await.unwrap();
    migrator.run(&pool).await.unwrap();
    let applied: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, migrator.iter().count());
    for table in [
        "users",
        "roles",
        "user_roles",
        "policies",
        "role_policies",
        "service_clients",
        "trading_accounts",
        "trading_account_memberships",
        "audit_logs",
        "api_keys",
        "api_key_usage_logs",
        "scopes",
        "sessions",
        "refresh_tokens",
    ] {
        let exists: bool = sqlx::query_scalar("select to_regclass($1) is not null")
            .bind(table)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(exists, "table {table} missing");
    }
    let roles: Vec<String> = sqlx::query_scalar("select name from roles order by name")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(roles, ["admin", "user", "viewer"]);
    let secrets: i64 =
        sqlx::query_scalar("select count(*) from service_clients where secret_hash is not null")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(secrets, 0, "seeded service clients carry no secrets");
    // Emails are unique case-insensitively.
    sqlx::query(
        "insert into users (id, email, full_name) values (gen_random_uuid(), 'A@x.io', 'A')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let dup = sqlx::query(
        "insert into users (id, email, full_name) values (gen_random_uuid(), 'a@X.io', 'B')",
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert!(dup.to_string().contains("users_email_lower_key"), "{dup}");
    pool.close().await;

    // The binary's `migrate` is idempotent too.
    for _ in 0..2 {
        run_service_ok(&["migrate"], url.as_str(), &crate::helpers::redis_url());
    }
    admin
        .execute(format!(r#"drop database "{name}" with (force)"#).as_str())
        .await
        .unwrap();
}

#[tokio::test]
async fn audit_log_is_append_only_and_hash_chained() {
    let app = TestApp::spawn().await;
    for i in 0..3 {
        sqlx::query("insert into audit_logs (actor_type, action, outcome, details) values ('system', 'system.test', 'success', $1)")
            .bind(serde_json::json!({ "i": i }))
            .execute(&app.db)
            .await
            .unwrap();
    }
    let rows: Vec<(i64, Option<Vec<u8>>, Vec<u8>)> =
        sqlx::query_as("select chain_seq, prev_hash, row_hash from audit_logs order by chain_seq")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows[0].1.is_none());
    for w in rows.windows(2) {
        assert_eq!(
            w[1].1.as_deref(),
            Some(w[0].2.as_slice()),
            "each row carries its predecessor's hash"
        );
    }
    let upd = sqlx::query("update audit_logs set outcome = 'failure'")
        .execute(&app.db)
        .await
        .unwrap_err();
    assert!(upd.to_string().contains("append-only"), "{upd}");
    let del = sqlx::query("delete from audit_logs")
        .execute(&app.db)
        .await
        .unwrap_err();
    assert!(del.to_string().contains("append-only"), "{del}");
    let trunc = sqlx::query("truncate audit_logs")
        .execute(&app.db)
        .await
        .unwrap_err();
    assert!(trunc.to_string().contains("append-only"), "{trunc}");
    let n: i64 = sqlx::query_scalar("select count(*) from audit_logs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 3);
}

#[tokio::test]
async fn health_reports_ok_and_grpc_health_serving_per_service() {
    let app = TestApp::spawn().await;
    let res = app.get("/health").await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["environment"], "development");
    assert_eq!(body["checks"]["database"], "ok");
    assert_eq!(body["checks"]["redis"], "ok");
    assert!(body["version"].is_string());

    let live = app.get("/health/live").await;
    assert_eq!(live.status(), 200);

    let mut health = HealthClient::new(app.channel().await);
    for service in [
        "",
        "stocksblitz.user.v1.AuthService",
        "stocksblitz.user.v1.UserService",
        "stocksblitz.user.v1.AccountService",
    ] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "service {service:?}");
    }
}

#[tokio::test]
async fn unreachable_database_gives_503_and_not_serving() {
    let url = crate::helpers::fresh_database().await;
    let mut vars = test_vars(&url);
    // Nothing listens on port 1.
    vars.insert(
        "DATABASE_URL".into(),
        "postgres://postgres@127.0.0.1:1/none".into(),
    );
    let app = TestApp::spawn_vars(vars).await;
    let res = app.get("/health").await;
    assert_eq!(res.status(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["database"], "error");

    let mut health = HealthClient::new(app.channel().await);
    let r = health
        .check(HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status(), ServingStatus::NotServing);
}

#[tokio::test]
async fn redis_down_is_degraded_not_unavailable() {
    let app = TestApp::spawn_with(|v| {
        v.insert("REDIS_URL".into(), "redis://127.0.0.1:1/0".into());
    })
    .await;
    let res = app.get("/health").await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["checks"]["redis"], "error");
}

#[tokio::test]
async fn reflection_lists_the_three_services_on_v1_and_v1alpha() {
    use futures::StreamExt;
    let app = TestApp::spawn().await;
    // v1
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut client = ServerReflectionClient::new(app.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(futures::stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection answer");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for s in crate::helpers::SERVICES {
            assert!(names.iter().any(|n| n == s), "{s} not in {names:?}");
        }
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{names:?}"
        );
    }
    // v1alpha
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let mut client = ServerReflectionClient::new(app.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(futures::stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection answer");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for s in crate::helpers::SERVICES {
            assert!(names.iter().any(|n| n == s), "{s} not in {names:?}");
        }
    }
}

#[tokio::test]
async fn unknown_routes_answer_by_protocol() {
    let app = TestApp::spawn().await;
    let body = assert_problem(app.get("/no/such/route").await, 404, "not_found").await;
    assert_eq!(body["status"], 404);

    // An unknown gRPC method is UNIMPLEMENTED, not an HTTP 404.
    let res = app
        .http
        .post(app.url("/stocksblitz.user.v1.NoSuchService/Nope"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["grpc-status"], "12");
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let mut app = TestApp::spawn().await;
    // A login whose body is still arriving when SIGTERM comes: the handler cannot
    // answer before the last byte, so the request is truly in flight throughout.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let req = app
        .http
        .post(app.url("/v1/auth/login"))
        .header("content-type", "application/json")
        .body(body)
        .send();
    let in_flight = tokio::spawn(req);
    tx.send(Ok(br#"{"email":"nobody@example.com","#.to_vec()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !in_flight.is_finished(),
        "answered before the body was complete"
    );
    app.shutdown.trigger();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New connections are refused once the listener has closed.
    let fresh = reqwest::Client::new()
        .get(app.url("/health/live"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(fresh.is_err(), "listener still accepting after shutdown");
    assert!(!in_flight.is_finished(), "in-flight request cut off");
    tx.send(Ok(br#""password":"wrong-password-123"}"#.to_vec()))
        .await
        .unwrap();
    drop(tx);
    let res = in_flight
        .await
        .unwrap()
        .expect("in-flight request completed");
    // A real answer from the login handler, not a connection error or a 503.
    assert_problem(res, 401, "invalid_credentials").await;
    app.stop().await.expect("exits cleanly");
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[test]
fn admin_time_argon2_prints_the_cost_of_one_hash() {
    // Needs no store: the addresses below lead nowhere.
    let out = run_service_ok(
        &["admin", "time-argon2", "--hashes", "2"],
        "postgres://nobody@127.0.0.1:1/none",
        "redis://127.0.0.1:1/0",
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ms = v["argon2_ms_per_hash"].as_f64().unwrap();
    // m=19 MiB, t=2 takes milliseconds on any machine; a figure far outside
    // means the parameters changed.
    assert!((1.0..2000.0).contains(&ms), "{ms}");
}

/// Runs the service binary with `args`, the development env file and these
/// stores (nothing else from this process's environment); it must succeed.
fn run_service_ok(args: &[&str], database_url: &str, redis_url: &str) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .args(args)
        .env_clear()
        .env("ENV_FILE", concat!(env!("CARGO_MANIFEST_DIR"), "/.env.dev"))
        .envs(crate::helpers::test_keys().iter().cloned())
        .env("DATABASE_URL", database_url)
        .env("REDIS_URL", redis_url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
