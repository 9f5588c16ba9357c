//! Trading accounts, shared access, policies and broker credentials, through the
//! real HTTP and gRPC stacks: BOLA, role limits, credential secrecy and
//! encryption, re-encryption, concurrency and removal taking effect at once.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tonic::Code;
use user_service::proto::account_service_client::AccountServiceClient;
use user_service::proto::user_service_client::UserServiceClient;
use user_service::proto::{
    CheckAccountAccessRequest, CheckPermissionRequest, GetBrokerCredentialsRequest,
    GetTradingAccountRequest, ListUserAccountsRequest,
};
use uuid::Uuid;

use crate::helpers::{assert_problem, AuthedChannel, TestApp};

const NEW_KEY: &str = "new:3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs=";

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

/// Changes a user's roles the way an operator does (PATCH /v1/admin/users/{id}),
/// which tells every cache that the user changed.
async fn set_roles(app: &TestApp, user: Uuid, roles: &[&str]) {
    let (admin, email, _) = app.user_with_token().await;
    app.make_admin(admin).await;
    let token = app.login(&email, crate::helpers::STRONG_PASSWORD).await;
    json_ok(
        call(
            app,
            reqwest::Method::PATCH,
            &format!("/v1/admin/users/{user}"),
            &token,
            Some(json!({ "roles": roles })),
        )
        .await,
        200,
    )
    .await;
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

#[tokio::test]
async fn account_lifecycle_shapes_and_audit() {
    let app = TestApp::spawn().await;
    let (user_id, _, token) = app.user_with_token().await;
    // Only an administrator chooses a tier (issue 10): a holder gets the default.
    let tier = call(
        &app,
        reqwest::Method::POST,
        "/v1/trading-accounts",
        &token,
        Some(json!({"broker": "zerodha", "broker_user_id": "AB1234", "nickname": "Main", "subscription_tier": "pro"})),
    )
    .await;
    assert_problem(tier, 403, "forbidden").await;
    let created = json_ok(
        call(
            &app,
            reqwest::Method::POST,
            "/v1/trading-accounts",
            &token,
            Some(json!({"broker": "zerodha", "broker_user_id": "AB1234", "nickname": "Main"})),
        )
        .await,
        201,
    )
    .await;
    let mut keys: Vec<&str> = created
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "broker",
            "broker_user_id",
            "created_at",
            "credentials_hint",
            "credentials_updated_at",
            "has_credentials",
            "id",
            "nickname",
            "status",
            "subscription_expires_at",
            "subscription_status",
            "subscription_tier"
        ]
    );
    assert_eq!(created["subscription_tier"], "free");
    assert_eq!(created["subscription_status"], "active");
    assert_eq!(created["status"], "active");
    assert_eq!(created["has_credentials"], false);
    let id = created["id"].as_str().unwrap().to_string();

    // Validation names the fields; unknown fields are refused.
    let bad = call(
        &app,
        reqwest::Method::POST,
        "/v1/trading-accounts",
        &token,
        Some(json!({"broker": "Zerodha!", "broker_user_id": "", "subscription_tier": "gold"})),
    )
    .await;
    let body = assert_problem(bad, 400, "validation_failed").await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["broker", "broker_user_id", "subscription_tier"]);
    let unknown = call(
        &app,
        reqwest::Method::POST,
        "/v1/trading-accounts",
        &token,
        Some(json!({"broker": "zerodha", "broker_user_id": "X1", "owner_user_id": Uuid::new_v4()})),
    )
    .await;
    assert_problem(unknown, 400, "validation_failed").await;
    // The same broker login twice for one owner is a conflict.
    let dup = call(
        &app,
        reqwest::Method::POST,
        "/v1/trading-accounts",
        &token,
        Some(json!({"broker": "zerodha", "broker_user_id": "AB1234"})),
    )
    .await;
    assert_problem(dup, 409, "conflict").await;

    let shown = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            &format!("/v1/trading-accounts/{id}"),
            &token,
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(shown["access"], "owner");
    assert_eq!(shown["permissions"], json!(["read", "trade", "manage"]));

    let patched = json_ok(
        call(
            &app,
            reqwest::Method::PATCH,
            &format!("/v1/trading-accounts/{id}"),
            &token,
            Some(json!({"nickname": "Renamed", "status": "inactive"})),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(patched["nickname"], "Renamed");
    assert_eq!(patched["status"], "inactive");
    // Subscription terms are not the holder's to set.
    let sub = call(
        &app,
        reqwest::Method::PATCH,
        &format!("/v1/trading-accounts/{id}"),
        &token,
        Some(json!({"subscription_tier": "enterprise"})),
    )
    .await;
    assert_problem(sub, 403, "forbidden").await;

    let list = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            "/v1/trading-accounts",
            &token,
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["next_cursor"].is_null());

    let del = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/trading-accounts/{id}"),
        &token,
        None,
    )
    .await;
    assert_eq!(del.status().as_u16(), 204);
    let gone = call(
        &app,
        reqwest::Method::GET,
        &format!("/v1/trading-accounts/{id}"),
        &token,
        None,
    )
    .await;
    assert_problem(gone, 404, "not_found").await;
    let (status, deleted_at): (String, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("select status, deleted_at from trading_accounts where id = $1")
            .bind(Uuid::parse_str(&id).unwrap())
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(status, "deleted");
    assert!(deleted_at.is_some(), "soft delete keeps the row");

    let uid = user_id.to_string();
    for action in [
        "trading_account.created",
        "trading_account.updated",
        "trading_account.deleted",
    ] {
        assert_eq!(audit_count(&app, action, Some(&uid)).await, 1, "{action}");
    }
    // The tier at creation, the subscription PATCH and the read after the delete.
    assert_eq!(audit_count(&app, "authz.denied", Some(&uid)).await, 3);
}

