//! Users, login, tokens, sessions and service clients (issue 3), through the real
//! HTTP and gRPC stacks against PostgreSQL and Redis.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tonic::Code;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::user_service_client::UserServiceClient;
use user_service::proto::{GetUserRequest, VerifyReason, VerifyTokenRequest};

use crate::helpers::{
    assert_problem, get_bearer, login_raw, logout_bearer, test_vars, TestApp, STRONG_PASSWORD,
};

fn email() -> String {
    format!(
        "u{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

async fn audit_count(app: &TestApp, action: &str) -> i64 {
    sqlx::query_scalar("select count(*) from audit_logs where action = $1")
        .bind(action)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn register_login_and_me() {
    let app = TestApp::spawn().await;
    let e = email();
    let user = app.register(&e.to_uppercase(), STRONG_PASSWORD).await;
    // Stored normalised; a new user is active with role user.
    assert_eq!(user["email"], e);
    assert_eq!(user["roles"], json!(["user"]));
    assert_eq!(user["status"], "active");
    assert!(user["id"].as_str().unwrap().parse::<uuid::Uuid>().is_ok());
    assert!(user["created_at"].is_string());
    assert!(user.get("password_hash").is_none());

    // The same mailbox in another case is a conflict.
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": format!("  {}", e.to_uppercase()), "password": STRONG_PASSWORD, "full_name": "X"}),
        )
        .await;
    assert_problem(res, 409, "conflict").await;

    // Login matches case-insensitively.
    let res = login_raw(&app, &e.to_uppercase(), STRONG_PASSWORD).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["user"]["id"], user["id"]);
    assert!(body["refresh_token"].as_str().unwrap().len() >= 43);

    let me = get_bearer(&app, "/v1/users/me", body["access_token"].as_str().unwrap()).await;
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.unwrap();
    assert_eq!(me, user);

    // The password is stored as argon2id with the OWASP parameters.
    let hash: String = sqlx::query_scalar("select password_hash from users where email = $1")
        .bind(&e)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    assert_eq!(audit_count(&app, "auth.register").await, 1);
    assert_eq!(audit_count(&app, "auth.login.succeeded").await, 1);
    // No secret in any audit row.
    let rows: Vec<String> =
        sqlx::query_scalar("select details::text || coalesce(user_agent,'') from audit_logs")
            .fetch_all(&app.db)
            .await
            .unwrap();
    for r in rows {
        assert!(!r.contains(STRONG_PASSWORD) && !r.contains("argon2"), "{r}");
    }
}

#[tokio::test]
async fn registration_can_be_turned_off() {
    let app = TestApp::spawn_with(|v| {
        v.insert("REGISTRATION_ENABLED".into(), "false".into());
    })
    .await;
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": email(), "password": STRONG_PASSWORD, "full_name": "X"}),
        )
        .await;
    assert_problem(res, 403, "forbidden").await;
}

