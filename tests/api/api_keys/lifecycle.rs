//! The REST lifecycle of a key: shown once, grants checked, rotation, another
//! user's key, and X-API-Key on the gateway within its grant.

use serde_json::{json, Value};
use user_service::config::Environment;
use user_service::domain::api_key::ApiKeySecret;
use user_service::proto::{VerifyApiKeyRequest, VerifyReason};
use uuid::Uuid;

use crate::helpers::{assert_problem, TestApp};

use super::{account_of, audit_rows, create_key, reason, req, revoke, send, verifier, verify};

#[tokio::test]
async fn create_shows_the_key_once_and_reads_never_show_it() {
    let app = TestApp::spawn().await;
    let (user_id, _, token) = app.user_with_token().await;
    let k = create_key(
        &app,
        &token,
        json!({"name": "ci", "scopes": ["orders:read", "market_data:read"]}),
    )
    .await;
    let key = k["key"].as_str().unwrap();
    let prefix = k["prefix"].as_str().unwrap();
    assert!(key.starts_with("sbk_dev_"), "{key}");
    assert!(key.starts_with(prefix) && prefix.len() < key.len() / 2);
    assert_eq!(k["scopes"], json!(["orders:read", "market_data:read"]));
    assert_eq!(k["allowed_ips"], json!([]));
    assert_eq!(k["trading_account_ids"], json!([]));
    assert!(k["expires_at"].is_null() && k["created_at"].is_string());

    // Stored: the prefix and a 32-byte keyed hash, never the key.
    let (stored_prefix, hash): (String, Vec<u8>) =
        sqlx::query_as("select prefix, key_hash from api_keys where id = $1::uuid")
            .bind(k["id"].as_str().unwrap())
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(stored_prefix, prefix);
    assert_eq!(hash.len(), 32);

    let id = k["id"].as_str().unwrap();
    let one: Value = send(
        &app,
        reqwest::Method::GET,
        &format!("/v1/api-keys/{id}"),
        &token,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    let list: Value = send(&app, reqwest::Method::GET, "/v1/api-keys", &token, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["id"], k["id"]);
    assert_eq!(one["prefix"], prefix);
    assert!(one["last_used_at"].is_null() && one["revoked_at"].is_null());
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["next_cursor"].is_null());
    for body in [&one, &list] {
        let text = body.to_string();
        assert!(!text.contains(key), "key leaked: {text}");
        assert!(!text.contains("hash"), "{text}");
        assert!(body.get("key").is_none());
    }

    // Audited with id and prefix only.
    let rows = audit_rows(&app, "api_key.created").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["actor_id"], user_id.to_string());
    assert_eq!(rows[0]["details"]["prefix"], prefix);
    assert!(!rows[0].to_string().contains(key));
}

#[tokio::test]
async fn create_refuses_bad_grants() {
    let app = TestApp::spawn().await;
    let (user_id, _, token) = app.user_with_token().await;
    let post = |body: Value| {
        let (app, token) = (&app, token.clone());
        async move {
            send(
                app,
                reqwest::Method::POST,
                "/v1/api-keys",
                &token,
                Some(&body),
            )
            .await
        }
    };

    let p = assert_problem(
        post(json!({"name": "x", "scopes": ["orders:read", "no:such"]})).await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "scopes[1]");
    // In the catalog but never grantable to a key.
    assert_problem(
        post(json!({"name": "x", "scopes": ["admin:users"]})).await,
        400,
        "validation_failed",
    )
    .await;
    assert_problem(
        post(json!({"name": "x", "scopes": []})).await,
        400,
        "validation_failed",
    )
    .await;
    let p = assert_problem(
        post(json!({"name": "x", "scopes": ["orders:read"], "allowed_ips": ["10.0.0.0/8", "10.0.0.300"]})).await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "allowed_ips[1]");
    let p = assert_problem(
        post(json!({"name": "x", "scopes": ["orders:read"], "expires_at": "2001-01-01T00:00:00Z"}))
            .await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "expires_at");
    assert_problem(
        post(json!({"name": "x", "scopes": ["orders:read"], "expires_at": "tomorrow"})).await,
        400,
        "validation_failed",
    )
    .await;
    let p = assert_problem(
        post(json!({"name": "x", "scopes": ["orders:read"], "admin": true})).await,
        400,
        "validation_failed",
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "admin");
    // Somebody else's account, and one that does not exist: the same answer.
    let (other, _, _) = app.user_with_token().await;
    let theirs = account_of(&app, other).await;
    for acct in [theirs, Uuid::new_v4()] {
        let p = assert_problem(
            post(json!({"name": "x", "scopes": ["orders:read"], "trading_account_ids": [acct]}))
                .await,
            400,
            "validation_failed",
        )
        .await;
        assert_eq!(p["errors"][0]["field"], "trading_account_ids[0]");
    }

    // A viewer does not hold orders:write: 403, while a scope it holds is fine.
    sqlx::query(
        "update user_roles set role_id = (select id from roles where name = 'viewer') where user_id = $1",
    )
    .bind(user_id)
    .execute(&app.db)
    .await
    .unwrap();
    assert_problem(
        post(json!({"name": "x", "scopes": ["orders:write"]})).await,
        403,
        "forbidden",
    )
    .await;
    assert_eq!(
        post(json!({"name": "x", "scopes": ["orders:read"]}))
            .await
            .status(),
        201
    );
    let n: i64 = sqlx::query_scalar("select count(*) from api_keys")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 1, "only the valid request created a key");
}

