//! API keys (issue 4): the REST lifecycle, VerifyApiKey's every reason, the
//! cross-replica revocation, the usage buffer across a graceful shutdown, and
//! floods of made-up keys that must not reach PostgreSQL.

mod lifecycle;
mod resilience;
mod verify;

use serde_json::Value;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::{VerifyApiKeyRequest, VerifyApiKeyResponse, VerifyReason};
use uuid::Uuid;

use crate::helpers::{AuthedChannel, TestApp};

type Client = AuthServiceClient<AuthedChannel>;

async fn verifier(app: &TestApp) -> Client {
    let token = app.service_token(&["auth:verify"]).await;
    AuthServiceClient::new(app.grpc_with_token(&token).await)
}

fn req(key: &str) -> VerifyApiKeyRequest {
    VerifyApiKeyRequest {
        api_key: key.to_string(),
        ..Default::default()
    }
}

async fn verify(client: &mut Client, r: VerifyApiKeyRequest) -> VerifyApiKeyResponse {
    client
        .verify_api_key(r)
        .await
        .expect("an answer, not an error")
        .into_inner()
}

fn reason(r: &VerifyApiKeyResponse) -> VerifyReason {
    VerifyReason::try_from(r.reason).unwrap()
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut b = reqwest::Client::new()
        .request(method, app.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        b = b.json(body);
    }
    b.send().await.unwrap()
}

/// POST /v1/api-keys, asserting 201; returns the created object.
async fn create_key(app: &TestApp, token: &str, body: Value) -> Value {
    let res = send(
        app,
        reqwest::Method::POST,
        "/v1/api-keys",
        token,
        Some(&body),
    )
    .await;
    let status = res.status().as_u16();
    let v: Value = res.json().await.unwrap();
    assert_eq!(status, 201, "{v}");
    v
}

async fn revoke(app: &TestApp, token: &str, id: &str) {
    let res = send(
        app,
        reqwest::Method::DELETE,
        &format!("/v1/api-keys/{id}"),
        token,
        None,
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
}

async fn audit_rows(app: &TestApp, action: &str) -> Vec<Value> {
    sqlx::query_scalar::<_, Value>(
        "select jsonb_build_object('actor_type', actor_type, 'actor_id', actor_id,
                'target_id', target_id, 'details', details)
         from audit_logs where action = $1 order by id",
    )
    .bind(action)
    .fetch_all(&app.db)
    .await
    .unwrap()
}

/// A live trading account owned by `owner`, written directly (the accounts API
/// is another issue's).
async fn account_of(app: &TestApp, owner: Uuid) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "insert into trading_accounts (id, owner_user_id, broker, broker_user_id, nickname)
         values ($1, $2, 'zerodha', $3, 'main')",
    )
    .bind(id)
    .bind(owner)
    .bind(id.simple().to_string())
    .execute(&app.db)
    .await
    .unwrap();
    id
}

/// A Redis of this test's own, so cutting its connections disturbs no other test.
pub struct PrivateRedis {
    child: std::process::Child,
    pub port: u16,
}

impl PrivateRedis {
    pub async fn start() -> Option<PrivateRedis> {
        let port = crate::helpers::free_port();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--port", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let redis = PrivateRedis { child, port };
        crate::helpers::wait_for_port(port).await.then_some(redis)
    }

    /// CLIENT KILL TYPE pubsub: every subscriber connection is cut (and reconnects).
    async fn kill_subscribers(&self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        s.write_all(b"*4\r\n$6\r\nCLIENT\r\n$4\r\nKILL\r\n$4\r\nTYPE\r\n$6\r\npubsub\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b":"), "{:?}", &buf[..n]);
    }
}

impl PrivateRedis {
    /// Stops the server (the test's Redis outage).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
