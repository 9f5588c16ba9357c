//! Trading accounts, shared access, policies and broker credentials, through the
//! real HTTP and gRPC stacks: BOLA, role limits, credential secrecy and
//! encryption, re-encryption, concurrency and removal taking effect at once.

mod access;
mod credentials;
mod lifecycle;
mod removal;
mod service_access;

use serde_json::{json, Value};
use user_service::proto::account_service_client::AccountServiceClient;
use uuid::Uuid;

use crate::helpers::{AuthedChannel, TestApp};

/// One HTTP call with a bearer token and no cookie jar.
pub(crate) async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .request(method, app.url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

pub(crate) async fn json_ok(res: reqwest::Response, status: u16) -> Value {
    let got = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    body
}

pub(crate) async fn create_account(app: &TestApp, token: &str, broker_user_id: &str) -> Uuid {
    let body = json_ok(
        call(
            app,
            reqwest::Method::POST,
            "/v1/trading-accounts",
            token,
            Some(
                json!({"broker": "zerodha", "broker_user_id": broker_user_id, "nickname": "main"}),
            ),
        )
        .await,
        201,
    )
    .await;
    body["id"].as_str().unwrap().parse().unwrap()
}

/// Invites `email` with `role` and accepts as the invitee (`invitee` is their
/// token): membership takes the invitee's consent.
pub(crate) async fn add_member(
    app: &TestApp,
    token: &str,
    account: Uuid,
    email: &str,
    role: &str,
    invitee: &str,
) {
    let invited = json_ok(
        call(
            app,
            reqwest::Method::POST,
            &format!("/v1/trading-accounts/{account}/members"),
            token,
            Some(json!({"email": email, "role": role})),
        )
        .await,
        202,
    )
    .await;
    accept(app, invitee, invited["invitation"]["id"].as_str().unwrap()).await;
}

/// POST /v1/users/me/invitations/{id}/accept, asserting 200; returns the access body.
pub(crate) async fn accept(app: &TestApp, invitee: &str, invitation: &str) -> Value {
    json_ok(
        call(
            app,
            reqwest::Method::POST,
            &format!("/v1/users/me/invitations/{invitation}/accept"),
            invitee,
            None,
        )
        .await,
        200,
    )
    .await
}

async fn put_credentials(app: &TestApp, token: &str, account: Uuid, creds: Value) -> u16 {
    call(
        app,
        reqwest::Method::PUT,
        &format!("/v1/trading-accounts/{account}/credentials"),
        token,
        Some(creds),
    )
    .await
    .status()
    .as_u16()
}

pub(crate) async fn audit_count(app: &TestApp, action: &str, actor_id: Option<&str>) -> i64 {
    sqlx::query_scalar(
        "select count(*) from audit_logs where action = $1 and ($2::text is null or actor_id = $2)",
    )
    .bind(action)
    .bind(actor_id)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

async fn account_client(app: &TestApp, scopes: &[&str]) -> AccountServiceClient<AuthedChannel> {
    let token = app.service_token(scopes).await;
    AccountServiceClient::new(app.grpc_with_token(&token).await)
}

/// The owner plus one member of each role, on one account.
struct Team {
    account: Uuid,
    owner: (Uuid, String),
    manager: (Uuid, String),
    trader: (Uuid, String),
    viewer: (Uuid, String),
    stranger: (Uuid, String),
}

async fn team(app: &TestApp) -> Team {
    let (owner_id, _, owner) = app.user_with_token().await;
    let account = create_account(app, &owner, "AB1234").await;
    let mut members = Vec::new();
    for role in ["manager", "trader", "viewer"] {
        let (id, email, token) = app.user_with_token().await;
        add_member(app, &owner, account, &email, role, &token).await;
        members.push((id, token));
    }
    let (stranger_id, _, stranger) = app.user_with_token().await;
    let mut m = members.into_iter();
    Team {
        account,
        owner: (owner_id, owner),
        manager: m.next().unwrap(),
        trader: m.next().unwrap(),
        viewer: m.next().unwrap(),
        stranger: (stranger_id, stranger),
    }
}
