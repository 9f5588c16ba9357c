//! Account lifecycle, list shapes and paging, the audit trail of account changes, and
//! the OpenAPI entries of the account routes.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{assert_problem, TestApp};

use super::{audit_count, call, create_account, json_ok, team};

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