#[tokio::test]
async fn pagination_walks_every_account_once() {
    let app = TestApp::spawn().await;
    let (_, _, token) = app.user_with_token().await;
    for i in 0..5 {
        create_account(&app, &token, &format!("P{i}")).await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/trading-accounts?limit=2&cursor={c}"),
            None => "/v1/trading-accounts?limit=2".into(),
        };
        let page = json_ok(
            call(&app, reqwest::Method::GET, &path, &token, None).await,
            200,
        )
        .await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["broker_user_id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ["P0", "P1", "P2", "P3", "P4"]);
    let bad = call(
        &app,
        reqwest::Method::GET,
        "/v1/trading-accounts?limit=500",
        &token,
        None,
    )
    .await;
    assert_problem(bad, 400, "validation_failed").await;
}

#[tokio::test]
async fn a_non_member_gets_404_on_every_account_and_member_route() {
    let app = TestApp::spawn().await;
    let t = team(&app).await;
    let a = t.account;
    let victim = t.viewer.0;
    let routes: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (
            reqwest::Method::GET,
            format!("/v1/trading-accounts/{a}"),
            None,
        ),
        (
            reqwest::Method::PATCH,
            format!("/v1/trading-accounts/{a}"),
            Some(json!({"nickname": "pwned"})),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/trading-accounts/{a}"),
            None,
        ),
        (
            reqwest::Method::PUT,
            format!("/v1/trading-accounts/{a}/credentials"),
            Some(json!({"api_key": "k-123456789012", "api_secret": "s"})),
        ),
        (
            reqwest::Method::GET,
            format!("/v1/trading-accounts/{a}/credentials"),
            None,
        ),
        (
            reqwest::Method::GET,
            format!("/v1/trading-accounts/{a}/members"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("/v1/trading-accounts/{a}/members"),
            Some(json!({"user_id": t.stranger.0, "role": "manager"})),
        ),
        (
            reqwest::Method::PATCH,
            format!("/v1/trading-accounts/{a}/members/{victim}"),
            Some(json!({"role": "manager"})),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/trading-accounts/{a}/members/{victim}"),
            None,
        ),
    ];
    let missing = Uuid::new_v4();
    for (method, path, body) in routes {
        let res = call(&app, method.clone(), &path, &t.stranger.1, body.clone()).await;
        let probe = assert_problem(res, 404, "not_found").await;
        // A real account the caller may not see looks exactly like a missing one.
        let other = path.replace(&a.to_string(), &missing.to_string());
        let res = call(&app, method.clone(), &other, &t.stranger.1, body).await;
        let absent = assert_problem(res, 404, "not_found").await;
        assert_eq!(probe, absent, "{method} {path}");
    }
    // Nothing changed, and every attempt left an authz.denied row.
    let members = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            &format!("/v1/trading-accounts/{a}/members"),
            &t.owner.1,
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(members["items"].as_array().unwrap().len(), 3);
    let shown = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            &format!("/v1/trading-accounts/{a}"),
            &t.owner.1,
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(shown["nickname"], "main");
    assert_eq!(shown["has_credentials"], false);
    let denied = audit_count(&app, "authz.denied", Some(&t.stranger.0.to_string())).await;
    assert_eq!(denied, 18);
    // Lists never show it either.
    let list = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            "/v1/users/me/accounts",
            &t.stranger.1,
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(list["items"], json!([]));
}

#[tokio::test]
async fn members_are_limited_by_their_role() {
    let app = TestApp::spawn().await;
    let t = team(&app).await;
    let a = t.account;
    let viewer = &t.viewer.1;
    let before = audit_count(&app, "authz.denied", Some(&t.viewer.0.to_string())).await;

    // A viewer reads…
    let shown = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            &format!("/v1/trading-accounts/{a}"),
            viewer,
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(shown["access"], "viewer");
    assert_eq!(shown["permissions"], json!(["read"]));
    json_ok(
        call(
            &app,
            reqwest::Method::GET,
            &format!("/v1/trading-accounts/{a}/members"),
            viewer,
            None,
        )
        .await,
        200,
    )
    .await;
    // …and nothing else: write, manage members, raise own role, credentials.
    let attempts: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (
            reqwest::Method::PATCH,
            format!("/v1/trading-accounts/{a}"),
            Some(json!({"nickname": "x"})),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/trading-accounts/{a}"),
            None,
        ),
        (
            reqwest::Method::PUT,
            format!("/v1/trading-accounts/{a}/credentials"),
            Some(json!({"api_key": "k-123456789012", "api_secret": "s"})),
        ),
        (
            reqwest::Method::GET,
            format!("/v1/trading-accounts/{a}/credentials"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("/v1/trading-accounts/{a}/members"),
            Some(json!({"user_id": t.stranger.0, "role": "viewer"})),
        ),
        (
            reqwest::Method::PATCH,
            format!("/v1/trading-accounts/{a}/members/{}", t.viewer.0),
            Some(json!({"role": "manager"})),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/trading-accounts/{a}/members/{}", t.trader.0),
            None,
        ),
    ];
    for (method, path, body) in &attempts {
        let res = call(&app, method.clone(), path, viewer, body.clone()).await;
        assert_problem(res, 403, "forbidden").await;
    }
    assert_eq!(
        audit_count(&app, "authz.denied", Some(&t.viewer.0.to_string())).await - before,
        attempts.len() as i64
    );
    let role: String = sqlx::query_scalar(
        "select role from trading_account_memberships where user_id = $1 and revoked_at is null",
    )
    .bind(t.viewer.0)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(role, "viewer", "the viewer's role did not move");

    // A trader trades but does not manage.
    let res = call(
        &app,
        reqwest::Method::POST,
        &format!("/v1/trading-accounts/{a}/members"),
        &t.trader.1,
        Some(json!({"user_id": t.stranger.0, "role": "viewer"})),
    )
    .await;
    assert_problem(res, 403, "forbidden").await;
    let res = call(
        &app,
        reqwest::Method::PATCH,
        &format!("/v1/trading-accounts/{a}/members/{}", t.trader.0),
        &t.trader.1,
        Some(json!({"role": "manager"})),
    )
    .await;
    assert_problem(res, 403, "forbidden").await;

    // A manager manages members and credentials but cannot delete the account.
    assert_eq!(
        put_credentials(
            &app,
            &t.manager.1,
            a,
            json!({"api_key": "kite-key-000011112222", "api_secret": "s3cret"})
        )
        .await,
        204
    );
    let res = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/trading-accounts/{a}"),
        &t.manager.1,
        None,
    )
    .await;
    assert_problem(res, 403, "forbidden").await;
    // Adding is an invitation the stranger accepts (issue 11: consent).
    let invited = json_ok(
        call(
            &app,
            reqwest::Method::POST,
            &format!("/v1/trading-accounts/{a}/members"),
            &t.manager.1,
            Some(json!({"user_id": t.stranger.0, "role": "trader"})),
        )
        .await,
        202,
    )
    .await;
    assert_eq!(invited["invitation"]["role"], "trader");
    let added = accept(
        &app,
        &t.stranger.1,
        invited["invitation"]["id"].as_str().unwrap(),
    )
    .await;
    assert_eq!(added["access"], "trader");
    assert_eq!(added["id"], a.to_string());
    let changed = json_ok(
        call(
            &app,
            reqwest::Method::PATCH,
            &format!("/v1/trading-accounts/{a}/members/{}", t.viewer.0),
            &t.manager.1,
            Some(json!({"role": "trader"})),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(changed["role"], "trader");
    // Adding an existing member again is a conflict.
    let res = call(
        &app,
        reqwest::Method::POST,
        &format!("/v1/trading-accounts/{a}/members"),
        &t.manager.1,
        Some(json!({"user_id": t.stranger.0, "role": "viewer"})),
    )
    .await;
    assert_problem(res, 409, "conflict").await;
    // A member may leave on their own.
    let res = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/trading-accounts/{a}/members/{}", t.trader.0),
        &t.trader.1,
        None,
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);

    let m = t.manager.0.to_string();
    assert_eq!(audit_count(&app, "membership.invited", Some(&m)).await, 1);
    assert_eq!(
        audit_count(&app, "membership.added", Some(&t.stranger.0.to_string())).await,
        1
    );
    assert_eq!(
        audit_count(&app, "membership.role_changed", Some(&m)).await,
        1
    );
    assert_eq!(
        audit_count(&app, "trading_account.credentials.updated", Some(&m)).await,
        1
    );
    assert_eq!(
        audit_count(&app, "membership.removed", Some(&t.trader.0.to_string())).await,
        1
    );
}

/// Collects every log line the service writes while the test runs.
#[derive(Clone, Default)]
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// current_thread: the server's tasks run on this thread, so the thread-local
// subscriber below sees everything the service logs.
#[tokio::test(flavor = "current_thread")]
async fn credential_canary_never_leaks_but_reaches_the_credentials_client() {
    let sink = LogSink::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = TestApp::spawn().await;
    let t = team(&app).await;
    let a = t.account;
    let canary = format!("CANARY-{}", Uuid::new_v4());
    let secret = format!("{canary}-secret");
    let token = format!("{canary}-token");
    let mut responses = String::new();

    assert_eq!(
        put_credentials(
            &app,
            &t.owner.1,
            a,
            json!({"api_key": canary, "api_secret": secret, "access_token": token})
        )
        .await,
        204
    );
    let reads = [
        format!("/v1/trading-accounts/{a}"),
        "/v1/trading-accounts".to_string(),
        "/v1/users/me/accounts".to_string(),
        format!("/v1/trading-accounts/{a}/credentials"),
        format!("/v1/trading-accounts/{a}/members"),
    ];
    for path in &reads {
        let res = call(&app, reqwest::Method::GET, path, &t.owner.1, None).await;
        assert_eq!(res.status().as_u16(), 200, "{path}");
        responses.push_str(&res.text().await.unwrap());
    }
    let status = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            &format!("/v1/trading-accounts/{a}/credentials"),
            &t.owner.1,
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(status["has_credentials"], true);
    assert!(status["credentials_updated_at"].is_string());
    let tail: String = canary
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert_eq!(status["credentials_hint"], format!("••••{tail}"));
    // A viewer's refused read, a validation error echoing nothing.
    responses.push_str(
        &call(
            &app,
            reqwest::Method::GET,
            &format!("/v1/trading-accounts/{a}/credentials"),
            &t.viewer.1,
            None,
        )
        .await
        .text()
        .await
        .unwrap(),
    );
    responses.push_str(
        &call(
            &app,
            reqwest::Method::PUT,
            &format!("/v1/trading-accounts/{a}/credentials"),
            &t.owner.1,
            Some(json!({"api_key": canary, "api_secret": secret, "extra": canary})),
        )
        .await
        .text()
        .await
        .unwrap(),
    );

    // gRPC account reads carry no credentials; GetBrokerCredentials does.
    let mut reader = account_client(&app, &["accounts:read", "users:read"]).await;
    let acct = reader
        .get_trading_account(GetTradingAccountRequest {
            account_id: a.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    responses.push_str(&format!("{acct:?}"));
    let mut users = UserServiceClient::new(
        app.grpc_with_token(&app.service_token(&["users:read"]).await)
            .await,
    );
    let listed = users
        .list_user_accounts(ListUserAccountsRequest {
            user_id: t.owner.0.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    responses.push_str(&format!("{listed:?}"));
    // Without credentials:read: PERMISSION_DENIED.
    let err = reader
        .get_broker_credentials(GetBrokerCredentialsRequest {
            account_id: a.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let (client_id, client_secret) = app.service_client(&["credentials:read"]).await;
    let res = reqwest::Client::new()
        .post(app.url("/v1/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", client_secret.as_str()),
        ])
        .send()
        .await
        .unwrap();
    let svc_token = json_ok(res, 200).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut creds_client = AccountServiceClient::new(app.grpc_with_token(&svc_token).await);
    let creds = creds_client
        .get_broker_credentials(GetBrokerCredentialsRequest {
            account_id: a.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .credentials
        .unwrap();
    assert_eq!(creds.api_key, canary);
    assert_eq!(creds.api_secret, secret);
    assert_eq!(creds.access_token, token);
    // Each read is audited with the client's id.
    assert_eq!(
        audit_count(&app, "trading_account.credentials.read", Some(&client_id)).await,
        1
    );

    assert!(!responses.contains(&canary), "a response leaked the canary");
    let audit: Vec<String> = sqlx::query_scalar(
        "select concat_ws(' ', actor_id, action, target_id, ip, user_agent, details::text) from audit_logs",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert!(audit.len() > 5);
    assert!(
        audit.iter().all(|row| !row.contains(&canary)),
        "an audit row leaked the canary"
    );
    let stored: Vec<String> =
        sqlx::query_scalar("select row_to_json(t)::text from trading_accounts t")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert!(
        stored.iter().all(|r| !r.contains("CANARY")),
        "plaintext at rest"
    );
    let logs = String::from_utf8_lossy(&sink.0.lock().unwrap()).to_string();
    assert!(!logs.is_empty(), "the log capture saw the service");
    assert!(!logs.contains(&canary), "a log line leaked the canary");
}

async fn ciphertexts(app: &TestApp, account: Uuid) -> (Vec<u8>, Vec<u8>, String) {
    sqlx::query_as(
        "select api_key_ciphertext, api_secret_ciphertext, credentials_key_id from trading_accounts where id = $1",
    )
    .bind(account)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn same_secret_encrypts_differently_and_tampering_fails_closed() {
    let app = TestApp::spawn().await;
    let (_, _, owner) = app.user_with_token().await;
    let a = create_account(&app, &owner, "T1").await;
    let b = create_account(&app, &owner, "T2").await;
    let creds = json!({"api_key": "same-api-key-1234", "api_secret": "same-secret"});
    assert_eq!(put_credentials(&app, &owner, a, creds.clone()).await, 204);
    let (key1, secret1, kid) = ciphertexts(&app, a).await;
    assert_eq!(put_credentials(&app, &owner, a, creds.clone()).await, 204);
    let (key2, secret2, _) = ciphertexts(&app, a).await;
    let ring = &crate::helpers::test_vars("")["CREDENTIALS_ENCRYPTION_KEYS"];
    assert_eq!(Some(kid.as_str()), ring.split(':').next());
    assert_ne!(key1, key2, "a fresh nonce per write");
    assert_ne!(secret1, secret2);
    assert_eq!(
        key1.len(),
        12 + "same-api-key-1234".len() + 16,
        "nonce || ciphertext || tag"
    );
    assert_eq!(put_credentials(&app, &owner, b, creds).await, 204);

    let mut client = account_client(&app, &["credentials:read"]).await;
    let get = |id: Uuid| GetBrokerCredentialsRequest {
        account_id: id.to_string(),
    };
    assert_eq!(
        client
            .get_broker_credentials(get(a))
            .await
            .unwrap()
            .into_inner()
            .credentials
            .unwrap()
            .api_secret,
        "same-secret"
    );

    // One flipped bit in the stored secret: refused, audited, nothing returned.
    sqlx::query(
        "update trading_accounts set api_secret_ciphertext =
            set_byte(api_secret_ciphertext, 14, get_byte(api_secret_ciphertext, 14) # 1)
          where id = $1",
    )
    .bind(a)
    .execute(&app.db)
    .await
    .unwrap();
    let err = client.get_broker_credentials(get(a)).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("integrity"));
    assert_eq!(
        audit_count(&app, "trading_account.credentials.decrypt_failed", None).await,
        1
    );

    // Another row's ciphertext does not open here: the account id is bound in.
    sqlx::query(
        "update trading_accounts set api_key_ciphertext = (select api_key_ciphertext from trading_accounts where id = $1),
                api_secret_ciphertext = (select api_secret_ciphertext from trading_accounts where id = $1)
          where id = $2",
    )
    .bind(b)
    .bind(a)
    .execute(&app.db)
    .await
    .unwrap();
    let err = client.get_broker_credentials(get(a)).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    // Nor does one field's ciphertext in another field of the same row.
    sqlx::query(
        "update trading_accounts set api_secret_ciphertext = api_key_ciphertext where id = $1",
    )
    .bind(b)
    .execute(&app.db)
    .await
    .unwrap();
    let err = client.get_broker_credentials(get(b)).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    assert_eq!(
        audit_count(&app, "trading_account.credentials.decrypt_failed", None).await,
        3
    );
    assert_eq!(
        audit_count(&app, "trading_account.credentials.read", None).await,
        1
    );
}

#[tokio::test]
async fn reencryption_moves_every_value_to_the_new_key() {
    let app = TestApp::spawn().await;
    let (_, _, owner) = app.user_with_token().await;
    let mut accounts = Vec::new();
    for i in 0..3 {
        let a = create_account(&app, &owner, &format!("R{i}")).await;
        let creds = json!({"api_key": format!("api-key-value-{i}"), "api_secret": format!("secret-{i}"), "access_token": "tok"});
        assert_eq!(put_credentials(&app, &owner, a, creds).await, 204);
        accounts.push(a);
    }
    let before_updated: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        sqlx::query_scalar("select credentials_updated_at from trading_accounts order by id")
            .fetch_all(&app.db)
            .await
            .unwrap();

    // A replica with the new key first, the old one still present.
    let mut vars = crate::helpers::test_vars(&app.database_url);
    let old_key = vars["CREDENTIALS_ENCRYPTION_KEYS"].clone();
    vars.insert(
        "CREDENTIALS_ENCRYPTION_KEYS".into(),
        format!("{NEW_KEY},{old_key}"),
    );
    let rotated = TestApp::spawn_vars(vars.clone()).await;
    let summary = rotated
        .services
        .accounts
        .reencrypt_credentials()
        .await
        .unwrap();
    assert_eq!(summary.active_key_id, "new");
    assert_eq!(summary.candidates, 3);
    assert_eq!(summary.reencrypted, 3);
    assert!(summary.failed.is_empty());
    // Safe to run again: nothing left to move.
    let again = rotated
        .services
        .accounts
        .reencrypt_credentials()
        .await
        .unwrap();
    assert_eq!((again.candidates, again.reencrypted), (0, 0));
    let kids: Vec<String> = sqlx::query_scalar(
        "select credentials_key_id from trading_accounts where credentials_key_id is not null",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(kids, ["new", "new", "new"]);
    let after_updated: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        sqlx::query_scalar("select credentials_updated_at from trading_accounts order by id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        before_updated, after_updated,
        "the credentials themselves did not change"
    );
    assert_eq!(
        audit_count(
            &app,
            "trading_account.credentials.reencrypted",
            Some("reencrypt-credentials")
        )
        .await,
        3
    );

    // The old key removed: everything still opens.
    vars.insert("CREDENTIALS_ENCRYPTION_KEYS".into(), NEW_KEY.into());
    vars.insert(
        "REDIS_KEY_PREFIX".into(),
        format!("test:{}:", Uuid::new_v4().simple()),
    );
    let new_only = TestApp::spawn_vars(vars).await;
    let mut client = account_client(&new_only, &["credentials:read"]).await;
    for (i, a) in accounts.iter().enumerate() {
        let c = client
            .get_broker_credentials(GetBrokerCredentialsRequest {
                account_id: a.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
            .credentials
            .unwrap();
        assert_eq!(c.api_key, format!("api-key-value-{i}"));
        assert_eq!(c.api_secret, format!("secret-{i}"));
        assert_eq!(c.access_token, "tok");
    }
    // And the replica that only knows the old key now fails closed.
    let mut old_client = account_client(&app, &["credentials:read"]).await;
    let err = old_client
        .get_broker_credentials(GetBrokerCredentialsRequest {
            account_id: accounts[0].to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
}

#[tokio::test]
async fn concurrent_adds_of_one_member_give_exactly_one_success() {
    let app = TestApp::spawn().await;
    let (_, _, owner) = app.user_with_token().await;
    let a = create_account(&app, &owner, "C1").await;
    let (member_id, email, _) = app.user_with_token().await;
    let path = format!("/v1/trading-accounts/{a}/members");
    let attempts = (0..8).map(|i| {
        let body = if i % 2 == 0 {
            json!({"email": email.to_uppercase(), "role": "viewer"})
        } else {
            json!({"user_id": member_id, "role": "trader"})
        };
        call(&app, reqwest::Method::POST, &path, &owner, Some(body))
    });
    let statuses: Vec<u16> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.status().as_u16())
        .collect();
    // Each is an invitation now: exactly one is made, the rest are conflicts.
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        7,
        "{statuses:?}"
    );
    let pending: i64 = sqlx::query_scalar(
        "select count(*) from trading_account_invitations where trading_account_id = $1 and status = 'pending'",
    )
    .bind(a)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(pending, 1);
    assert_eq!(audit_count(&app, "membership.invited", None).await, 1);
}

#[tokio::test]
async fn check_account_access_answers_for_every_role() {
    let app = TestApp::spawn().await;
    let t = team(&app).await;
    let mut client = account_client(&app, &["permissions:check"]).await;
    let cases = [
        (t.owner.0, "owner", [true, true, true], "owner"),
        (
            t.manager.0,
            "manager",
            [true, true, true],
            "membership:manager",
        ),
        (
            t.trader.0,
            "trader",
            [true, true, false],
            "membership:trader",
        ),
        (
            t.viewer.0,
            "viewer",
            [true, false, false],
            "membership:viewer",
        ),
        (t.stranger.0, "", [false, false, false], "default:deny"),
    ];
    for (user, access, expected, rule) in cases {
        for (permission, allowed) in ["read", "trade", "manage"].into_iter().zip(expected) {
            let r = client
                .check_account_access(CheckAccountAccessRequest {
                    user_id: user.to_string(),
                    account_id: t.account.to_string(),
                    permission: permission.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.allowed, allowed, "{access} {permission}");
            assert_eq!(r.access, access);
            assert_eq!(r.decided_by, rule, "{access} {permission}");
        }
    }
    let bad = client
        .check_account_access(CheckAccountAccessRequest {
            user_id: t.owner.0.to_string(),
            account_id: t.account.to_string(),
            permission: "admin".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // A platform viewer holding a trader membership still may not trade: the
    // role's deny policy wins over the membership.
    set_roles(&app, t.trader.0, &["user", "viewer"]).await;
    let r = client
        .check_account_access(CheckAccountAccessRequest {
            user_id: t.trader.0.to_string(),
            account_id: t.account.to_string(),
            permission: "trade".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.allowed);
    assert_eq!(r.decided_by, "policy:viewer_no_writes");

    // The scope gates the method.
    let mut no_scope = account_client(&app, &["accounts:read"]).await;
    let err = no_scope
        .check_account_access(CheckAccountAccessRequest {
            user_id: t.owner.0.to_string(),
            account_id: t.account.to_string(),
            permission: "read".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The refusal is on the record, naming the client and the scope it lacked.
    let (actor_type, target, need): (String, Option<String>, String) = sqlx::query_as(
        "select actor_type, target_id, details->>'need' from audit_logs
          where action = 'authz.denied' order by id desc limit 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(actor_type, "service_client");
    assert_eq!(target, Some(t.account.to_string()));
    assert_eq!(need, "permissions:check");

    // ListUserAccounts: the account with each member's access and permissions.
    let token = app.service_token(&["users:read"]).await;
    let mut users = UserServiceClient::new(app.grpc_with_token(&token).await);
    let listed = users
        .list_user_accounts(ListUserAccountsRequest {
            user_id: t.viewer.0.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .accounts;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].access, "viewer");
    assert_eq!(listed[0].permissions, ["read"]);
    assert_eq!(
        listed[0].account.as_ref().unwrap().id,
        t.account.to_string()
    );
    let err = users
        .list_user_accounts(ListUserAccountsRequest {
            user_id: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn check_permission_follows_roles_and_policies() {
    let app = TestApp::spawn().await;
    let (user, _, _) = app.user_with_token().await;
    let (admin, _, _) = app.user_with_token().await;
    app.make_admin(admin).await;
    let token = app.service_token(&["permissions:check"]).await;
    let client = UserServiceClient::new(app.grpc_with_token(&token).await);
    let ask = |subject: String, action: &str, resource: &str| {
        let req = CheckPermissionRequest {
            subject,
            action: action.into(),
            resource: resource.into(),
        };
        let mut c = client.clone();
        async move { c.check_permission(req).await }
    };
    let cases = [
        (
            format!("user:{user}"),
            "orders:write",
            "*",
            true,
            "policy:trader_scopes",
        ),
        (
            format!("user:{user}"),
            "admin:users",
            "*",
            false,
            "default:deny",
        ),
        (
            format!("user:{admin}"),
            "admin:audit",
            "*",
            true,
            "policy:admin_scopes",
        ),
        (
            format!("user:{}", Uuid::new_v4()),
            "orders:read",
            "*",
            false,
            "default:deny",
        ),
        (
            "client:backend".to_string(),
            "credentials:read",
            "trading_account:1",
            true,
            "client_scope:credentials:read",
        ),
        (
            "client:calendar".to_string(),
            "credentials:read",
            "*",
            false,
            "default:deny",
        ),
    ];
    for (subject, action, resource, allowed, rule) in cases {
        let r = ask(subject.clone(), action, resource)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.allowed, r.decided_by.as_str()),
            (allowed, rule),
            "{subject} {action}"
        );
    }
    // Deny wins: the viewer role's deny beats the user role's allow.
    set_roles(&app, user, &["user", "viewer"]).await;
    let r = ask(format!("user:{user}"), "orders:write", "*")
        .await
        .unwrap()
        .into_inner();
    assert!(!r.allowed);
    assert_eq!(r.decided_by, "policy:viewer_no_writes");
    let err = ask("someone".into(), "orders:write", "*")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_removed_member_is_refused_at_once_on_rest_and_grpc() {
    let app = TestApp::spawn().await;
    let t = team(&app).await;
    let a = t.account;
    let mut access = account_client(&app, &["permissions:check"]).await;
    let check = |user: Uuid| CheckAccountAccessRequest {
        user_id: user.to_string(),
        account_id: a.to_string(),
        permission: "trade".into(),
    };
    let token = app.service_token(&["users:read"]).await;
    let mut users = UserServiceClient::new(app.grpc_with_token(&token).await);
    let list = |user: Uuid| ListUserAccountsRequest {
        user_id: user.to_string(),
    };
    // Warm every cache first.
    for _ in 0..2 {
        let listed = users
            .list_user_accounts(list(t.trader.0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.accounts.len(), 1);
        assert!(
            access
                .check_account_access(check(t.trader.0))
                .await
                .unwrap()
                .into_inner()
                .allowed
        );
        json_ok(
            call(
                &app,
                reqwest::Method::GET,
                &format!("/v1/trading-accounts/{a}"),
                &t.trader.1,
                None,
            )
            .await,
            200,
        )
        .await;
    }
    let res = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/trading-accounts/{a}/members/{}", t.trader.0),
        &t.owner.1,
        None,
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
    let r = access
        .check_account_access(check(t.trader.0))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.allowed);
    assert_eq!(r.decided_by, "default:deny");
    let res = call(
        &app,
        reqwest::Method::GET,
        &format!("/v1/trading-accounts/{a}"),
        &t.trader.1,
        None,
    )
    .await;
    assert_problem(res, 404, "not_found").await;
    let mine = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            "/v1/users/me/accounts",
            &t.trader.1,
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(mine["items"], json!([]));
    let listed = users
        .list_user_accounts(list(t.trader.0))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.accounts.is_empty(),
        "ListUserAccounts dropped the account at once"
    );
    // An edit shows at once in a cached list too.
    assert_eq!(
        users
            .list_user_accounts(list(t.viewer.0))
            .await
            .unwrap()
            .into_inner()
            .accounts[0]
            .account
            .as_ref()
            .unwrap()
            .nickname,
        "main"
    );
    json_ok(
        call(
            &app,
            reqwest::Method::PATCH,
            &format!("/v1/trading-accounts/{a}"),
            &t.owner.1,
            Some(json!({"nickname": "renamed"})),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(
        users
            .list_user_accounts(list(t.viewer.0))
            .await
            .unwrap()
            .into_inner()
            .accounts[0]
            .account
            .as_ref()
            .unwrap()
            .nickname,
        "renamed"
    );
    // Removing again: no such member.
    let res = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/trading-accounts/{a}/members/{}", t.trader.0),
        &t.owner.1,
        None,
    )
    .await;
    assert_problem(res, 404, "not_found").await;

    // Deleting the account ends every membership at once, on both transports.
    assert!(
        access
            .check_account_access(check(t.manager.0))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let res = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/trading-accounts/{a}"),
        &t.owner.1,
        None,
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
    assert!(
        !access
            .check_account_access(check(t.manager.0))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let live: i64 = sqlx::query_scalar(
        "select count(*) from trading_account_memberships where trading_account_id = $1 and revoked_at is null",
    )
    .bind(a)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(live, 0);
    let mut reader = account_client(&app, &["accounts:read"]).await;
    let err = reader
        .get_trading_account(GetTradingAccountRequest {
            account_id: a.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn a_removal_on_one_replica_reaches_the_other_at_once() {
    let app = TestApp::spawn().await;
    let t = team(&app).await;
    // A second replica: same database, same Redis prefix.
    let replica = TestApp::spawn_vars({
        let mut v = crate::helpers::test_vars(&app.database_url);
        v.insert(
            "REDIS_KEY_PREFIX".into(),
            app.settings.redis_key_prefix.clone(),
        );
        v
    })
    .await;
    let mut access = account_client(&replica, &["permissions:check"]).await;
    let check = CheckAccountAccessRequest {
        user_id: t.viewer.0.to_string(),
        account_id: t.account.to_string(),
        permission: "read".into(),
    };
    assert!(
        access
            .check_account_access(check.clone())
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let res = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/trading-accounts/{}/members/{}", t.account, t.viewer.0),
        &t.owner.1,
        None,
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let r = access
            .check_account_access(check.clone())
            .await
            .unwrap()
            .into_inner();
        if !r.allowed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica still allows after 1 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn api_keys_are_held_to_their_scopes_and_accounts() {
    let app = TestApp::spawn().await;
    let (_, _, owner) = app.user_with_token().await;
    let a = create_account(&app, &owner, "K1").await;
    let b = create_account(&app, &owner, "K2").await;
    let issue = |body: Value| {
        call(
            &app,
            reqwest::Method::POST,
            "/v1/api-keys",
            &owner,
            Some(body),
        )
    };
    let read_a = json_ok(
        issue(json!({"name": "read-a", "scopes": ["accounts:read"], "trading_account_ids": [a]}))
            .await,
        201,
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_string();
    let with_key = |key: &str, method: reqwest::Method, path: String, body: Option<Value>| {
        let mut req = reqwest::Client::new()
            .request(method, app.url(&path))
            .header("x-api-key", key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send()
    };
    let res = with_key(
        &read_a,
        reqwest::Method::GET,
        format!("/v1/trading-accounts/{a}"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    // Another account of the same owner is invisible to this key.
    let res = with_key(
        &read_a,
        reqwest::Method::GET,
        format!("/v1/trading-accounts/{b}"),
        None,
    )
    .await
    .unwrap();
    assert_problem(res, 404, "not_found").await;
    let list = json_ok(
        with_key(
            &read_a,
            reqwest::Method::GET,
            "/v1/trading-accounts".into(),
            None,
        )
        .await
        .unwrap(),
        200,
    )
    .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    // Read scope only: no writes.
    let res = with_key(
        &read_a,
        reqwest::Method::PATCH,
        format!("/v1/trading-accounts/{a}"),
        Some(json!({"nickname": "x"})),
    )
    .await
    .unwrap();
    assert_problem(res, 403, "forbidden").await;
    let res = with_key(
        &read_a,
        reqwest::Method::POST,
        "/v1/trading-accounts".into(),
        Some(json!({"broker": "zerodha", "broker_user_id": "K3"})),
    )
    .await
    .unwrap();
    assert_problem(res, 403, "forbidden").await;
}

#[tokio::test]
async fn audit_logs_are_for_admins_filtered_and_paginated() {
    let app = TestApp::spawn().await;
    let t = team(&app).await;
    let (admin, _, _) = app.user_with_token().await;
    app.make_admin(admin).await;
    let admin_token = {
        let email: String = sqlx::query_scalar("select email from users where id = $1")
            .bind(admin)
            .fetch_one(&app.db)
            .await
            .unwrap();
        app.login(&email, crate::helpers::STRONG_PASSWORD).await
    };
    let res = call(
        &app,
        reqwest::Method::GET,
        "/v1/admin/audit-logs",
        &t.owner.1,
        None,
    )
    .await;
    assert_problem(res, 403, "forbidden").await;
    assert_eq!(
        audit_count(&app, "authz.denied", Some(&t.owner.0.to_string())).await,
        1
    );

    let page = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            &format!(
                "/v1/admin/audit-logs?action=membership.added&target_id={}&limit=2",
                t.account
            ),
            &admin_token,
            None,
        )
        .await,
        200,
    )
    .await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let mut keys: Vec<&str> = items[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "action",
            "actor_id",
            "actor_type",
            "details",
            "id",
            "ip",
            "occurred_at",
            "outcome",
            "target_id",
            "target_type",
            "user_agent"
        ]
    );
    assert!(
        items[0]["id"].as_i64() > items[1]["id"].as_i64(),
        "newest first"
    );
    assert_eq!(
        items[0]["details"]["role"], "viewer",
        "the last member added"
    );
    // Added when the invitee accepted: they are the actor, the owner invited.
    assert_eq!(items[0]["actor_id"], t.viewer.0.to_string());
    assert_eq!(items[0]["details"]["invited_by"], t.owner.0.to_string());
    let cursor = page["next_cursor"].as_str().unwrap();
    let rest = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            &format!(
                "/v1/admin/audit-logs?action=membership.added&target_id={}&limit=2&cursor={cursor}",
                t.account
            ),
            &admin_token,
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest["items"][0]["details"]["role"], "manager");
    assert!(rest["next_cursor"].is_null());
    // A time window in the future holds nothing; limits are bounded.
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let empty = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            &format!("/v1/admin/audit-logs?since={}", urlencode(&future)),
            &admin_token,
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(empty["items"], json!([]));
    let res = call(
        &app,
        reqwest::Method::GET,
        "/v1/admin/audit-logs?limit=201",
        &admin_token,
        None,
    )
    .await;
    assert_problem(res, 400, "validation_failed").await;
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test]
async fn openapi_documents_the_account_routes() {
    let app = TestApp::spawn().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let paths = &doc["paths"];
    for (path, methods) in [
        ("/v1/trading-accounts", &["get", "post"][..]),
        ("/v1/trading-accounts/{id}", &["get", "patch", "delete"][..]),
        ("/v1/trading-accounts/{id}/credentials", &["get", "put"][..]),
        ("/v1/trading-accounts/{id}/members", &["get", "post"][..]),
        (
            "/v1/trading-accounts/{id}/members/{user_id}",
            &["patch", "delete"][..],
        ),
        ("/v1/users/me/accounts", &["get"][..]),
        ("/v1/admin/audit-logs", &["get"][..]),
        ("/v1/trading-accounts/{id}/invitations", &["get"][..]),
        (
            "/v1/trading-accounts/{id}/invitations/{invitation_id}",
            &["delete"][..],
        ),
        ("/v1/users/me/invitations", &["get"][..]),
        ("/v1/users/me/invitations/{id}/accept", &["post"][..]),
        ("/v1/users/me/invitations/{id}/decline", &["post"][..]),
    ] {
        for m in methods {
            assert!(paths[path][m].is_object(), "{m} {path} is documented");
        }
    }
    // Account reads are documented without any credential value.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let account = &schemas["AccountBody"]["properties"];
    assert!(account["credentials_hint"].is_object());
    assert!(account.get("api_key").is_none() && account.get("api_secret").is_none());
    // Adding a member is documented as an invitation (202).
    assert!(paths["/v1/trading-accounts/{id}/members"]["post"]["responses"]["202"].is_object());
}
