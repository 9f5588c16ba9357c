//! Who may reach the service (issue 10 point 7): ALLOWED_CLIENT_NETWORKS judged
//! on the peer before any other work, on HTTP and gRPC, and X-Forwarded-For
//! believed only from TRUSTED_PROXIES.

use std::process::Command;

use serde_json::{json, Value};
use tonic::Code;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::VerifyApiKeyRequest;

use crate::helpers::{assert_problem, TestApp};

/// A client whose connections leave from `source` (any 127.0.0.0/8 address
/// reaches the loopback listener).
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source.parse::<std::net::IpAddr>().ok())
        .build()
        .unwrap()
}

async fn health_from(app: &TestApp, source: &str) -> reqwest::Response {
    client_from(source)
        .get(app.url("/health"))
        .send()
        .await
        .unwrap()
}

async fn register_status(
    app: &TestApp,
    client: &reqwest::Client,
    email: &str,
) -> reqwest::Response {
    client
        .post(app.url("/v1/auth/register"))
        .json(&json!({"email": email, "password": "correct horse battery staple 9", "full_name": "N"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_peer_outside_the_allowed_networks_is_refused_before_any_work() {
    let app = TestApp::spawn_with(|v| {
        v.insert(
            "ALLOWED_CLIENT_NETWORKS".into(),
            "127.0.0.1/32, 10.0.0.0/8".into(),
        );
    })
    .await;
    let outside = client_from("127.0.0.2");
    assert_eq!(health_from(&app, "127.0.0.1").await.status(), 200);
    let body = assert_problem(
        outside.get(app.url("/health")).send().await.unwrap(),
        403,
        "forbidden",
    )
    .await;
    assert!(!body["detail"].as_str().unwrap_or_default().is_empty());

    // Nothing is done for the outsider: no user is created.
    let email = format!("net-{}@example.com", uuid::Uuid::new_v4().simple());
    assert_problem(
        register_status(&app, &outside, &email).await,
        403,
        "forbidden",
    )
    .await;
    let users: i64 = sqlx::query_scalar("select count(*) from users where email = $1")
        .bind(&email)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(users, 0);
    // A forged X-Forwarded-For from an untrusted peer does not get it in.
    let res = outside
        .get(app.url("/health"))
        .header("x-forwarded-for", "10.1.2.3")
        .send()
        .await
        .unwrap();
    assert_problem(res, 403, "forbidden").await;

    // gRPC from outside: PERMISSION_DENIED, before the service token is looked at.
    let endpoint = tonic::transport::Endpoint::from_shared(app.addr.clone())
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()));
    let err = verify_without_token(endpoint.connect().await.unwrap()).await;
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // The same call from inside reaches the interceptor (no token: UNAUTHENTICATED).
    let err = verify_without_token(app.channel().await).await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

/// VerifyApiKey with no service token: it can only fail; how is the point.
async fn verify_without_token(channel: tonic::transport::Channel) -> tonic::Status {
    AuthServiceClient::new(channel)
        .verify_api_key(VerifyApiKeyRequest {
            api_key: "sbk_dev_x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
}

#[tokio::test]
async fn development_admits_loopback_and_private_networks_by_default() {
    let app = TestApp::spawn().await;
    assert_eq!(app.settings.allowed_client_networks, None);
    let nets = app.settings.allowed_client_networks();
    for ip in [
        "127.0.0.1",
        "::1",
        "10.9.8.7",
        "172.20.0.1",
        "192.168.0.10",
        "fd12::1",
    ] {
        assert!(nets.contains(ip.parse().unwrap()), "{ip}");
    }
    assert!(!nets.contains("203.0.113.7".parse().unwrap()));
    assert_eq!(health_from(&app, "127.0.0.2").await.status(), 200);
    // Empty means everyone.
    let open = TestApp::spawn_with(|v| {
        v.insert("ALLOWED_CLIENT_NETWORKS".into(), String::new());
    })
    .await;
    assert!(open.settings.allowed_client_networks().is_empty());
}

/// An API key bound to 203.0.113.7, used through the gateway with a claimed
/// X-Forwarded-For of that address.
async fn ip_bound_key_status(app: &TestApp) -> u16 {
    let (_, _, token) = app.user_with_token().await;
    let res = reqwest::Client::new()
        .post(app.url("/v1/api-keys"))
        .bearer_auth(&token)
        .json(&json!({"name": "bound", "scopes": ["orders:read"], "allowed_ips": ["203.0.113.7"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let key: Value = res.json().await.unwrap();
    reqwest::Client::new()
        .get(app.url("/v1/users/me"))
        .header("x-api-key", key["key"].as_str().unwrap())
        .header("x-forwarded-for", "198.51.100.1, 203.0.113.7")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    // The test client (127.0.0.1) is not a trusted proxy: its claim is ignored,
    // and the key bound to 203.0.113.7 refuses it.
    let direct = TestApp::spawn().await;
    assert_eq!(ip_bound_key_status(&direct).await, 401);
    let elsewhere = TestApp::spawn_with(|v| {
        v.insert("TRUSTED_PROXIES".into(), "10.0.0.0/8".into());
    })
    .await;
    assert_eq!(ip_bound_key_status(&elsewhere).await, 401);
    // Behind a trusted proxy, the address the proxy appended counts: for the
    // client networks (203.0.113.7 is outside development's default) ...
    let proxied = TestApp::spawn_with(|v| {
        v.insert("TRUSTED_PROXIES".into(), "127.0.0.1/32".into());
    })
    .await;
    assert_eq!(ip_bound_key_status(&proxied).await, 403);
    // ... and for the key bound to it.
    let proxied = TestApp::spawn_with(|v| {
        v.insert("TRUSTED_PROXIES".into(), "127.0.0.1/32".into());
        v.insert("ALLOWED_CLIENT_NETWORKS".into(), String::new());
    })
    .await;
    assert_eq!(ip_bound_key_status(&proxied).await, 200);
}

#[test]
fn the_old_trust_forwarded_for_is_explained_not_ignored() {
    let out = Command::new(env!("CARGO_BIN_EXE_user-service"))
        .arg("check-config")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ENV_FILE", ".env.dev")
        .env("TRUST_FORWARDED_FOR", "true")
        .env("TRUSTED_PROXIES", "127.0.0.1/32,::1")
        .env("ALLOWED_CLIENT_NETWORKS", "10.0.0.0/8")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("error: TRUST_FORWARDED_FOR is replaced by TRUSTED_PROXIES")),
        "{stdout}"
    );
    assert!(
        stdout.contains("TRUSTED_PROXIES=127.0.0.1/32,::1/128"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ALLOWED_CLIENT_NETWORKS=10.0.0.0/8"),
        "{stdout}"
    );
    // serve refuses it the same way.
    let out = Command::new(env!("CARGO_BIN_EXE_user-service"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ENV_FILE", ".env.dev")
        .env("TRUST_FORWARDED_FOR", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("replaced by TRUSTED_PROXIES"), "{stderr}");
}
