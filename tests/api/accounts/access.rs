//! Who may do what on an account: non-members see 404 everywhere (BOLA), members
//! are held to their role, and concurrent adds of one member give one success.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{assert_problem, TestApp};

use super::{accept, audit_count, call, create_account, json_ok, put_credentials, team};

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
