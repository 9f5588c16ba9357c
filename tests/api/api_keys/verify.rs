//! VerifyApiKey: a valid answer, every refusal reason, the service scope, IP
//! allow-lists, and revocation reaching another replica.

use std::time::{Duration, Instant};

use serde_json::json;
use tonic::Code;
use user_service::config::Environment;
use user_service::domain::api_key::ApiKeySecret;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::{VerifyApiKeyRequest, VerifyReason};
use uuid::Uuid;

use crate::helpers::{fresh_database, test_vars, TestApp};

use super::{account_of, create_key, reason, req, revoke, verifier, verify};

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