#[tokio::test]
async fn login_sets_the_session_cookie_which_authenticates() {
    let app = TestApp::spawn().await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let res = app
        .post_json(
            "/v1/auth/login",
            &json!({"email": e, "password": STRONG_PASSWORD}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_string();
    // Development: SESSION_COOKIE_SECURE=false, so no __Host- prefix and no Secure.
    assert!(cookie.starts_with("sb_session="), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Lax"), "{cookie}");
    assert!(cookie.contains("Path=/"), "{cookie}");
    assert!(!cookie.contains("Secure"), "{cookie}");
    // The shared client keeps the cookie: it alone authenticates.
    let me = app.get("/v1/users/me").await;
    assert_eq!(me.status(), 200);
    assert_eq!(me.json::<Value>().await.unwrap()["email"], e);

    // Secure environments use the __Host- prefix and Secure.
    let secure = TestApp::spawn_with(|v| {
        v.insert("SESSION_COOKIE_SECURE".into(), "true".into());
        v.insert("SESSION_COOKIE_SAMESITE".into(), "strict".into());
    })
    .await;
    secure.register(&e, STRONG_PASSWORD).await;
    let res = login_raw(&secure, &e, STRONG_PASSWORD).await;
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("__Host-sb_session="), "{cookie}");
    assert!(
        cookie.contains("; Secure") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
}

#[tokio::test]
async fn missing_or_bad_credentials_are_401_invalid_token() {
    let app = TestApp::spawn().await;
    let res = app.get("/v1/users/me").await;
    assert_eq!(
        res.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert_problem(res, 401, "invalid_token").await;
    for auth in [
        "Bearer",
        "Bearer garbage",
        "Basic dXNlcjpwdw==",
        "Bearer a.b.c",
    ] {
        let res = reqwest::Client::new()
            .get(app.url("/v1/users/me"))
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        assert_problem(res, 401, "invalid_token").await;
    }
    let res = reqwest::Client::new()
        .get(app.url("/v1/users/me"))
        .header("cookie", "sb_session=not-a-session")
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "invalid_token").await;
}

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

// ---- password policy and email normalisation ----

#[tokio::test]
async fn password_policy_refusals_say_why() {
    let app = TestApp::spawn().await;
    let e = "carol.jones@example.com";
    let cases = [
        ("short-Pw1", "too_short"),
        ("password1234", "too_weak"),
        ("qwertyuiopasdf", "too_weak"),
        ("my-carol.jones-is-strong-77", "contains_email"),
    ];
    for (pw, code) in cases {
        let res = app
            .post_json(
                "/v1/auth/register",
                &json!({"email": e, "password": pw, "full_name": "Carol"}),
            )
            .await;
        let body = assert_problem(res, 400, "validation_failed").await;
        assert_eq!(body["errors"][0]["field"], "password", "{pw}: {body}");
        assert_eq!(body["errors"][0]["code"], code, "{pw}: {body}");
        assert!(!body["errors"][0]["message"].as_str().unwrap().is_empty());
    }
    // Over the hard cap: refused before any hashing, so it answers fast.
    let started = std::time::Instant::now();
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": e, "password": "ж".repeat(257), "full_name": "Carol"}),
        )
        .await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["code"], "too_long");
    assert!(started.elapsed() < Duration::from_millis(500));
    // Login refuses it the same way (no hashing of huge inputs).
    let res = login_raw(&app, e, &"x".repeat(300)).await;
    assert_problem(res, 400, "validation_failed").await;
    assert_eq!(audit_count(&app, "auth.register").await, 0);

    // 64 characters without any composition rule, and exactly 256 (counted in
    // characters, not bytes), are accepted and not truncated.
    let long64 = "the quiet harbour keeps seven lanterns burning until dawn arrives";
    assert_eq!(long64.chars().count(), 65);
    app.register(e, long64).await;
    assert_eq!(login_raw(&app, e, long64).await.status(), 200);
    assert_eq!(login_raw(&app, e, &long64[..64]).await.status(), 401);
    let e2 = email();
    let random: String = (0..8)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let pw256: String = format!("ж{}", &random[..255]);
    assert_eq!(pw256.chars().count(), 256);
    app.register(&e2, &pw256).await;
    assert_eq!(login_raw(&app, &e2, &pw256).await.status(), 200);
}

#[tokio::test]
async fn emails_are_normalised_before_lookup() {
    let app = TestApp::spawn().await;
    // Fullwidth letters and surrounding space: NFKC, trim, lower-case.
    let user = app
        .register("  ＤＡＶＥ@Example.com ", STRONG_PASSWORD)
        .await;
    assert_eq!(user["email"], "dave@example.com");
    assert_eq!(
        login_raw(&app, "DAVE@EXAMPLE.COM", STRONG_PASSWORD)
            .await
            .status(),
        200
    );
    assert_eq!(
        login_raw(&app, "ｄａｖｅ@example.com", STRONG_PASSWORD)
            .await
            .status(),
        200
    );
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": "Dave@EXAMPLE.com", "password": STRONG_PASSWORD, "full_name": "D"}),
        )
        .await;
    assert_problem(res, 409, "conflict").await;
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": "not-an-email", "password": STRONG_PASSWORD, "full_name": "D"}),
        )
        .await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "email");
}

// ---- login without leaks, lockout ----

fn lockout_vars(max: &'static str) -> impl FnOnce(&mut std::collections::HashMap<String, String>) {
    move |v| {
        v.insert("LOGIN_MAX_ATTEMPTS".into(), max.into());
        v.insert("TRUSTED_PROXIES".into(), "127.0.0.1/32".into());
    }
}