#[tokio::test]
async fn rotation_issues_a_new_key_and_kills_the_old_one() {
    let app = TestApp::spawn().await;
    let (_, _, token) = app.user_with_token().await;
    let old = create_key(
        &app,
        &token,
        json!({"name": "rot", "scopes": ["orders:read"], "allowed_ips": ["::1"],
               "rate_limit_per_minute": 100}),
    )
    .await;
    let mut client = verifier(&app).await;
    let old_key = old["key"].as_str().unwrap();
    let local = |k: &str| VerifyApiKeyRequest {
        client_ip: Some("::1".into()),
        ..req(k)
    };
    assert!(verify(&mut client, local(old_key)).await.valid);

    let res = send(
        &app,
        reqwest::Method::POST,
        &format!("/v1/api-keys/{}/rotate", old["id"].as_str().unwrap()),
        &token,
        None,
    )
    .await;
    assert_eq!(res.status().as_u16(), 201);
    let new: Value = res.json().await.unwrap();
    assert_ne!(new["id"], old["id"]);
    assert_ne!(new["key"], old["key"]);
    for f in [
        "name",
        "scopes",
        "allowed_ips",
        "trading_account_ids",
        "rate_limit_per_minute",
    ] {
        assert_eq!(new[f], old[f], "{f}");
    }
    let new_key = new["key"].as_str().unwrap();
    assert!(new_key.starts_with(new["prefix"].as_str().unwrap()));

    assert_eq!(
        reason(&verify(&mut client, local(old_key)).await),
        VerifyReason::Revoked
    );
    assert!(verify(&mut client, local(new_key)).await.valid);
    let shown: Value = send(
        &app,
        reqwest::Method::GET,
        &format!("/v1/api-keys/{}", old["id"].as_str().unwrap()),
        &token,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(shown["revoked_at"].is_string());
    // A revoked key cannot be rotated again.
    let res = send(
        &app,
        reqwest::Method::POST,
        &format!("/v1/api-keys/{}/rotate", old["id"].as_str().unwrap()),
        &token,
        None,
    )
    .await;
    assert_problem(res, 409, "conflict").await;

    let rows = audit_rows(&app, "api_key.rotated").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["details"]["old_key_id"], old["id"]);
    assert_eq!(rows[0]["details"]["prefix"], new["prefix"]);
    assert!(!rows[0].to_string().contains(new_key) && !rows[0].to_string().contains(old_key));
}

#[tokio::test]
async fn another_users_key_answers_404() {
    let app = TestApp::spawn().await;
    let (_, _, alice) = app.user_with_token().await;
    let (_, _, bob) = app.user_with_token().await;
    let k = create_key(
        &app,
        &alice,
        json!({"name": "k", "scopes": ["orders:read"]}),
    )
    .await;
    let id = k["id"].as_str().unwrap();
    for (m, path) in [
        (reqwest::Method::GET, format!("/v1/api-keys/{id}")),
        (reqwest::Method::DELETE, format!("/v1/api-keys/{id}")),
        (reqwest::Method::POST, format!("/v1/api-keys/{id}/rotate")),
        (reqwest::Method::GET, format!("/v1/api-keys/{id}/usage")),
        (
            reqwest::Method::GET,
            format!("/v1/api-keys/{}", Uuid::new_v4()),
        ),
        (reqwest::Method::GET, "/v1/api-keys/not-a-uuid".to_string()),
    ] {
        assert_problem(send(&app, m, &path, &bob, None).await, 404, "not_found").await;
    }
    let list: Value = send(&app, reqwest::Method::GET, "/v1/api-keys", &bob, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], json!([]));
    // Still alive after Bob's DELETE.
    let mut client = verifier(&app).await;
    assert!(
        verify(&mut client, req(k["key"].as_str().unwrap()))
            .await
            .valid
    );
}

#[tokio::test]
async fn x_api_key_authenticates_the_gateway_within_its_grant() {
    let app = TestApp::spawn().await;
    let (user_id, email, token) = app.user_with_token().await;
    let k = create_key(
        &app,
        &token,
        json!({"name": "k", "scopes": ["orders:read"]}),
    )
    .await;
    let key = k["key"].as_str().unwrap();
    let with_key = |path: &str, key: &str| {
        reqwest::Client::new()
            .get(app.url(path))
            .header("x-api-key", key)
            .send()
    };
    let res = with_key("/v1/users/me", key).await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let me: Value = res.json().await.unwrap();
    assert_eq!(me["id"], user_id.to_string());
    assert_eq!(me["email"], email);

    for bad in [
        "sbk_dev_nope".to_string(),
        ApiKeySecret::generate(Environment::Development)
            .expose()
            .to_string(),
        ApiKeySecret::generate(Environment::Staging)
            .expose()
            .to_string(),
    ] {
        assert_problem(
            with_key("/v1/users/me", &bad).await.unwrap(),
            401,
            "invalid_token",
        )
        .await;
    }
    // A key cannot manage keys, whatever its scopes.
    let res = reqwest::Client::new()
        .post(app.url("/v1/api-keys"))
        .header("x-api-key", key)
        .json(&json!({"name": "child", "scopes": ["orders:read"]}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 403, "forbidden").await;
    assert_problem(
        with_key("/v1/api-keys", key).await.unwrap(),
        403,
        "forbidden",
    )
    .await;

    // Revoked: refused at once.
    revoke(&app, &token, k["id"].as_str().unwrap()).await;
    assert_problem(
        with_key("/v1/users/me", key).await.unwrap(),
        401,
        "invalid_token",
    )
    .await;
}
