//! Every line logged while a request is served carries its request id (issue 12,
//! point 7), not only the access line: checked on the real binary's JSON logs at
//! the production level (warnings and errors only), for HTTP and gRPC.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use user_service::proto::user_service_client::UserServiceClient;
use user_service::proto::GetUserRequest;

use crate::helpers::{bearer_interceptor, free_port, fresh_database, test_vars, wait_for_port};

fn binary(vars: &HashMap<String, String>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_user-service"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars);
    cmd
}

/// The first JSON log line (within 10 s) for which `pick` holds.
async fn line_where(
    lines: &mut mpsc::UnboundedReceiver<String>,
    pick: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.recv())
            .await
            .expect("the line is logged within 10 s")
            .expect("the service is still running");
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if pick(&v) {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn an_error_logged_while_serving_a_request_names_its_request_id() {
    let database_url = fresh_database().await;
    let port = free_port();
    let mut vars = test_vars(&database_url);
    vars.insert("USER_SERVICE_PORT".into(), port.to_string());
    vars.insert("LOG_FORMAT".into(), "json".into());
    vars.insert("LOG_LEVEL".into(), "warning".into());
    vars.insert("ENV_FILE".into(), "/dev/null".into());

    let out = binary(&vars)
        .args([
            "admin",
            "create-service-client",
            "span-test",
            "--scopes",
            "users:read",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client: Value = serde_json::from_slice(&out.stdout).unwrap();

    let mut child = binary(&vars)
        .arg("serve")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tx, mut lines) = mpsc::unbounded_channel();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stdout.next_line().await {
            let _ = tx.send(line);
        }
    });
    assert!(wait_for_port(port).await, "the service listens");
    let base = format!("http://127.0.0.1:{port}");
    let token: Value = reqwest::Client::new()
        .post(format!("{base}/v1/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client["client_id"].as_str().unwrap()),
            ("client_secret", client["client_secret"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().expect("a service token");

    // From here every read of users fails inside the service: an internal error,
    // logged where ServiceError becomes problem+json or a Status.
    let mut db = PgConnection::connect(&database_url).await.unwrap();
    db.execute("alter table users rename to users_gone")
        .await
        .unwrap();

    let http_id = format!("span-http-{}", uuid::Uuid::new_v4());
    let res = reqwest::Client::new()
        .post(format!("{base}/v1/auth/login"))
        .header("x-request-id", &http_id)
        .json(&serde_json::json!({"email": "nobody@example.com", "password": "violet-tunnel-orbit-97"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 500);
    assert_eq!(res.headers()["x-request-id"], http_id.as_str());

    let grpc_id = format!("span-grpc-{}", uuid::Uuid::new_v4());
    let channel = tonic::transport::Channel::from_shared(base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut users = UserServiceClient::with_interceptor(channel, bearer_interceptor(token));
    let mut req = tonic::Request::new(GetUserRequest {
        user_id: uuid::Uuid::new_v4().to_string(),
    });
    req.metadata_mut()
        .insert("x-request-id", grpc_id.parse().unwrap());
    let err = users.get_user(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal);

    for id in [&http_id, &grpc_id] {
        let line = line_where(&mut lines, |v| {
            v["message"] == "internal error" && v.to_string().contains(id.as_str())
        })
        .await;
        assert_eq!(line["level"], "ERROR", "{line}");
        // The id comes from the request's span, not from a field the error site
        // had to remember to add.
        assert_eq!(line["span"]["request_id"], id.as_str(), "{line}");
        assert_eq!(line["span"]["name"], "request", "{line}");
        // The cause is logged, and is about the missing table.
        assert!(
            line["error"].as_str().unwrap_or("").contains("users"),
            "{line}"
        );
    }
    let _ = child.kill().await;
    db.execute("alter table users_gone rename to users")
        .await
        .ok();
}