#[tokio::test]
async fn login_failures_are_indistinguishable() {
    let app = TestApp::spawn_with(lockout_vars("3")).await;
    let wrong = email();
    app.register(&wrong, STRONG_PASSWORD).await;
    let disabled = email();
    app.register(&disabled, STRONG_PASSWORD).await;
    sqlx::query("update users set status = 'disabled' where email = $1")
        .bind(&disabled)
        .execute(&app.db)
        .await
        .unwrap();
    let locked = email();
    app.register(&locked, STRONG_PASSWORD).await;
    for _ in 0..3 {
        login_raw(&app, &locked, "not-the-password-at-all").await;
    }

    // Each path is timed a few times and its fastest answer kept: a load spike on
    // a shared machine slows one sample, never makes a path skip its argon2 work.
    // The wrong password is tried twice only (a third would lock the account).
    let paths = [
        (None, STRONG_PASSWORD, 3),                     // unknown
        (Some(wrong.clone()), "not-the-password-1", 2), // wrong password
        (Some(disabled.clone()), STRONG_PASSWORD, 3),   // disabled, right password
        (Some(locked.clone()), STRONG_PASSWORD, 3),     // locked, right password
    ];
    let mut answers = Vec::new();
    let mut fastest = Vec::new();
    for (who, pw, samples) in &paths {
        let mut best = Duration::MAX;
        for _ in 0..*samples {
            let who = who.clone().unwrap_or_else(email);
            let started = std::time::Instant::now();
            let res = login_raw(&app, &who, pw).await;
            best = best.min(started.elapsed());
            let status = res.status().as_u16();
            let headers = res.headers().clone();
            let body: Value = res.json().await.unwrap();
            assert!(headers.get("set-cookie").is_none());
            answers.push((status, body));
        }
        fastest.push(best);
    }
    let (s0, b0) = &answers[0];
    assert_eq!(*s0, 401);
    assert_eq!(b0["code"], "invalid_credentials");
    for (s, b) in &answers[1..] {
        assert_eq!((s, b), (s0, b0));
    }
    // Every path runs one argon2 verification: no path is many times faster.
    eprintln!("fastest login failures (unknown, wrong, disabled, locked): {fastest:?}");
    let min = *fastest.iter().min().unwrap();
    let max = *fastest.iter().max().unwrap();
    assert!(
        max < min * 5 + Duration::from_millis(50),
        "timings differ: {fastest:?}"
    );
    // Failures are audited with the reason, for operators only.
    let reasons: Vec<String> = sqlx::query_scalar(
        "select details->>'reason' from audit_logs where action = 'auth.login.failed' order by id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    for r in ["unknown_user", "wrong_password", "disabled", "locked"] {
        assert!(reasons.iter().any(|x| x == r), "{r} missing in {reasons:?}");
    }
}

#[tokio::test]
async fn lockout_after_the_limit_and_a_success_resets_the_count() {
    let app = TestApp::spawn_with(|v| {
        lockout_vars("3")(v);
        v.insert("LOGIN_LOCKOUT_SECONDS".into(), "3".into());
    })
    .await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    // Two failures, then a success: the count starts again.
    for _ in 0..2 {
        assert_eq!(
            login_raw(&app, &e, "wrong-password-123").await.status(),
            401
        );
    }
    assert_eq!(login_raw(&app, &e, STRONG_PASSWORD).await.status(), 200);
    for _ in 0..2 {
        assert_eq!(
            login_raw(&app, &e, "wrong-password-123").await.status(),
            401
        );
    }
    assert_eq!(login_raw(&app, &e, STRONG_PASSWORD).await.status(), 200);

    // Three failures lock the account: from the address that failed, the right
    // password fails, whatever the case of the email. (An address that never
    // failed gets a delayed check instead: tests/api/lockout.rs.)
    for _ in 0..3 {
        assert_eq!(
            login_raw(&app, &e, "wrong-password-123").await.status(),
            401
        );
    }
    for _ in 0..3 {
        let res = login_raw(&app, &e.to_uppercase(), STRONG_PASSWORD).await;
        assert_problem(res, 401, "invalid_credentials").await;
    }
    assert_eq!(audit_count(&app, "auth.lockout").await, 1);
    // After the window, the right password works again.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(login_raw(&app, &e, STRONG_PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn a_parallel_burst_cannot_evaluate_more_than_the_limit() {
    let app = TestApp::spawn().await; // LOGIN_MAX_ATTEMPTS=5 (development)
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let burst = (0..50).map(|i| {
        let url = app.url("/v1/auth/login");
        let e = e.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"email": e, "password": format!("wrong-guess-{i}")}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    });
    for s in futures::future::join_all(burst).await {
        assert_eq!(s.unwrap(), 401);
    }
    let evaluated: i64 = sqlx::query_scalar(
        "select count(*) from audit_logs where action = 'auth.login.failed' and details->>'reason' = 'wrong_password'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(evaluated <= 5, "{evaluated} password checks in the burst");
    assert_eq!(login_raw(&app, &e, STRONG_PASSWORD).await.status(), 401);
}

