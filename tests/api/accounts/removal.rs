//! A removed member is refused at once, on REST and gRPC and on every replica.

use serde_json::json;
use tonic::Code;
use user_service::proto::user_service_client::UserServiceClient;
use user_service::proto::{
    CheckAccountAccessRequest, GetTradingAccountRequest, ListUserAccountsRequest,
};
use uuid::Uuid;

use crate::helpers::{assert_problem, TestApp};

use super::{account_client, call, json_ok, team};

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
