//! Service tokens, gRPC scopes, access tokens refused after logout (here and on
//! another replica), tampered tokens and signing-key rotation.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tonic::Code;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::user_service_client::UserServiceClient;
use user_service::proto::{GetUserRequest, VerifyReason, VerifyTokenRequest};

use crate::helpers::{assert_problem, get_bearer, logout_bearer, test_vars, TestApp};

use super::audit_count;

#[tokio::test]
async fn service_token_by_form_or_json_and_invalid_client() {
    let app = TestApp::spawn().await;
    let (client_id, secret) = app.service_client(&["auth:verify", "users:read"]).await;
    let res = reqwest::Client::new()
        .post(app.url("/v1/auth/token"))
        .json(&json!({"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    assert_eq!(body["scope"], "auth:verify users:read");
    // The secret is stored only as its SHA-256 (it is 256 random bits).
    let hash: String =
        sqlx::query_scalar("select secret_hash from service_clients where client_id = $1")
            .bind(&client_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(hash.starts_with("$sha256$") && !hash.contains(&secret));
    assert_eq!(hash.len(), "$sha256$".len() + 64);

    // A secret stored as argon2id (before SHA-256 storage) still works.
    let legacy = user_service::crypto::password::hash_on_this_thread(&secrecy::SecretString::from(
        secret.clone(),
    ))
    .unwrap();
    sqlx::query("update service_clients set secret_hash = $2 where client_id = $1")
        .bind(&client_id)
        .bind(&legacy)
        .execute(&app.db)
        .await
        .unwrap();
    for (s, status) in [(secret.as_str(), 200), ("wrong-secret", 401)] {
        let res = reqwest::Client::new()
            .post(app.url("/v1/auth/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id.as_str()),
                ("client_secret", s),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "legacy argon2 secret, {s}");
    }
    // Its first good use re-stored it in the fast form.
    let upgraded: String =
        sqlx::query_scalar("select secret_hash from service_clients where client_id = $1")
            .bind(&client_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(upgraded, hash);

    for (id, s) in [
        (client_id.as_str(), "wrong-secret"),
        ("no-such-client", secret.as_str()),
        ("backend", "anything"), // seeded without a secret
    ] {
        let res = reqwest::Client::new()
            .post(app.url("/v1/auth/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", id),
                ("client_secret", s),
            ])
            .send()
            .await
            .unwrap();
        assert_problem(res, 401, "invalid_client").await;
    }
    let res = reqwest::Client::new()
        .post(app.url("/v1/auth/token"))
        .form(&[
            ("grant_type", "password"),
            ("client_id", &client_id),
            ("client_secret", &secret),
        ])
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "validation_failed").await;
}

#[tokio::test]
async fn grpc_requires_a_service_token_with_the_method_scope() {
    let app = TestApp::spawn().await;
    let (user_id, _, access) = app.user_with_token().await;
    let req = || GetUserRequest {
        user_id: user_id.to_string(),
    };

    // No token.
    let err = UserServiceClient::new(app.channel().await)
        .get_user(req())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // A user's access token is not a service token.
    let err = UserServiceClient::new(app.grpc_with_token(&access).await)
        .get_user(req())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // A service token without users:read.
    let weak = app.service_token(&["auth:verify"]).await;
    let err = UserServiceClient::new(app.grpc_with_token(&weak).await)
        .get_user(req())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let good = app.service_token(&["users:read"]).await;
    let mut client = UserServiceClient::new(app.grpc_with_token(&good).await);
    // Twice: the second call is served from the verified-token cache.
    for _ in 0..2 {
        let user = client
            .get_user(req())
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert_eq!(user.id, user_id.to_string());
        assert_eq!(user.roles, vec!["user".to_string()]);
        assert_eq!(user.status, "active");
    }
    let err = client
        .get_user(GetUserRequest {
            user_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn a_cached_service_token_is_refused_once_it_expires() {
    // Verified service tokens are cached without a timer of their own: a hit
    // must still honour `exp`, or a cached token would outlive it.
    let app = TestApp::spawn_with(|v| {
        v.insert("SERVICE_TOKEN_TTL_SECONDS".into(), "1".into());
    })
    .await;
    let (user_id, _, _) = app.user_with_token().await;
    let token = app.service_token(&["users:read"]).await;
    let mut client = UserServiceClient::new(app.grpc_with_token(&token).await);
    let req = || GetUserRequest {
        user_id: user_id.to_string(),
    };
    client.get_user(req()).await.unwrap();
    client.get_user(req()).await.unwrap();
    // Past `exp` and the verifier's clock leeway.
    let leeway = user_service::crypto::jwt::LEEWAY_SECS;
    tokio::time::sleep(Duration::from_secs(1 + leeway + 1)).await;
    let err = client.get_user(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn token_is_refused_right_after_logout_on_rest_and_verify_token() {
    let app = TestApp::spawn().await;
    let (user_id, _, access) = app.user_with_token().await;
    let svc = app.service_token(&["auth:verify"]).await;
    let mut grpc = AuthServiceClient::new(app.grpc_with_token(&svc).await);

    let ok = grpc
        .verify_token(VerifyTokenRequest {
            token: access.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.valid);
    assert_eq!(ok.user.unwrap().id, user_id.to_string());
    assert!(!ok.session_id.is_empty());
    assert!(ok.expires_at.is_some());

    let res = logout_bearer(&app, &access).await;
    assert_eq!(res.status(), 204);
    assert_eq!(audit_count(&app, "auth.logout").await, 1);

    let res = get_bearer(&app, "/v1/users/me", &access).await;
    assert_problem(res, 401, "invalid_token").await;
    let after = grpc
        .verify_token(VerifyTokenRequest {
            token: access.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!after.valid);
    assert_eq!(after.reason, VerifyReason::SessionRevoked as i32);
    assert!(after.user.is_none());

    // Garbage is an answer, not an RPC error.
    let garbage = grpc
        .verify_token(VerifyTokenRequest {
            token: "nope".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!garbage.valid);
    assert_eq!(garbage.reason, VerifyReason::InvalidToken as i32);
}

#[tokio::test]
async fn logout_is_seen_by_another_replica_at_once() {
    let first = TestApp::spawn().await;
    let (_, _, access) = first.user_with_token().await;
    // A second replica on the same database and Redis prefix.
    let mut vars = test_vars(&first.database_url);
    vars.insert(
        "REDIS_KEY_PREFIX".into(),
        first.settings.redis_key_prefix.clone(),
    );
    let second = TestApp::spawn_vars(vars).await;
    // The second replica has cached the session as live.
    assert_eq!(
        get_bearer(&second, "/v1/users/me", &access).await.status(),
        200
    );
    let res = logout_bearer(&first, &access).await;
    assert_eq!(res.status(), 204);
    let res = get_bearer(&second, "/v1/users/me", &access).await;
    assert_problem(res, 401, "invalid_token").await;
}

// ---- JWT tampering ----

fn dev_private_pem() -> String {
    test_vars("postgres://unused")["JWT_PRIVATE_KEY"].clone()
}

fn b64json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn payload(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn header(token: &str) -> Value {
    let part = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// Signs `claims` with the real development key under `header`.
fn sign_ed(header: Header, claims: &Value) -> String {
    let key = EncodingKey::from_ed_pem(dev_private_pem().as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn ed_header(kid: &str) -> Header {
    Header {
        kid: Some(kid.to_string()),
        ..Header::new(Algorithm::EdDSA)
    }
}

#[tokio::test]
async fn tampered_tokens_are_refused() {
    let app = TestApp::spawn().await;
    let (_, _, access) = app.user_with_token().await;
    let claims = payload(&access);
    let kid = header(&access)["kid"].as_str().unwrap().to_string();
    let now = chrono::Utc::now().timestamp();

    // Control: our own re-signing of the untouched claims is accepted, so each
    // refusal below is about the one thing changed.
    let control = sign_ed(ed_header(&kid), &claims);
    assert_eq!(
        get_bearer(&app, "/v1/users/me", &control).await.status(),
        200
    );

    let jwks: Value = app
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .unwrap();
    let x = jwks["keys"][0]["x"].as_str().unwrap().to_string();
    assert_eq!(jwks["keys"][0]["kid"], kid);
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
    assert_eq!(jwks["keys"][0]["kty"], "OKP");

    let with = |k: &str, v: Value| {
        let mut c = claims.clone();
        c[k] = v;
        c
    };
    let mut cases: Vec<(&str, String)> = vec![
        // alg none, no signature.
        (
            "alg none",
            format!(
                "{}.{}.",
                b64json(&json!({"alg": "none", "typ": "JWT", "kid": kid})),
                b64json(&claims)
            ),
        ),
        // HS256 "signed" with the public key as the HMAC secret.
        ("hs256 with public key", {
            let h = Header {
                kid: Some(kid.clone()),
                ..Header::new(Algorithm::HS256)
            };
            let mut out = Vec::new();
            for secret in [x.as_bytes().to_vec(), URL_SAFE_NO_PAD.decode(&x).unwrap()] {
                out.push(
                    jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(&secret)).unwrap(),
                );
            }
            out.join("|")
        }),
        ("unknown kid", sign_ed(ed_header("not-our-key"), &claims)),
        ("no kid", sign_ed(Header::new(Algorithm::EdDSA), &claims)),
        ("jku header", {
            let mut h = ed_header(&kid);
            h.jku = Some("https://attacker.example/jwks.json".into());
            sign_ed(h, &claims)
        }),
        ("x5u header", {
            let mut h = ed_header(&kid);
            h.x5u = Some("https://attacker.example/cert.pem".into());
            sign_ed(h, &claims)
        }),
        (
            "expired",
            sign_ed(ed_header(&kid), &with("exp", json!(now - 120))),
        ),
        (
            "not yet valid",
            sign_ed(ed_header(&kid), &with("nbf", json!(now + 600))),
        ),
        (
            "wrong audience",
            sign_ed(ed_header(&kid), &with("aud", json!("someone-else"))),
        ),
        (
            "wrong issuer",
            sign_ed(ed_header(&kid), &with("iss", json!("https://evil"))),
        ),
        (
            "wrong type",
            sign_ed(ed_header(&kid), &with("token_type", json!("service"))),
        ),
        ("no exp", {
            let mut c = claims.clone();
            c.as_object_mut().unwrap().remove("exp");
            sign_ed(ed_header(&kid), &c)
        }),
        ("signature of another token", {
            let parts: Vec<&str> = access.split('.').collect();
            let other = with("sub", json!(uuid::Uuid::new_v4().to_string()));
            format!("{}.{}.{}", parts[0], b64json(&other), parts[2])
        }),
    ];
    // A key we do not know, with our kid.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    cases.push((
        "foreign key with our kid",
        jsonwebtoken::encode(
            &ed_header(&kid),
            &claims,
            &EncodingKey::from_ed_der(pkcs8.as_ref()),
        )
        .unwrap(),
    ));

    let svc = app.service_token(&["auth:verify"]).await;
    let mut grpc = AuthServiceClient::new(app.grpc_with_token(&svc).await);
    for (name, tokens) in cases {
        for token in tokens.split('|') {
            let res = get_bearer(&app, "/v1/users/me", token).await;
            assert_eq!(res.status(), 401, "{name} accepted by the gateway");
            let v = grpc
                .verify_token(VerifyTokenRequest {
                    token: token.to_string(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(!v.valid, "{name} accepted by VerifyToken");
            let want = if name == "expired" {
                VerifyReason::Expired
            } else {
                VerifyReason::InvalidToken
            };
            assert_eq!(v.reason, want as i32, "{name}");
        }
    }

    // A service token is not an access token, nor the other way round.
    let res = get_bearer(&app, "/v1/users/me", &svc).await;
    assert_problem(res, 401, "invalid_token").await;
}

#[tokio::test]
async fn jwks_publishes_the_previous_key_during_rotation() {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    use ring::signature::KeyPair as _;
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(pair.public_key().as_ref());
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    let app = TestApp::spawn_with(|v| {
        v.insert("JWT_PREVIOUS_PUBLIC_KEYS".into(), pem);
    })
    .await;
    let res = app.get("/.well-known/jwks.json").await;
    assert_eq!(res.status(), 200);
    let jwks: Value = res.json().await.unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(
        keys[1]["x"],
        URL_SAFE_NO_PAD.encode(pair.public_key().as_ref())
    );
    assert_ne!(keys[0]["kid"], keys[1]["kid"]);
    assert!(
        keys.iter().all(|k| k.get("d").is_none()),
        "private material published"
    );

    // A token signed by the previous key (e.g. before rotation) still verifies.
    let (_, _, access) = app.user_with_token().await;
    let claims = payload(&access);
    let old = jsonwebtoken::encode(
        &ed_header(keys[1]["kid"].as_str().unwrap()),
        &claims,
        &EncodingKey::from_ed_der(pkcs8.as_ref()),
    )
    .unwrap();
    assert_eq!(get_bearer(&app, "/v1/users/me", &old).await.status(), 200);
    let _ = Duration::from_secs(0);
}