#[tokio::test]
async fn lockout_holds_when_redis_is_down() {
    let app = TestApp::spawn_with(|v| {
        v.insert("REDIS_URL".into(), "redis://127.0.0.1:1/0".into());
        v.insert("LOGIN_MAX_ATTEMPTS".into(), "3".into());
    })
    .await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    // Sessions still work through PostgreSQL.
    let token = app.login(&e, STRONG_PASSWORD).await;
    assert_eq!(get_bearer(&app, "/v1/users/me", &token).await.status(), 200);
    for _ in 0..3 {
        assert_eq!(
            login_raw(&app, &e, "wrong-password-123").await.status(),
            401
        );
    }
    let res = login_raw(&app, &e, STRONG_PASSWORD).await;
    assert_problem(res, 401, "invalid_credentials").await;
    // Logout is still immediate.
    let res = logout_bearer(&app, &token).await;
    assert_eq!(res.status(), 204);
    assert_eq!(get_bearer(&app, "/v1/users/me", &token).await.status(), 401);
}

#[tokio::test]
async fn per_ip_throttle_when_configured() {
    let app = TestApp::spawn_with(|v| {
        v.insert("LOGIN_IP_MAX_PER_MINUTE".into(), "3".into());
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            login_raw(&app, &email(), "whatever-password")
                .await
                .status(),
            401
        );
    }
    let res = login_raw(&app, &email(), "whatever-password").await;
    assert!(res.headers().get("retry-after").is_some());
    assert_problem(res, 429, "rate_limited").await;
}

// ---- refresh, sessions, password change ----

