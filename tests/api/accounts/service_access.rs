//! What internal services see through gRPC (CheckAccountAccess, CheckPermission)
//! and what API keys may do on accounts.

use serde_json::{json, Value};
use tonic::Code;
use user_service::proto::user_service_client::UserServiceClient;
use user_service::proto::{
    CheckAccountAccessRequest, CheckPermissionRequest, ListUserAccountsRequest,
};
use uuid::Uuid;

use crate::helpers::{assert_problem, TestApp};

use super::{account_client, call, create_account, json_ok, team};

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
