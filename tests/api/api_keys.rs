//! API keys (issue 4): the REST lifecycle, VerifyApiKey's every reason, the
//! cross-replica revocation, the usage buffer across a graceful shutdown, and
//! floods of made-up keys that must not reach PostgreSQL.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tonic::Code;
use user_service::config::Environment;
use user_service::domain::api_key::ApiKeySecret;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::{VerifyApiKeyRequest, VerifyApiKeyResponse, VerifyReason};
use uuid::Uuid;

use crate::helpers::{assert_problem, fresh_database, test_vars, AuthedChannel, TestApp};

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
async fn verify_answers_valid_with_user_key_and_accounts() {
    let app = TestApp::spawn().await;
    let (user_id, email, token) = app.user_with_token().await;
    let acct = account_of(&app, user_id).await;
    let other_acct = account_of(&app, user_id).await;
    let k = create_key(
        &app,
        &token,
        json!({"name": "bot", "scopes": ["orders:read", "orders:write"],
               "trading_account_ids": [acct], "expires_at": "2999-01-01T00:00:00Z"}),
    )
    .await;
    let key = k["key"].as_str().unwrap();
    let mut client = verifier(&app).await;

    let r = verify(
        &mut client,
        VerifyApiKeyRequest {
            required_scopes: vec!["orders:write".into()],
            trading_account_id: Some(acct.to_string()),
            ..req(key)
        },
    )
    .await;
    assert!(r.valid, "{r:?}");
    assert_eq!(reason(&r), VerifyReason::Unspecified);
    let user = r.user.unwrap();
    assert_eq!(user.id, user_id.to_string());
    assert_eq!(user.email, email);
    assert_eq!(user.roles, vec!["user".to_string()]);
    let kinfo = r.key.unwrap();
    assert_eq!(kinfo.id, k["id"].as_str().unwrap());
    assert_eq!(kinfo.prefix, k["prefix"].as_str().unwrap());
    assert_eq!(
        kinfo.scopes,
        vec!["orders:read".to_string(), "orders:write".to_string()]
    );
    assert!(kinfo.expires_at.is_some());
    // Only the account the key is bound to, with the owner's access.
    assert_eq!(r.accounts.len(), 1);
    assert_eq!(r.accounts[0].account.as_ref().unwrap().id, acct.to_string());
    assert_eq!(r.accounts[0].access, "owner");

    let r = verify(
        &mut client,
        VerifyApiKeyRequest {
            trading_account_id: Some(other_acct.to_string()),
            ..req(key)
        },
    )
    .await;
    assert!(!r.valid);
    assert_eq!(reason(&r), VerifyReason::AccountNotAllowed);
    assert!(r.user.is_none() && r.key.is_none());

    let r = verify(
        &mut client,
        VerifyApiKeyRequest {
            required_scopes: vec!["orders:read".into(), "market_data:read".into()],
            ..req(key)
        },
    )
    .await;
    assert_eq!(reason(&r), VerifyReason::InsufficientScope);

    // Malformed request fields are the caller's bug, not a key verdict.
    let e = client
        .verify_api_key(VerifyApiKeyRequest {
            client_ip: Some("not-an-ip".into()),
            ..req(key)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // The first verification missed the cache and the later ones hit it; operators
    // see both.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    for name in ["api_key_cache_misses_total ", "api_key_cache_hits_total "] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test]
async fn verify_gives_each_refusal_its_reason() {
    let app = TestApp::spawn().await;
    let (user_id, _, token) = app.user_with_token().await;
    let mut client = verifier(&app).await;
    let body = json!({"name": "k", "scopes": ["orders:read"]});

    // Offline verdicts.
    let good = create_key(&app, &token, body.clone()).await["key"]
        .as_str()
        .unwrap()
        .to_string();
    let mut typo = good.clone().into_bytes();
    typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    for (k, want) in [
        ("".to_string(), VerifyReason::Malformed),
        ("sbk_dev_short".to_string(), VerifyReason::Malformed),
        (typo, VerifyReason::Malformed),
        (
            ApiKeySecret::generate(Environment::Production)
                .expose()
                .to_string(),
            VerifyReason::WrongEnvironment,
        ),
        (
            ApiKeySecret::generate(Environment::Development)
                .expose()
                .to_string(),
            VerifyReason::NotFound,
        ),
    ] {
        let r = verify(&mut client, req(&k)).await;
        assert!(!r.valid);
        assert_eq!(reason(&r), want, "{k}");
    }

    // Expired: moved into the past before it was ever verified (so not cached).
    let expired = create_key(&app, &token, body.clone()).await;
    sqlx::query("update api_keys set expires_at = now() - interval '1 second' where id = $1::uuid")
        .bind(expired["id"].as_str().unwrap())
        .execute(&app.db)
        .await
        .unwrap();
    let r = verify(&mut client, req(expired["key"].as_str().unwrap())).await;
    assert_eq!(reason(&r), VerifyReason::Expired);

    // Revoked.
    let revoked = create_key(&app, &token, body.clone()).await;
    assert!(
        verify(&mut client, req(revoked["key"].as_str().unwrap()))
            .await
            .valid
    );
    revoke(&app, &token, revoked["id"].as_str().unwrap()).await;
    let r = verify(&mut client, req(revoked["key"].as_str().unwrap())).await;
    assert_eq!(reason(&r), VerifyReason::Revoked);

    // Rate limited: 2 a minute, the third is refused.
    let limited = create_key(
        &app,
        &token,
        json!({"name": "slow", "scopes": ["orders:read"], "rate_limit_per_minute": 2}),
    )
    .await;
    let lk = limited["key"].as_str().unwrap();
    assert!(verify(&mut client, req(lk)).await.valid);
    assert!(verify(&mut client, req(lk)).await.valid);
    assert_eq!(
        reason(&verify(&mut client, req(lk)).await),
        VerifyReason::RateLimited
    );

    // IP not allowed, insufficient scope, account not allowed.
    let bound = create_key(
        &app,
        &token,
        json!({"name": "ip", "scopes": ["orders:read"], "allowed_ips": ["192.0.2.0/24"]}),
    )
    .await;
    let r = verify(
        &mut client,
        VerifyApiKeyRequest {
            client_ip: Some("198.51.100.1".into()),
            ..req(bound["key"].as_str().unwrap())
        },
    )
    .await;
    assert_eq!(reason(&r), VerifyReason::IpNotAllowed);
    let r = verify(
        &mut client,
        VerifyApiKeyRequest {
            required_scopes: vec!["orders:write".into()],
            ..req(&good)
        },
    )
    .await;
    assert_eq!(reason(&r), VerifyReason::InsufficientScope);
    let r = verify(
        &mut client,
        VerifyApiKeyRequest {
            trading_account_id: Some(Uuid::new_v4().to_string()),
            ..req(&good)
        },
    )
    .await;
    assert_eq!(reason(&r), VerifyReason::AccountNotAllowed);

    // User disabled: the good key is cached as valid; the user-changed message
    // (what disabling a user publishes) must drop it.
    assert!(verify(&mut client, req(&good)).await.valid);
    sqlx::query("update users set status = 'disabled' where id = $1")
        .bind(user_id)
        .execute(&app.db)
        .await
        .unwrap();
    app.services.invalidation.user_changed(user_id).await;
    let r = verify(&mut client, req(&good)).await;
    assert_eq!(reason(&r), VerifyReason::UserDisabled);
}

#[tokio::test]
async fn verify_requires_a_service_token_with_auth_verify() {
    let app = TestApp::spawn().await;
    let (_, _, token) = app.user_with_token().await;
    let k = create_key(
        &app,
        &token,
        json!({"name": "k", "scopes": ["orders:read"]}),
    )
    .await;
    let key = k["key"].as_str().unwrap();

    let mut anon = AuthServiceClient::new(app.channel().await);
    let e = anon.verify_api_key(req(key)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let weak = app.service_token(&["users:read"]).await;
    let mut weak = AuthServiceClient::new(app.grpc_with_token(&weak).await);
    let e = weak.verify_api_key(req(key)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // A user's access token is not a service token.
    let mut user = AuthServiceClient::new(app.grpc_with_token(&token).await);
    let e = user.verify_api_key(req(key)).await.unwrap_err();
    assert!(matches!(
        e.code(),
        Code::Unauthenticated | Code::PermissionDenied
    ));
}

#[tokio::test]
async fn ip_allow_list_takes_ipv4_and_ipv6_cidrs() {
    let app = TestApp::spawn().await;
    let (_, _, token) = app.user_with_token().await;
    let k = create_key(
        &app,
        &token,
        json!({"name": "ips", "scopes": ["orders:read"],
               "allowed_ips": ["10.0.0.0/8", "203.0.113.9", "2001:db8::/32"]}),
    )
    .await;
    assert_eq!(
        k["allowed_ips"],
        json!(["10.0.0.0/8", "203.0.113.9/32", "2001:db8::/32"])
    );
    let key = k["key"].as_str().unwrap();
    let mut client = verifier(&app).await;
    for (ip, ok) in [
        ("10.1.2.3", true),
        ("203.0.113.9", true),
        ("203.0.113.10", false),
        ("11.0.0.1", false),
        ("2001:db8:5::1", true),
        ("2001:db9::1", false),
        ("::ffff:10.9.9.9", true),
    ] {
        let r = verify(
            &mut client,
            VerifyApiKeyRequest {
                client_ip: Some(ip.into()),
                ..req(key)
            },
        )
        .await;
        assert_eq!(r.valid, ok, "{ip}");
        if !ok {
            assert_eq!(reason(&r), VerifyReason::IpNotAllowed);
        }
    }
    // Bound to addresses but verified without one: refused.
    let r = verify(&mut client, req(key)).await;
    assert_eq!(reason(&r), VerifyReason::IpNotAllowed);
}

#[tokio::test]
async fn revocation_reaches_another_replica_within_a_second() {
    let vars = test_vars(&fresh_database().await);
    let a = TestApp::spawn_vars(vars.clone()).await;
    let b = TestApp::spawn_vars(vars).await;
    let (_, _, token) = a.user_with_token().await;
    let k = create_key(&a, &token, json!({"name": "k", "scopes": ["orders:read"]})).await;
    let key = k["key"].as_str().unwrap();
    let mut on_b = verifier(&b).await;
    // B has it cached as valid.
    assert!(verify(&mut on_b, req(key)).await.valid);
    assert!(verify(&mut on_b, req(key)).await.valid);
    let lookups = b.services.api_keys.db_lookups();

    revoke(&a, &token, k["id"].as_str().unwrap()).await;
    let revoked_at = Instant::now();
    loop {
        let r = verify(&mut on_b, req(key)).await;
        if !r.valid {
            assert_eq!(reason(&r), VerifyReason::Revoked);
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "replica B still accepts the revoked key after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    // B learned it from the message (and reloaded), not from its TTL.
    assert!(b.services.api_keys.db_lookups() > lookups);
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

#[tokio::test]
async fn usage_is_flushed_on_graceful_shutdown_and_paginates() {
    // A flush interval far beyond the test: only the shutdown flush writes.
    let mut app = TestApp::spawn_with(|v| {
        v.insert("USAGE_LOG_FLUSH_INTERVAL_MS".into(), "600000".into());
    })
    .await;
    let (_, _, token) = app.user_with_token().await;
    let k = create_key(
        &app,
        &token,
        json!({"name": "k", "scopes": ["orders:read"]}),
    )
    .await;
    let r = create_key(
        &app,
        &token,
        json!({"name": "r", "scopes": ["orders:read"]}),
    )
    .await;
    let id = k["id"].as_str().unwrap().to_string();
    let mut client = verifier(&app).await;
    for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
        let r = verify(
            &mut client,
            VerifyApiKeyRequest {
                client_ip: Some(ip.into()),
                ..req(k["key"].as_str().unwrap())
            },
        )
        .await;
        assert!(r.valid);
    }
    assert_eq!(
        reason(
            &verify(
                &mut client,
                VerifyApiKeyRequest {
                    required_scopes: vec!["orders:write".into()],
                    ..req(k["key"].as_str().unwrap())
                }
            )
            .await
        ),
        VerifyReason::InsufficientScope
    );
    revoke(&app, &token, r["id"].as_str().unwrap()).await;
    verify(&mut client, req(r["key"].as_str().unwrap())).await;
    verify(&mut client, req(r["key"].as_str().unwrap())).await;
    let before: i64 = sqlx::query_scalar("select count(*) from api_key_usage_logs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(before, 0, "nothing is written per request");

    app.stop().await.unwrap();

    let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "select result, ip, operation from api_key_usage_logs
         where api_key_id = $1::uuid order by used_at, id",
    )
    .bind(&id)
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0].0, "ok");
    assert_eq!(rows[0].1.as_deref(), Some("192.0.2.1"));
    assert_eq!(rows[0].2, "grpc:VerifyApiKey");
    assert_eq!(rows[3].0, "insufficient_scope");
    let last_used: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select last_used_at from api_keys where id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(last_used.is_some());
    // Every use of the revoked key is audited, with id and prefix only; identical
    // uses within one flush window share a row that counts them.
    let uses = audit_rows(&app, "api_key.revoked_used").await;
    let counted: i64 = uses
        .iter()
        .map(|u| u["details"]["uses"].as_i64().unwrap())
        .sum();
    assert_eq!(counted, 2, "{uses:?}");
    assert_eq!(uses[0]["details"]["prefix"], r["prefix"]);
    assert!(!uses[0].to_string().contains(r["key"].as_str().unwrap()));

    // Read back through a fresh replica: newest first, paginated.
    let vars = {
        let mut v = test_vars(&app.database_url);
        v.insert("USAGE_LOG_FLUSH_INTERVAL_MS".into(), "600000".into());
        v
    };
    let app2 = TestApp::spawn_vars(vars).await;
    let page1: Value = send(
        &app2,
        reqwest::Method::GET,
        &format!("/v1/api-keys/{id}/usage?limit=3"),
        &token,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    let items = page1["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["result"], "insufficient_scope");
    assert_eq!(items[2]["ip"], "192.0.2.2");
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2: Value = send(
        &app2,
        reqwest::Method::GET,
        &format!("/v1/api-keys/{id}/usage?limit=3&cursor={cursor}"),
        &token,
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert_eq!(page2["items"][0]["ip"], "192.0.2.1");
    assert!(page2["next_cursor"].is_null());
    for k in ["used_at", "ip", "operation", "result", "count"] {
        assert!(page2["items"][0].get(k).is_some(), "{k}");
    }
    assert_eq!(page2["items"][0]["count"], 1);
}

#[tokio::test]
async fn floods_of_made_up_keys_do_not_reach_the_database() {
    let app = TestApp::spawn().await;
    let mut client = verifier(&app).await;
    let lookups = || app.services.api_keys.db_lookups();
    assert_eq!(lookups(), 0);

    // Random strings, and keys with a broken checksum: judged offline.
    let real = ApiKeySecret::generate(Environment::Development)
        .expose()
        .to_string();
    for i in 0..300 {
        let mut k = real.clone().into_bytes();
        let pos = 8 + (i % 40);
        k[pos] = if k[pos] == b'x' { b'y' } else { b'x' };
        let k = String::from_utf8(k).unwrap();
        assert_eq!(
            reason(&verify(&mut client, req(&k)).await),
            VerifyReason::Malformed
        );
        let junk = format!("sbk_dev_{}", Uuid::new_v4().simple());
        assert_eq!(
            reason(&verify(&mut client, req(&junk)).await),
            VerifyReason::Malformed
        );
    }
    assert_eq!(lookups(), 0, "malformed keys reached PostgreSQL");

    // One well-formed unknown key hammered: one lookup, then the negative cache.
    let unknown = ApiKeySecret::generate(Environment::Development)
        .expose()
        .to_string();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = client.clone();
        let k = unknown.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let r = c.verify_api_key(req(&k)).await.unwrap().into_inner();
                assert_eq!(r.reason, VerifyReason::NotFound as i32);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        lookups(),
        1,
        "repeated unknown key reached PostgreSQL more than once"
    );

    // Distinct well-formed keys each cost exactly one lookup (the checksum is
    // public, so only the miss cache and the bounded miss concurrency protect).
    for _ in 0..20 {
        let k = ApiKeySecret::generate(Environment::Development)
            .expose()
            .to_string();
        verify(&mut client, req(&k)).await;
        verify(&mut client, req(&k)).await;
    }
    assert_eq!(lookups(), 21);
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

#[tokio::test]
async fn a_redis_reconnect_drops_the_whole_cache() {
    let Some(redis) = PrivateRedis::start().await else {
        eprintln!("SKIPPED a_redis_reconnect_drops_the_whole_cache: no redis-server binary");
        return;
    };
    let app = TestApp::spawn_with(|v| {
        v.insert(
            "REDIS_URL".into(),
            format!("redis://127.0.0.1:{}/0", redis.port),
        );
    })
    .await;
    let (_, _, token) = app.user_with_token().await;
    let k = create_key(
        &app,
        &token,
        json!({"name": "k", "scopes": ["orders:read"]}),
    )
    .await;
    let key = k["key"].as_str().unwrap();
    let mut client = verifier(&app).await;
    assert!(verify(&mut client, req(key)).await.valid);

    // A revocation whose message this replica never gets (written behind the
    // service's back, with triggers off so no NOTIFY goes out either): the
    // cached answer stands.
    crate::token_cache::without_triggers(
        &app.db,
        "update api_keys set revoked_at = now() where id = $1::uuid",
        k["id"].as_str().unwrap(),
    )
    .await;
    assert!(verify(&mut client, req(key)).await.valid);

    // The subscription drops and reconnects: messages may have been missed, so the
    // replica forgets everything and asks PostgreSQL again.
    redis.kill_subscribers().await;
    let cut = Instant::now();
    loop {
        let r = verify(&mut client, req(key)).await;
        if !r.valid {
            assert_eq!(reason(&r), VerifyReason::Revoked);
            break;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(5),
            "cache survived a Redis reconnect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