async fn login_pair(app: &TestApp, e: &str) -> (String, String) {
    let body: Value = login_raw(app, e, STRONG_PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    (
        body["access_token"].as_str().unwrap().to_string(),
        body["refresh_token"].as_str().unwrap().to_string(),
    )
}

async fn refresh(app: &TestApp, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(app.url("/v1/auth/refresh"))
        .json(&json!({ "refresh_token": token }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_session() {
    let app = TestApp::spawn().await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let (access1, refresh1) = login_pair(&app, &e).await;

    let res = refresh(&app, &refresh1).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let (access2, refresh2) = (
        body["access_token"].as_str().unwrap().to_string(),
        body["refresh_token"].as_str().unwrap().to_string(),
    );
    assert_ne!(refresh1, refresh2);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["user"]["email"], e);
    assert_eq!(
        get_bearer(&app, "/v1/users/me", &access2).await.status(),
        200
    );
    // Only the SHA-256 of a token is stored.
    use sha2::Digest as _;
    for (value, want) in [
        (refresh2.as_bytes().to_vec(), 0i64),
        (sha2::Sha256::digest(&refresh2).to_vec(), 1),
    ] {
        let n: i64 =
            sqlx::query_scalar("select count(*) from refresh_tokens where token_hash = $1")
                .bind(value)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(n, want);
    }

    // Reusing the first token: refused, and the whole session ends.
    let res = refresh(&app, &refresh1).await;
    assert_problem(res, 401, "invalid_token").await;
    assert_problem(refresh(&app, &refresh2).await, 401, "invalid_token").await;
    for t in [&access1, &access2] {
        assert_eq!(get_bearer(&app, "/v1/users/me", t).await.status(), 401);
    }
    assert_eq!(audit_count(&app, "auth.refresh.reused").await, 1);
    assert_problem(refresh(&app, "made-up").await, 401, "invalid_token").await;
}

#[tokio::test]
async fn a_session_idle_past_the_timeout_ends_on_its_next_use() {
    let app = TestApp::spawn_with(|v| {
        v.insert("SESSION_IDLE_TIMEOUT_SECONDS".into(), "120".into());
    })
    .await;
    let e = email();
    let user = app.register(&e, STRONG_PASSWORD).await;
    let user_id: uuid::Uuid = user["id"].as_str().unwrap().parse().unwrap();
    let session_of = |sid: uuid::Uuid| {
        let db = app.db.clone();
        async move {
            sqlx::query_as::<_, (Option<String>, bool)>(
                "select revoked_reason, last_seen_at > now() - interval '5 seconds'
                   from sessions where id = $1",
            )
            .bind(sid)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    // Moves the session's last activity `secs` into the past (timeout: 120 s).
    let seen_ago = |sid: uuid::Uuid, secs: f64| {
        let db = app.db.clone();
        async move {
            sqlx::query(
                "update sessions set last_seen_at = now() - make_interval(secs => $2)
                  where id = $1",
            )
            .bind(sid)
            .bind(secs)
            .execute(&db)
            .await
            .unwrap();
        }
    };
    let live_session = || {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, uuid::Uuid>(
                "select id from sessions where user_id = $1 and revoked_at is null
                  order by created_at desc limit 1",
            )
            .bind(user_id)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };

    // GET /v1/users/me with `access` after `secs` without activity, its session's
    // state read from PostgreSQL (the Redis copy dropped).
    let me_after = |sid: uuid::Uuid, secs: f64, access: &str| {
        let (app, access) = (&app, access.to_string());
        async move {
            seen_ago(sid, secs).await;
            app.services
                .sessions
                .forget_user_sessions(user_id)
                .await
                .unwrap();
            get_bearer(app, "/v1/users/me", &access).await.status()
        }
    };

    // Used within the window: a request with the access token counts as activity
    // (when its state is read from PostgreSQL), and so does a refresh.
    let (access0, refresh1) = login_pair(&app, &e).await;
    let sid = live_session().await;
    assert_eq!(me_after(sid, 110.0, &access0).await, 200);
    assert_eq!(
        session_of(sid).await,
        (None, true),
        "a request marks the session seen"
    );
    seen_ago(sid, 110.0).await;
    let res = refresh(&app, &refresh1).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        session_of(sid).await,
        (None, true),
        "refresh marks the session seen"
    );

    // Idle past the window: the refresh token is refused and the session ends,
    // audited.
    seen_ago(sid, 180.0).await;
    let res = refresh(&app, body["refresh_token"].as_str().unwrap()).await;
    assert_eq!(res.status(), 401);
    assert_eq!(session_of(sid).await.0.as_deref(), Some("idle_timeout"));
    let audited = |sid: uuid::Uuid| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from audit_logs where action = 'auth.session.idle_timeout'
                    and target_id = $1 and actor_id = $2",
            )
            .bind(sid.to_string())
            .bind(user_id.to_string())
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    assert_eq!(audited(sid).await, 1);

    // An access token of an idle session is refused as soon as its cached state
    // is looked up again, and the session ends the same way.
    let (access, _) = login_pair(&app, &e).await;
    let sid = live_session().await;
    assert_eq!(
        get_bearer(&app, "/v1/users/me", &access).await.status(),
        200
    );
    assert_eq!(me_after(sid, 180.0, &access).await, 401);
    assert_eq!(session_of(sid).await.0.as_deref(), Some("idle_timeout"));
    assert_eq!(
        audited(sid).await,
        1,
        "ended on the access path, audited once"
    );
}

#[tokio::test]
async fn refresh_with_no_body_uses_the_session_cookie() {
    let app = TestApp::spawn().await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    // The shared client keeps cookies.
    let res = app
        .post_json(
            "/v1/auth/login",
            &json!({"email": e, "password": STRONG_PASSWORD}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let res = app
        .http
        .post(app.url("/v1/auth/refresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .starts_with("sb_session="));
    // The rotated cookie still authenticates; logout clears it.
    assert_eq!(app.get("/v1/users/me").await.status(), 200);
    let res = app
        .http
        .post(app.url("/v1/auth/logout"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert!(res.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(app.get("/v1/users/me").await.status(), 401);
    let res = reqwest::Client::new()
        .post(app.url("/v1/auth/refresh"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "invalid_token").await;
}

#[tokio::test]
async fn sessions_are_listed_and_ended() {
    let app = TestApp::spawn().await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let (a, _) = login_pair(&app, &e).await;
    let res = reqwest::Client::new()
        .post(app.url("/v1/auth/login"))
        .header("user-agent", "second-device/1.0")
        .json(&json!({"email": e, "password": STRONG_PASSWORD}))
        .send()
        .await
        .unwrap();
    let b = res.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string();

    let list: Value = get_bearer(&app, "/v1/users/me/sessions", &a)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["next_cursor"], Value::Null);
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for k in [
        "id",
        "created_at",
        "last_seen_at",
        "ip",
        "user_agent",
        "current",
    ] {
        assert!(items[0].get(k).is_some(), "{k} missing");
    }
    assert_eq!(items.iter().filter(|s| s["current"] == true).count(), 1);
    let other = items.iter().find(|s| s["current"] == false).unwrap();
    assert_eq!(other["user_agent"], "second-device/1.0");
    assert_eq!(other["ip"], "127.0.0.1");

    // Another user cannot end it (404, not 403).
    let (_, _, stranger) = app.user_with_token().await;
    let del = |t: String, id: String| {
        let url = app.url(&format!("/v1/users/me/sessions/{id}"));
        async move {
            reqwest::Client::new()
                .delete(url)
                .bearer_auth(t)
                .send()
                .await
                .unwrap()
        }
    };
    let id = other["id"].as_str().unwrap().to_string();
    assert_problem(del(stranger, id.clone()).await, 404, "not_found").await;
    assert_eq!(get_bearer(&app, "/v1/users/me", &b).await.status(), 200);
    assert_eq!(del(a.clone(), id.clone()).await.status(), 204);
    assert_eq!(get_bearer(&app, "/v1/users/me", &b).await.status(), 401);
    assert_eq!(get_bearer(&app, "/v1/users/me", &a).await.status(), 200);
    assert_problem(del(a.clone(), id).await, 404, "not_found").await;
    assert_eq!(audit_count(&app, "session.ended").await, 1);
}

#[tokio::test]
async fn password_change_ends_the_other_sessions() {
    let app = TestApp::spawn().await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let (a, _) = login_pair(&app, &e).await;
    let (b, b_refresh) = login_pair(&app, &e).await;
    let change = |current: &str, new: &str| {
        let body = json!({"current_password": current, "new_password": new});
        let req = reqwest::Client::new()
            .post(app.url("/v1/users/me/password"))
            .bearer_auth(&a)
            .json(&body);
        async move { req.send().await.unwrap() }
    };
    let res = change("not-my-password-9", "granite-meadow-falcon-42").await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "current_password");
    let res = change(STRONG_PASSWORD, "password1234").await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "password");

    assert_eq!(
        change(STRONG_PASSWORD, "granite-meadow-falcon-42")
            .await
            .status(),
        204
    );
    assert_eq!(get_bearer(&app, "/v1/users/me", &a).await.status(), 200);
    assert_eq!(get_bearer(&app, "/v1/users/me", &b).await.status(), 401);
    assert_problem(refresh(&app, &b_refresh).await, 401, "invalid_token").await;
    assert_eq!(login_raw(&app, &e, STRONG_PASSWORD).await.status(), 401);
    assert_eq!(
        login_raw(&app, &e, "granite-meadow-falcon-42")
            .await
            .status(),
        200
    );
    assert_eq!(audit_count(&app, "user.password.changed").await, 1);
}

#[tokio::test]
async fn patch_me_changes_the_full_name() {
    let app = TestApp::spawn().await;
    let (_, _, t) = app.user_with_token().await;
    let patch = |body: Value| {
        reqwest::Client::new()
            .patch(app.url("/v1/users/me"))
            .bearer_auth(&t)
            .json(&body)
            .send()
    };
    let res = patch(json!({"full_name": "  Erin Example "}))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<Value>().await.unwrap()["full_name"],
        "Erin Example"
    );
    let me: Value = get_bearer(&app, "/v1/users/me", &t)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["full_name"], "Erin Example");
    assert_problem(
        patch(json!({"full_name": ""})).await.unwrap(),
        400,
        "validation_failed",
    )
    .await;
    assert_problem(
        patch(json!({"email": "x@example.com"})).await.unwrap(),
        400,
        "validation_failed",
    )
    .await;
}

// ---- administration ----

#[tokio::test]
async fn admins_list_filter_and_page_users() {
    let app = TestApp::spawn().await;
    let (admin_id, _, admin) = app.user_with_token().await;
    let (_, _, plain) = app.user_with_token().await;
    assert_problem(
        get_bearer(&app, "/v1/admin/users", &plain).await,
        403,
        "forbidden",
    )
    .await;
    app.make_admin(admin_id).await;
    for i in 0..3 {
        app.register(&format!("zeta{i}@paging.example"), STRONG_PASSWORD)
            .await;
    }
    let page1: Value = get_bearer(&app, "/v1/admin/users?email=PAGING&limit=2", &admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page1["items"].as_array().unwrap().len(), 2);
    let cursor = page1["next_cursor"].as_str().unwrap().to_string();
    let page2: Value = get_bearer(
        &app,
        &format!("/v1/admin/users?email=paging&limit=2&cursor={cursor}"),
        &admin,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert_eq!(page2["next_cursor"], Value::Null);
    let mut seen: Vec<String> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["items"].as_array().unwrap())
        .map(|u| u["email"].as_str().unwrap().to_string())
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            "zeta0@paging.example",
            "zeta1@paging.example",
            "zeta2@paging.example"
        ]
    );
    let disabled: Value = get_bearer(&app, "/v1/admin/users?status=disabled", &admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(disabled["items"], json!([]));
    assert_problem(
        get_bearer(&app, "/v1/admin/users?limit=0", &admin).await,
        400,
        "validation_failed",
    )
    .await;
}

#[tokio::test]
async fn disabling_a_user_ends_their_sessions_at_once() {
    let app = TestApp::spawn().await;
    let (admin_id, _, admin) = app.user_with_token().await;
    app.make_admin(admin_id).await;
    let (victim_id, victim_email, victim) = app.user_with_token().await;
    let svc = app.service_token(&["auth:verify"]).await;
    let mut grpc = AuthServiceClient::new(app.grpc_with_token(&svc).await);
    assert!(
        grpc.verify_token(VerifyTokenRequest {
            token: victim.clone()
        })
        .await
        .unwrap()
        .into_inner()
        .valid
    );

    let patch = |t: &str, id: uuid::Uuid, body: Value| {
        reqwest::Client::new()
            .patch(app.url(&format!("/v1/admin/users/{id}")))
            .bearer_auth(t)
            .json(&body)
            .send()
    };
    // Only admins.
    assert_problem(
        patch(&victim, admin_id, json!({"status": "disabled"}))
            .await
            .unwrap(),
        403,
        "forbidden",
    )
    .await;
    assert_problem(
        patch(&admin, victim_id, json!({"roles": ["root"]}))
            .await
            .unwrap(),
        400,
        "validation_failed",
    )
    .await;
    assert_problem(
        patch(&admin, uuid::Uuid::new_v4(), json!({"status": "disabled"}))
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;

    let res = patch(&admin, victim_id, json!({"status": "disabled"}))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "disabled");
    assert_problem(
        get_bearer(&app, "/v1/users/me", &victim).await,
        401,
        "invalid_token",
    )
    .await;
    let v = grpc
        .verify_token(VerifyTokenRequest {
            token: victim.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    assert_eq!(v.reason, VerifyReason::UserDisabled as i32);
    assert_problem(
        login_raw(&app, &victim_email, STRONG_PASSWORD).await,
        401,
        "invalid_credentials",
    )
    .await;

    // Re-enabled: a new login works; roles change at once for live sessions.
    assert_eq!(
        patch(&admin, victim_id, json!({"status": "active"}))
            .await
            .unwrap()
            .status(),
        200
    );
    let fresh = app.login(&victim_email, STRONG_PASSWORD).await;
    assert_eq!(
        get_bearer(&app, "/v1/admin/users", &fresh).await.status(),
        403
    );
    let res = patch(
        &admin,
        victim_id,
        json!({"roles": ["user", "admin", "user"]}),
    )
    .await
    .unwrap();
    assert_eq!(
        res.json::<Value>().await.unwrap()["roles"],
        json!(["admin", "user"])
    );
    // The live session sees its new role on the very next request.
    assert_eq!(
        get_bearer(&app, "/v1/admin/users", &fresh).await.status(),
        200
    );
    // An admin cannot lock themselves out.
    assert_problem(
        patch(&admin, admin_id, json!({"status": "disabled"}))
            .await
            .unwrap(),
        403,
        "forbidden",
    )
    .await;

    let changes: Vec<Value> = sqlx::query_scalar(
        "select details from audit_logs where action = 'user.updated' and target_id = $1 order by id",
    )
    .bind(victim_id.to_string())
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(changes.len(), 3);
    assert_eq!(changes[0]["status"]["to"], "disabled");
    assert_eq!(changes[0]["sessions_ended"], 1);
}

// ---- operator CLI ----

fn cli(app: &TestApp, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ENV_FILE", ".env.dev")
        .envs(crate::helpers::test_keys().iter().cloned())
        .env("DATABASE_URL", &app.database_url)
        .env("REDIS_URL", crate::helpers::redis_url())
        .env("REDIS_KEY_PREFIX", &app.settings.redis_key_prefix)
        .env("LOG_LEVEL", "error")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn cli_creates_users_and_service_clients() {
    let app = TestApp::spawn().await;
    let e = email();
    let (ok, out, err) = cli(
        &app,
        &[
            "admin",
            "create-user",
            "--email",
            &e,
            "--full-name",
            "First Admin",
            "--role",
            "admin",
            "--password-stdin",
        ],
        &format!("{STRONG_PASSWORD}\n"),
    );
    assert!(ok, "{err}");
    let user: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(user["email"], e);
    assert_eq!(user["roles"], json!(["admin"]));
    let t = app.login(&e, STRONG_PASSWORD).await;
    assert_eq!(get_bearer(&app, "/v1/admin/users", &t).await.status(), 200);
    assert_eq!(audit_count(&app, "user.created").await, 1);
    // Weak passwords are refused here too, saying why.
    let (ok, _, err) = cli(
        &app,
        &[
            "admin",
            "create-user",
            "--email",
            &email(),
            "--full-name",
            "X",
            "--password-stdin",
        ],
        "password\n",
    );
    assert!(!ok && err.contains("password"), "{err}");

    let (ok, out, err) = cli(
        &app,
        &[
            "admin",
            "create-service-client",
            "reports",
            "--scopes",
            "auth:verify,users:read",
        ],
        "",
    );
    assert!(ok, "{err}");
    let c: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(c["client_id"], "reports");
    let token = |secret: String| {
        reqwest::Client::new()
            .post(app.url("/v1/auth/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "reports"),
                ("client_secret", &secret),
            ])
            .send()
    };
    let old = c["client_secret"].as_str().unwrap().to_string();
    let res = token(old.clone()).await.unwrap();
    assert_eq!(
        res.json::<Value>().await.unwrap()["scope"],
        "auth:verify users:read"
    );

    let (ok, out, err) = cli(
        &app,
        &["admin", "rotate-service-client-secret", "reports"],
        "",
    );
    assert!(ok, "{err}");
    let rotated: Value = serde_json::from_str(out.trim()).unwrap();
    let new = rotated["client_secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_problem(token(old).await.unwrap(), 401, "invalid_client").await;
    assert_eq!(token(new).await.unwrap().status(), 200);
    assert_eq!(audit_count(&app, "service_client.secret.rotated").await, 1);
    let (ok, _, _) = cli(
        &app,
        &["admin", "rotate-service-client-secret", "nobody"],
        "",
    );
    assert!(!ok);
    let (ok, _, _) = cli(
        &app,
        &[
            "admin",
            "create-service-client",
            "bad",
            "--scopes",
            "root:all",
        ],
        "",
    );
    assert!(!ok);
}
