//! What a key may do on an account follows its owner's access there (issue 11,
//! point 1), and only administrators choose a subscription tier (issue 10, 8).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use user_service::proto::account_service_client::AccountServiceClient;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::{CheckAccountAccessRequest, VerifyApiKeyRequest, VerifyReason};
use uuid::Uuid;

use crate::accounts::{add_member, call, create_account, json_ok};
use crate::helpers::{assert_problem, fresh_database, test_vars, TestApp};

async fn new_key(app: &TestApp, token: &str, body: Value) -> reqwest::Response {
    call(
        app,
        reqwest::Method::POST,
        "/v1/api-keys",
        token,
        Some(body),
    )
    .await
}

async fn key(app: &TestApp, token: &str, body: Value) -> String {
    json_ok(new_key(app, token, body).await, 201).await["key"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn set_role(app: &TestApp, owner: &str, account: Uuid, member: Uuid, role: &str) {
    json_ok(
        call(
            app,
            reqwest::Method::PATCH,
            &format!("/v1/trading-accounts/{account}/members/{member}"),
            owner,
            Some(json!({ "role": role })),
        )
        .await,
        200,
    )
    .await;
}

/// An owner, and a member of `role` on the owner's new account: (account,
/// owner token, member id, member token).
async fn shared_account(app: &TestApp, role: &str) -> (Uuid, String, Uuid, String) {
    let (_, _, owner) = app.user_with_token().await;
    let a = create_account(app, &owner, "S1").await;
    let (member_id, email, member) = app.user_with_token().await;
    add_member(app, &owner, a, &email, role, &member).await;
    (a, owner, member_id, member)
}

#[tokio::test]
async fn a_key_on_an_account_cannot_carry_scopes_its_owner_lacks_there() {
    let app = TestApp::spawn().await;
    let (a, _, _, viewer) = shared_account(&app, "viewer").await;
    let res = new_key(
        &app,
        &viewer,
        json!({"name": "trade", "scopes": ["orders:read", "orders:write"], "trading_account_ids": [a]}),
    )
    .await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(
        body["errors"][0]["field"], "trading_account_ids[0]",
        "{body}"
    );
    assert_eq!(body["errors"][0]["code"], "insufficient_access");
    assert_eq!(body["errors"].as_array().unwrap().len(), 1);
    // What the viewer may do there, a key may carry.
    key(
        &app,
        &viewer,
        json!({"name": "read", "scopes": ["orders:read", "market_data:read"], "trading_account_ids": [a]}),
    )
    .await;

    let (b, _, _, trader) = shared_account(&app, "trader").await;
    key(
        &app,
        &trader,
        json!({"name": "trade", "scopes": ["orders:write"], "trading_account_ids": [b]}),
    )
    .await;
    let res = new_key(
        &app,
        &trader,
        json!({"name": "manage", "scopes": ["accounts:write"], "trading_account_ids": [b]}),
    )
    .await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "trading_account_ids[0]");
}

#[tokio::test]
async fn verify_api_key_follows_a_demotion_on_every_replica_within_a_second() {
    let mut vars = test_vars(&fresh_database().await);
    vars.insert("LOG_LEVEL".into(), "warning".into());
    let first = TestApp::spawn_vars(vars.clone()).await;
    let second = TestApp::spawn_vars(vars).await;
    let (a, owner, trader_id, trader) = shared_account(&first, "trader").await;
    let bound = key(
        &first,
        &trader,
        json!({"name": "bound", "scopes": ["orders:write"], "trading_account_ids": [a]}),
    )
    .await;
    let open = key(
        &first,
        &trader,
        json!({"name": "open", "scopes": ["orders:read", "orders:write"]}),
    )
    .await;

    let token = second.service_token(&["auth:verify"]).await;
    let mut verify = AuthServiceClient::new(second.grpc_with_token(&token).await);
    let ask = |key: &str, scope: &str| VerifyApiKeyRequest {
        api_key: key.to_string(),
        required_scopes: vec![scope.to_string()],
        trading_account_id: Some(a.to_string()),
        ..Default::default()
    };
    // Both keys trade on the account while their owner is a trader (and the
    // second replica has cached them).
    for k in [&bound, &open] {
        for _ in 0..2 {
            let r = verify
                .verify_api_key(ask(k, "orders:write"))
                .await
                .unwrap()
                .into_inner();
            assert!(r.valid, "{:?}", VerifyReason::try_from(r.reason));
        }
    }

    set_role(&first, &owner, a, trader_id, "viewer").await;
    let demoted = Instant::now();
    for k in [&bound, &open] {
        loop {
            let r = verify
                .verify_api_key(ask(k, "orders:write"))
                .await
                .unwrap()
                .into_inner();
            if !r.valid {
                assert_eq!(
                    VerifyReason::try_from(r.reason).unwrap(),
                    VerifyReason::AccountNotAllowed
                );
                break;
            }
            assert!(
                demoted.elapsed() < Duration::from_secs(1),
                "a viewer's key still trades after {:?}",
                demoted.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Reading is still within a viewer's access, and the key's scopes on that
    // account are reported as far as the access covers them.
    let r = verify
        .verify_api_key(ask(&open, "orders:read"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.valid);
    assert_eq!(r.key.unwrap().scopes, ["orders:read"]);
    // CheckAccountAccess agrees.
    let token = second.service_token(&["permissions:check"]).await;
    let mut access = AccountServiceClient::new(second.grpc_with_token(&token).await);
    let check = access
        .check_account_access(CheckAccountAccessRequest {
            user_id: trader_id.to_string(),
            account_id: a.to_string(),
            permission: "trade".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!check.allowed);

    // Promoted again, the keys trade again.
    set_role(&first, &owner, a, trader_id, "trader").await;
    let promoted = Instant::now();
    loop {
        let r = verify
            .verify_api_key(ask(&bound, "orders:write"))
            .await
            .unwrap()
            .into_inner();
        if r.valid {
            break;
        }
        assert!(promoted.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_api_key_on_account_routes_acts_only_within_its_owners_current_access() {
    let app = TestApp::spawn().await;
    let (a, owner, manager_id, manager) = shared_account(&app, "manager").await;
    let k = key(
        &app,
        &manager,
        json!({"name": "m", "scopes": ["accounts:read", "accounts:write"], "trading_account_ids": [a]}),
    )
    .await;
    let with_key = |method: reqwest::Method, body: Option<Value>| {
        let mut req = reqwest::Client::new()
            .request(method, app.url(&format!("/v1/trading-accounts/{a}")))
            .header("x-api-key", &k);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send()
    };
    let res = with_key(reqwest::Method::PATCH, Some(json!({"nickname": "by key"})))
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    set_role(&app, &owner, a, manager_id, "viewer").await;
    let res = with_key(reqwest::Method::PATCH, Some(json!({"nickname": "again"})))
        .await
        .unwrap();
    assert_problem(res, 403, "forbidden").await;
    let res = with_key(reqwest::Method::GET, None).await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
}

#[tokio::test]
async fn only_an_administrator_chooses_a_subscription_tier() {
    let app = TestApp::spawn().await;
    let (_, _, user) = app.user_with_token().await;
    let create = |token: String, body: Value| {
        let app = &app;
        async move {
            call(
                app,
                reqwest::Method::POST,
                "/v1/trading-accounts",
                &token,
                Some(body),
            )
            .await
        }
    };
    let res = create(
        user.clone(),
        json!({"broker": "zerodha", "broker_user_id": "T1", "subscription_tier": "enterprise"}),
    )
    .await;
    let body = assert_problem(res, 403, "forbidden").await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("subscription_tier"),
        "{body}"
    );
    let n: i64 = sqlx::query_scalar("select count(*) from trading_accounts")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing was created");
    let plain = json_ok(
        create(user, json!({"broker": "zerodha", "broker_user_id": "T1"})).await,
        201,
    )
    .await;
    assert_eq!(plain["subscription_tier"], "free");

    let (admin_id, admin_email, _) = app.user_with_token().await;
    app.make_admin(admin_id).await;
    let admin = app
        .login(&admin_email, crate::helpers::STRONG_PASSWORD)
        .await;
    let chosen = json_ok(
        create(
            admin,
            json!({"broker": "zerodha", "broker_user_id": "T2", "subscription_tier": "enterprise"}),
        )
        .await,
        201,
    )
    .await;
    assert_eq!(chosen["subscription_tier"], "enterprise");
}
