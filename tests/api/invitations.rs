//! Membership with consent (issue 11, point 7): inviting says nothing about
//! whether an email is registered, and nobody joins someone else's account
//! without accepting.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::accounts::{accept, audit_count, call, create_account, json_ok};
use crate::helpers::{assert_problem, TestApp};

async fn invite(app: &TestApp, token: &str, account: Uuid, body: Value) -> reqwest::Response {
    call(
        app,
        reqwest::Method::POST,
        &format!("/v1/trading-accounts/{account}/members"),
        token,
        Some(body),
    )
    .await
}

async fn get_ok(app: &TestApp, token: &str, path: &str) -> Value {
    json_ok(
        call(app, reqwest::Method::GET, path, token, None).await,
        200,
    )
    .await
}

/// The body without what differs between any two invitations (id, email, times).
fn shape(mut v: Value) -> Value {
    for f in ["id", "email", "created_at", "expires_at"] {
        v["invitation"][f] = Value::Null;
    }
    v
}

#[tokio::test]
async fn inviting_does_not_tell_registered_emails_from_unknown_ones() {
    let app = TestApp::spawn().await;
    let (_, _, owner) = app.user_with_token().await;
    let a = create_account(&app, &owner, "INV1").await;
    let (member_id, member_email, member) = app.user_with_token().await;
    let unknown = format!("nobody-{}@example.com", Uuid::new_v4().simple());

    let registered = invite(
        &app,
        &owner,
        a,
        json!({"email": member_email, "role": "trader"}),
    )
    .await;
    let nobody = invite(&app, &owner, a, json!({"email": unknown, "role": "trader"})).await;
    assert_eq!(registered.status().as_u16(), 202);
    assert_eq!(nobody.status().as_u16(), 202);
    let registered: Value = registered.json().await.unwrap();
    let nobody: Value = nobody.json().await.unwrap();
    assert_eq!(registered["status"], "invited");
    assert_eq!(shape(registered.clone()), shape(nobody), "same answer");
    let text = registered.to_string();
    assert!(
        !text.contains(&member_id.to_string()) && !text.contains("user_id"),
        "no user details: {text}"
    );

    // Not a member until they accept: no access, not listed.
    let res = call(
        &app,
        reqwest::Method::GET,
        &format!("/v1/trading-accounts/{a}"),
        &member,
        None,
    )
    .await;
    assert_problem(res, 404, "not_found").await;
    let members = get_ok(&app, &owner, &format!("/v1/trading-accounts/{a}/members")).await;
    assert_eq!(members["items"], json!([]));
    // Managers see both pending invitations.
    let pending = get_ok(
        &app,
        &owner,
        &format!("/v1/trading-accounts/{a}/invitations"),
    )
    .await;
    let emails: Vec<&str> = pending["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails, [member_email.as_str(), unknown.as_str()]);
    assert!(pending["next_cursor"].is_null());
    // A second invitation for a pending email is a conflict, for either kind.
    for email in [&member_email, &unknown] {
        let again = invite(
            &app,
            &owner,
            a,
            json!({"email": email.to_uppercase(), "role": "viewer"}),
        )
        .await;
        assert_problem(again, 409, "conflict").await;
    }
    assert_eq!(audit_count(&app, "membership.invited", None).await, 2);
}

#[tokio::test]
async fn the_invitee_accepts_or_declines_in_person() {
    let app = TestApp::spawn().await;
    let (owner_id, owner_email, owner) = app.user_with_token().await;
    let a = create_account(&app, &owner, "INV2").await;
    let (yes_id, yes_email, yes) = app.user_with_token().await;
    let (no_id, no_email, no) = app.user_with_token().await;
    let (_, _, stranger) = app.user_with_token().await;
    for (email, role) in [(&yes_email, "trader"), (&no_email, "viewer")] {
        let res = invite(&app, &owner, a, json!({"email": email, "role": role})).await;
        assert_eq!(res.status().as_u16(), 202);
    }

    let mine = get_ok(&app, &yes, "/v1/users/me/invitations").await;
    assert!(mine["next_cursor"].is_null());
    let items = mine["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    let inv = &items[0];
    assert_eq!(inv["role"], "trader");
    assert_eq!(inv["account"]["id"], a.to_string());
    assert_eq!(inv["account"]["broker"], "zerodha");
    assert_eq!(inv["invited_by_email"], owner_email);
    let id = inv["id"].as_str().unwrap().to_string();

    // Nobody else answers it, and no API key does.
    for path in [
        format!("/v1/users/me/invitations/{id}/accept"),
        format!("/v1/users/me/invitations/{id}/decline"),
    ] {
        let res = call(&app, reqwest::Method::POST, &path, &stranger, None).await;
        assert_problem(res, 404, "not_found").await;
    }
    let key = json_ok(
        call(
            &app,
            reqwest::Method::POST,
            "/v1/api-keys",
            &yes,
            Some(json!({"name": "k", "scopes": ["accounts:read", "accounts:write"]})),
        )
        .await,
        201,
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_string();
    let res = reqwest::Client::new()
        .post(app.url(&format!("/v1/users/me/invitations/{id}/accept")))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_problem(res, 403, "forbidden").await;

    let joined = accept(&app, &yes, &id).await;
    assert_eq!(joined["access"], "trader");
    assert_eq!(joined["permissions"], json!(["read", "trade"]));
    let shown = get_ok(&app, &yes, &format!("/v1/trading-accounts/{a}")).await;
    assert_eq!(shown["access"], "trader");
    // Accepted once: gone from the list, and a second accept finds nothing.
    assert_eq!(
        get_ok(&app, &yes, "/v1/users/me/invitations").await["items"],
        json!([])
    );
    let res = call(
        &app,
        reqwest::Method::POST,
        &format!("/v1/users/me/invitations/{id}/accept"),
        &yes,
        None,
    )
    .await;
    assert_problem(res, 404, "not_found").await;

    let declined_id = get_ok(&app, &no, "/v1/users/me/invitations").await["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = call(
        &app,
        reqwest::Method::POST,
        &format!("/v1/users/me/invitations/{declined_id}/decline"),
        &no,
        None,
    )
    .await;
    assert_eq!(res.status().as_u16(), 204);
    let res = call(
        &app,
        reqwest::Method::GET,
        &format!("/v1/trading-accounts/{a}"),
        &no,
        None,
    )
    .await;
    assert_problem(res, 404, "not_found").await;
    let members = get_ok(&app, &owner, &format!("/v1/trading-accounts/{a}/members")).await;
    let ids: Vec<&str> = members["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [yes_id.to_string()]);
    let pending = get_ok(
        &app,
        &owner,
        &format!("/v1/trading-accounts/{a}/invitations"),
    )
    .await;
    assert_eq!(pending["items"], json!([]));

    assert_eq!(
        audit_count(&app, "membership.invited", Some(&owner_id.to_string())).await,
        2
    );
    assert_eq!(
        audit_count(&app, "membership.added", Some(&yes_id.to_string())).await,
        1
    );
    assert_eq!(
        audit_count(
            &app,
            "membership.invitation_declined",
            Some(&no_id.to_string())
        )
        .await,
        1
    );
}

#[tokio::test]
async fn an_invitation_to_an_unregistered_email_waits_for_sign_up() {
    let app = TestApp::spawn().await;
    let (_, _, owner) = app.user_with_token().await;
    let a = create_account(&app, &owner, "INV3").await;
    let email = format!(
        "later-{}@example.com",
        &Uuid::new_v4().simple().to_string()[..10]
    );
    let res = invite(&app, &owner, a, json!({"email": email, "role": "viewer"})).await;
    assert_eq!(res.status().as_u16(), 202);
    app.register(&email, crate::helpers::STRONG_PASSWORD).await;
    let token = app.login(&email, crate::helpers::STRONG_PASSWORD).await;
    let mine = get_ok(&app, &token, "/v1/users/me/invitations").await;
    let id = mine["items"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(accept(&app, &token, &id).await["access"], "viewer");
}

#[tokio::test]
async fn managers_list_and_withdraw_invitations_within_their_role() {
    let app = TestApp::spawn().await;
    let (_, _, owner) = app.user_with_token().await;
    let a = create_account(&app, &owner, "INV4").await;
    let (_, viewer_email, viewer) = app.user_with_token().await;
    let invited: Value = invite(
        &app,
        &owner,
        a,
        json!({"email": viewer_email, "role": "viewer"}),
    )
    .await
    .json()
    .await
    .unwrap();
    accept(&app, &viewer, invited["invitation"]["id"].as_str().unwrap()).await;
    let (_, guest_email, guest) = app.user_with_token().await;
    let invited: Value = invite(
        &app,
        &owner,
        a,
        json!({"email": guest_email, "role": "trader"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let id = invited["invitation"]["id"].as_str().unwrap();
    assert_eq!(invited["invitation"]["status"], "pending");

    // A viewer neither sees nor withdraws invitations.
    let res = call(
        &app,
        reqwest::Method::GET,
        &format!("/v1/trading-accounts/{a}/invitations"),
        &viewer,
        None,
    )
    .await;
    assert_problem(res, 403, "forbidden").await;
    let withdraw = format!("/v1/trading-accounts/{a}/invitations/{id}");
    let res = call(&app, reqwest::Method::DELETE, &withdraw, &viewer, None).await;
    assert_problem(res, 403, "forbidden").await;

    let res = call(&app, reqwest::Method::DELETE, &withdraw, &owner, None).await;
    assert_eq!(res.status().as_u16(), 204);
    let res = call(&app, reqwest::Method::DELETE, &withdraw, &owner, None).await;
    assert_problem(res, 404, "not_found").await;
    assert_eq!(
        get_ok(&app, &guest, "/v1/users/me/invitations").await["items"],
        json!([])
    );
    let res = call(
        &app,
        reqwest::Method::POST,
        &format!("/v1/users/me/invitations/{id}/accept"),
        &guest,
        None,
    )
    .await;
    assert_problem(res, 404, "not_found").await;
    assert_eq!(
        audit_count(&app, "membership.invitation_revoked", None).await,
        1
    );
    // The email can be invited again once the old invitation is closed.
    let res = invite(
        &app,
        &owner,
        a,
        json!({"email": guest_email, "role": "viewer"}),
    )
    .await;
    assert_eq!(res.status().as_u16(), 202);
}
