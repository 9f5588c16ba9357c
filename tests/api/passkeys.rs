//! Passkeys (DESIGN §8) through the real HTTP routes, with software
//! authenticators from webauthn-authenticator-rs playing the browser and the
//! device: registration, passwordless login, a wrong origin, a replayed
//! assertion, a cloned authenticator, a passkey as second factor, two replicas.

use std::collections::HashMap;

use base64::Engine as _;
use serde_json::{json, Value};
use uuid::Uuid;
use webauthn_authenticator_rs::prelude::{Url, WebauthnCError};
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::softtoken::SoftToken;
use webauthn_authenticator_rs::{AuthenticatorBackend, AuthenticatorBackendHashedClientData};
use webauthn_rs_proto::{
    AllowCredentials, PublicKeyCredential, PublicKeyCredentialCreationOptions,
    PublicKeyCredentialRequestOptions, RegisterPublicKeyCredential,
};

use crate::helpers::{assert_problem, TestApp};

/// The development front end (WEBAUTHN_ORIGINS in .env.dev).
const ORIGIN: &str = "http://localhost:3000";
const TIMEOUT_MS: u32 = 60_000;

/// A passkey provider around a software authenticator. The soft authenticators
/// only sign for credential ids they are given and refuse to store resident
/// keys; a passkey provider keeps every credential it made with its user handle,
/// so this one answers a discoverable request (no allowed credentials) with
/// the credential it holds for the site and returns the user handle, as a
/// phone or password manager does.
struct Device<B> {
    backend: B,
    /// credential id → user handle
    users: HashMap<Vec<u8>, Vec<u8>>,
}

impl<B: AuthenticatorBackendHashedClientData> AuthenticatorBackendHashedClientData for Device<B> {
    fn perform_register(
        &mut self,
        client_data_hash: Vec<u8>,
        mut options: PublicKeyCredentialCreationOptions,
        timeout_ms: u32,
    ) -> Result<RegisterPublicKeyCredential, WebauthnCError> {
        // Residency is this wrapper's job (see above), not the soft token's.
        if let Some(sel) = options.authenticator_selection.as_mut() {
            sel.require_resident_key = false;
        }
        let user = options.user.id.to_vec();
        let cred = self
            .backend
            .perform_register(client_data_hash, options, timeout_ms)?;
        self.users.insert(cred.raw_id.to_vec(), user);
        Ok(cred)
    }

    fn perform_auth(
        &mut self,
        client_data_hash: Vec<u8>,
        mut options: PublicKeyCredentialRequestOptions,
        timeout_ms: u32,
    ) -> Result<PublicKeyCredential, WebauthnCError> {
        if options.allow_credentials.is_empty() {
            options.allow_credentials = self
                .users
                .keys()
                .map(|id| AllowCredentials {
                    type_: "public-key".into(),
                    id: id.clone().into(),
                    transports: None,
                })
                .collect();
        }
        let mut cred = self
            .backend
            .perform_auth(client_data_hash, options, timeout_ms)?;
        cred.response.user_handle = self
            .users
            .get(cred.raw_id.as_slice())
            .cloned()
            .map(Into::into);
        Ok(cred)
    }
}

impl<B: AuthenticatorBackendHashedClientData> Device<B> {
    fn new(backend: B) -> Self {
        Self {
            backend,
            users: HashMap::new(),
        }
    }

    /// `navigator.credentials.create({publicKey: options})` at `origin`, as JSON.
    fn create(&mut self, origin: &str, options: &Value) -> Value {
        let options: PublicKeyCredentialCreationOptions =
            serde_json::from_value(options.clone()).expect("creation options parse");
        let cred = AuthenticatorBackend::perform_register(
            self,
            Url::parse(origin).unwrap(),
            options,
            TIMEOUT_MS,
        )
        .expect("the authenticator registers");
        serde_json::to_value(cred).unwrap()
    }

    /// `navigator.credentials.get({publicKey: options})` at `origin`, as JSON.
    fn get(&mut self, origin: &str, options: &Value) -> Value {
        let options: PublicKeyCredentialRequestOptions =
            serde_json::from_value(options.clone()).expect("request options parse");
        let cred = AuthenticatorBackend::perform_auth(
            self,
            Url::parse(origin).unwrap(),
            options,
            TIMEOUT_MS,
        )
        .expect("the authenticator signs");
        serde_json::to_value(cred).unwrap()
    }
}

/// A soft passkey that claims user verification (as a device with a PIN or
/// biometric does; webauthn-rs requires it for passkeys).
fn soft_passkey() -> Device<SoftPasskey> {
    Device::new(SoftPasskey::new(true))
}

fn soft_token() -> Device<SoftToken> {
    Device::new(SoftToken::new(true).expect("soft token").0)
}

/// An exact copy of a soft token, keys and signature counter included: a
/// cloned authenticator.
fn clone_of(d: &Device<SoftToken>) -> Device<SoftToken> {
    Device {
        backend: SoftToken::from_cbor(&d.backend.to_cbor().unwrap()).unwrap(),
        users: d.users.clone(),
    }
}

async fn post(app: &TestApp, path: &str, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = reqwest::Client::new().post(app.url(path)).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn json_of(res: reqwest::Response, status: u16) -> Value {
    let got = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    body
}

/// Registers a passkey for the bearer of `token` from `device` at ORIGIN; the
/// new passkey's JSON.
async fn register<B: AuthenticatorBackendHashedClientData>(
    app: &TestApp,
    token: &str,
    device: &mut Device<B>,
    name: &str,
) -> Value {
    let start = json_of(
        post(
            app,
            "/v1/users/me/passkeys/register/start",
            Some(token),
            &json!({}),
        )
        .await,
        200,
    )
    .await;
    let credential = device.create(ORIGIN, &start["options"]);
    json_of(
        post(
            app,
            "/v1/users/me/passkeys/register/finish",
            Some(token),
            &json!({"challenge_id": start["challenge_id"], "name": name, "credential": credential}),
        )
        .await,
        201,
    )
    .await
}

/// A passwordless login challenge: (challenge_id, options).
async fn login_start(app: &TestApp) -> (Value, Value) {
    let start = json_of(
        post(app, "/v1/auth/passkey/start", None, &json!({})).await,
        200,
    )
    .await;
    (start["challenge_id"].clone(), start["options"].clone())
}

async fn login_finish(
    app: &TestApp,
    challenge_id: &Value,
    credential: &Value,
) -> reqwest::Response {
    post(
        app,
        "/v1/auth/passkey/finish",
        None,
        &json!({"challenge_id": challenge_id, "credential": credential}),
    )
    .await
}

/// A full passwordless login from `device` at `origin`, answered as is.
async fn passwordless<B: AuthenticatorBackendHashedClientData>(
    app: &TestApp,
    device: &mut Device<B>,
    origin: &str,
) -> reqwest::Response {
    let (id, options) = login_start(app).await;
    let credential = device.get(origin, &options);
    login_finish(app, &id, &credential).await
}

fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

async fn audit_count(app: &TestApp, action: &str, user_id: Uuid) -> i64 {
    sqlx::query_scalar(
        "select count(*) from audit_logs where action = $1
            and (target_id = $2 or actor_id = $2 or details->>'user_id' = $2)",
    )
    .bind(action)
    .bind(user_id.to_string())
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_passkey_registers_lists_logs_in_without_a_password_and_is_removed() {
    let app = TestApp::spawn().await;
    let (user_id, email, token) = app.user_with_token().await;
    let mut device = soft_passkey();

    // Creation options: this relying party, this user, a discoverable and
    // user-verified credential.
    let start = json_of(
        post(
            &app,
            "/v1/users/me/passkeys/register/start",
            Some(&token),
            &json!({}),
        )
        .await,
        200,
    )
    .await;
    let options = &start["options"];
    assert_eq!(options["rp"]["id"], "localhost", "{options}");
    assert_eq!(options["user"]["name"], email.as_str());
    assert_eq!(options["authenticatorSelection"]["residentKey"], "required");
    assert_eq!(
        options["authenticatorSelection"]["userVerification"],
        "required"
    );
    assert!(options["challenge"].as_str().is_some_and(|c| c.len() >= 22));
    let credential = device.create(ORIGIN, options);
    let finish = |name: Value| json!({"challenge_id": start["challenge_id"], "name": name, "credential": credential});
    // A bad name is refused before the challenge is spent.
    let res = post(
        &app,
        "/v1/users/me/passkeys/register/finish",
        Some(&token),
        &finish(json!(" ")),
    )
    .await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "name", "{body}");
    let res = post(
        &app,
        "/v1/users/me/passkeys/register/finish",
        Some(&token),
        &finish(json!("Laptop")),
    )
    .await;
    let created = json_of(res, 201).await;
    assert_eq!(created["name"], "Laptop");
    assert!(
        created["created_at"].is_string() && created["last_used_at"].is_null(),
        "{created}"
    );
    let passkey_id = created["id"].as_str().unwrap().to_string();
    assert_eq!(
        audit_count(&app, "mfa.passkey.registered", user_id).await,
        1
    );
    // The challenge was single use.
    let res = post(
        &app,
        "/v1/users/me/passkeys/register/finish",
        Some(&token),
        &finish(json!("Again")),
    )
    .await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "challenge_id", "{body}");

    let list = json_of(
        crate::helpers::get_bearer(&app, "/v1/users/me/passkeys", &token).await,
        200,
    )
    .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["items"][0]["id"], passkey_id.as_str());
    assert!(list["next_cursor"].is_null());

    // Passwordless: request options name no credential (discoverable); the
    // answer is the login body and the session cookie, amr ["hwk","mfa"].
    let (challenge_id, options) = login_start(&app).await;
    assert!(
        options["allowCredentials"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{options}"
    );
    assert_eq!(options["userVerification"], "required");
    let assertion = device.get(ORIGIN, &options);
    let res = login_finish(&app, &challenge_id, &assertion).await;
    assert!(res
        .headers()
        .get_all("set-cookie")
        .iter()
        .any(|c| c.to_str().unwrap().starts_with("sb_session=")));
    let login = json_of(res, 200).await;
    assert_eq!(login["token_type"], "Bearer");
    assert_eq!(login["user"]["email"], email.as_str());
    assert!(login["refresh_token"].is_string());
    let access = login["access_token"].as_str().unwrap();
    let claims = jwt_claims(access);
    assert_eq!(claims["amr"], json!(["hwk", "mfa"]), "{claims}");
    assert!(claims["auth_time"]
        .as_i64()
        .is_some_and(|t| t >= claims["iat"].as_i64().unwrap()));
    let me = json_of(
        crate::helpers::get_bearer(&app, "/v1/users/me", access).await,
        200,
    )
    .await;
    assert_eq!(me["id"], user_id.to_string());
    let list = json_of(
        crate::helpers::get_bearer(&app, "/v1/users/me/passkeys", &token).await,
        200,
    )
    .await;
    assert!(list["items"][0]["last_used_at"].is_string(), "{list}");
    let logins: i64 = sqlx::query_scalar(
        "select count(*) from audit_logs where action = 'auth.login.succeeded'
            and actor_id = $1 and details->>'method' = 'passkey'",
    )
    .bind(user_id.to_string())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(logins, 1);

    // Someone else cannot see or remove it, and an API key cannot manage passkeys.
    let (_, _, other) = app.user_with_token().await;
    let other_list = json_of(
        crate::helpers::get_bearer(&app, "/v1/users/me/passkeys", &other).await,
        200,
    )
    .await;
    assert_eq!(other_list["items"], json!([]));
    let path = format!("/v1/users/me/passkeys/{passkey_id}");
    let res = reqwest::Client::new()
        .delete(app.url(&path))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "not_found").await;
    let key = json_of(
        post(
            &app,
            "/v1/api-keys",
            Some(&token),
            &json!({"name": "bot", "scopes": ["accounts:read"]}),
        )
        .await,
        201,
    )
    .await;
    let res = reqwest::Client::new()
        .get(app.url("/v1/users/me/passkeys"))
        .header("x-api-key", key["key"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_problem(res, 403, "forbidden").await;

    // Removed (audited), it logs nobody in any more.
    let res = reqwest::Client::new()
        .delete(app.url(&path))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 204);
    assert_eq!(audit_count(&app, "mfa.passkey.removed", user_id).await, 1);
    let list = json_of(
        crate::helpers::get_bearer(&app, "/v1/users/me/passkeys", &token).await,
        200,
    )
    .await;
    assert_eq!(list["items"], json!([]));
    let res = passwordless(&app, &mut device, ORIGIN).await;
    assert_problem(res, 401, "invalid_credentials").await;
}

#[tokio::test]
async fn a_ceremony_from_a_wrong_origin_is_refused() {
    let app = TestApp::spawn().await;
    let (user_id, _, token) = app.user_with_token().await;

    // Registration from a page the relying party does not list: another port of
    // localhost (which a browser lets use rp id `localhost`) and a phishing site
    // (which only a subverted client would sign for).
    for origin in ["http://localhost:9999", "https://stocksblitz-login.example"] {
        let start = json_of(
            post(
                &app,
                "/v1/users/me/passkeys/register/start",
                Some(&token),
                &json!({}),
            )
            .await,
            200,
        )
        .await;
        let credential = soft_passkey().create(origin, &start["options"]);
        let res = post(
            &app,
            "/v1/users/me/passkeys/register/finish",
            Some(&token),
            &json!({"challenge_id": start["challenge_id"], "credential": credential}),
        )
        .await;
        let body = assert_problem(res, 400, "validation_failed").await;
        assert_eq!(body["errors"][0]["field"], "credential", "{origin}: {body}");
    }
    let stored: i64 = sqlx::query_scalar("select count(*) from webauthn_credentials")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 0);

    // Registered from the real front end (another of the listed origins works
    // too), the passkey still does not log in from elsewhere.
    let mut device = soft_passkey();
    register(&app, &token, &mut device, "Phone").await;
    for origin in ["http://localhost:9999", "https://stocksblitz-login.example"] {
        let res = passwordless(&app, &mut device, origin).await;
        assert_problem(res, 401, "invalid_credentials").await;
    }
    assert_eq!(audit_count(&app, "auth.login.failed", user_id).await, 2);
    let res = passwordless(&app, &mut device, "http://localhost:5173").await;
    assert_eq!(res.status().as_u16(), 200);
}

#[tokio::test]
async fn a_replayed_assertion_is_refused() {
    let app = TestApp::spawn().await;
    let (_, _, token) = app.user_with_token().await;
    let mut device = soft_passkey();
    register(&app, &token, &mut device, "Key").await;

    let (challenge_id, options) = login_start(&app).await;
    let assertion = device.get(ORIGIN, &options);
    assert_eq!(
        login_finish(&app, &challenge_id, &assertion)
            .await
            .status()
            .as_u16(),
        200
    );
    // The same assertion again: its challenge is spent.
    let res = login_finish(&app, &challenge_id, &assertion).await;
    assert_problem(res, 401, "invalid_credentials").await;
    // Under a fresh challenge: it signed the old one.
    let (fresh, fresh_options) = login_start(&app).await;
    let res = login_finish(&app, &fresh, &assertion).await;
    assert_problem(res, 401, "invalid_credentials").await;
    // That failure spent the fresh challenge: a good assertion for it fails now.
    let res = login_finish(&app, &fresh, &device.get(ORIGIN, &fresh_options)).await;
    assert_problem(res, 401, "invalid_credentials").await;

    // A challenge expires: 300 s after it was made.
    let (challenge_id, options) = login_start(&app).await;
    let ttl: f64 = sqlx::query_scalar(
        "select extract(epoch from expires_at - created_at)::float8 from webauthn_challenges where id = $1",
    )
    .bind(Uuid::parse_str(challenge_id.as_str().unwrap()).unwrap())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(ttl, 300.0);
    sqlx::query(
        "update webauthn_challenges set expires_at = now() - interval '1 second' where id = $1",
    )
    .bind(Uuid::parse_str(challenge_id.as_str().unwrap()).unwrap())
    .execute(&app.db)
    .await
    .unwrap();
    let res = login_finish(&app, &challenge_id, &device.get(ORIGIN, &options)).await;
    assert_problem(res, 401, "invalid_credentials").await;

    // A login challenge cannot finish a registration.
    let (challenge_id, _) = login_start(&app).await;
    let start = json_of(
        post(
            &app,
            "/v1/users/me/passkeys/register/start",
            Some(&token),
            &json!({}),
        )
        .await,
        200,
    )
    .await;
    let credential = soft_passkey().create(ORIGIN, &start["options"]);
    let res = post(
        &app,
        "/v1/users/me/passkeys/register/finish",
        Some(&token),
        &json!({"challenge_id": challenge_id, "credential": credential}),
    )
    .await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "challenge_id", "{body}");
    // Garbage in the credential is a 400 naming it, not a 500.
    let res = login_finish(&app, &challenge_id, &json!({"id": 1})).await;
    let body = assert_problem(res, 400, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "credential");
}

#[tokio::test]
async fn a_cloned_authenticator_is_refused_and_audited() {
    let app = TestApp::spawn().await;
    let (user_id, _, token) = app.user_with_token().await;
    let mut original = soft_token();
    register(&app, &token, &mut original, "Security key").await;
    assert_eq!(
        passwordless(&app, &mut original, ORIGIN)
            .await
            .status()
            .as_u16(),
        200
    );

    // Copied now, the clone starts from the same counter; the original moves on.
    let mut clone = clone_of(&original);
    assert_eq!(
        passwordless(&app, &mut original, ORIGIN)
            .await
            .status()
            .as_u16(),
        200
    );
    let stored: i64 = sqlx::query_scalar("select sign_count from webauthn_credentials")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 2);
    // The clone signs validly, but its counter does not grow past the stored one.
    let res = passwordless(&app, &mut clone, ORIGIN).await;
    assert_problem(res, 401, "invalid_credentials").await;
    let (outcome, passkey_stored): (String, i64) = sqlx::query_as(
        "select outcome, (details->>'stored_counter')::bigint from audit_logs
          where action = 'auth.passkey.cloned' and target_id = $1",
    )
    .bind(user_id.to_string())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((outcome.as_str(), passkey_stored), ("denied", 2));
    // The original moves on twice; the clone, one signature behind, is refused
    // as a second factor too, and the stored counter never moves back.
    for _ in 0..2 {
        assert_eq!(
            passwordless(&app, &mut original, ORIGIN)
                .await
                .status()
                .as_u16(),
            200
        );
    }
    let challenge = app
        .state
        .passkeys
        .start_second_factor(user_id)
        .await
        .unwrap();
    let assertion = clone.get(ORIGIN, &challenge.options);
    let meta = user_service::service::RequestMeta::default();
    let err = app
        .state
        .passkeys
        .finish_second_factor(&meta, user_id, challenge.id, assertion)
        .await
        .unwrap_err();
    assert!(
        matches!(err, user_service::service::ServiceError::InvalidCredentials),
        "{err:?}"
    );
    assert_eq!(audit_count(&app, "auth.passkey.cloned", user_id).await, 2);
    let after: i64 = sqlx::query_scalar("select sign_count from webauthn_credentials")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(after, 4);
    // The original still works.
    assert_eq!(
        passwordless(&app, &mut original, ORIGIN)
            .await
            .status()
            .as_u16(),
        200
    );
}

#[tokio::test]
async fn a_passkey_is_a_second_factor_for_its_own_user_only() {
    let app = TestApp::spawn().await;
    let (user_id, _, token) = app.user_with_token().await;
    let (other_id, _, _) = app.user_with_token().await;
    let mut device = soft_passkey();
    let created = register(&app, &token, &mut device, "Phone").await;
    let passkeys = &app.state.passkeys;
    let meta = user_service::service::RequestMeta::default();
    use user_service::service::ServiceError;

    // The options list the user's passkeys (not discoverable: the user is known).
    let challenge = passkeys.start_second_factor(user_id).await.unwrap();
    let allowed = challenge.options["allowCredentials"].as_array().unwrap();
    assert_eq!(allowed.len(), 1, "{}", challenge.options);
    let assertion = device.get(ORIGIN, &challenge.options);
    let verified = passkeys
        .finish_second_factor(&meta, user_id, challenge.id, assertion.clone())
        .await
        .unwrap();
    assert_eq!(verified.user_id, user_id);
    assert_eq!(
        verified.passkey_id.to_string(),
        created["id"].as_str().unwrap()
    );
    // Replayed: refused.
    let err = passkeys
        .finish_second_factor(&meta, user_id, challenge.id, assertion)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::InvalidCredentials), "{err:?}");
    assert_eq!(audit_count(&app, "auth.mfa.failed", user_id).await, 1);

    // A challenge started for one user cannot finish another's login, and a user
    // without passkeys is told so.
    let challenge = passkeys.start_second_factor(user_id).await.unwrap();
    let assertion = device.get(ORIGIN, &challenge.options);
    let err = passkeys
        .finish_second_factor(&meta, other_id, challenge.id, assertion.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::InvalidCredentials), "{err:?}");
    let err = passkeys.start_second_factor(other_id).await.unwrap_err();
    assert!(matches!(err, ServiceError::Validation(_)), "{err:?}");
    // The untouched challenge still finishes for its user.
    passkeys
        .finish_second_factor(&meta, user_id, challenge.id, assertion)
        .await
        .unwrap();
    assert_eq!(passkeys.count(user_id).await.unwrap(), 1);

    // Over HTTP the start needs a live mfa_token from the password step.
    let res = post(
        &app,
        "/v1/auth/mfa/webauthn/start",
        None,
        &json!({"mfa_token": "nope"}),
    )
    .await;
    assert_problem(res, 401, "invalid_token").await;
}

#[tokio::test]
async fn a_ceremony_started_on_one_replica_finishes_on_another() {
    // Two instances from the same variables: one database, one Redis prefix.
    let vars = crate::helpers::test_vars(&crate::helpers::fresh_database().await);
    let first = TestApp::spawn_vars(vars.clone()).await;
    let second = TestApp::spawn_vars(vars).await;
    let (_, _, token) = first.user_with_token().await;
    let mut device = soft_passkey();

    let start = json_of(
        post(
            &first,
            "/v1/users/me/passkeys/register/start",
            Some(&token),
            &json!({}),
        )
        .await,
        200,
    )
    .await;
    let credential = device.create(ORIGIN, &start["options"]);
    let res = post(
        &second,
        "/v1/users/me/passkeys/register/finish",
        Some(&token),
        &json!({"challenge_id": start["challenge_id"], "name": "Laptop", "credential": credential}),
    )
    .await;
    json_of(res, 201).await;

    let (challenge_id, options) = login_start(&second).await;
    let assertion = device.get(ORIGIN, &options);
    assert_eq!(
        login_finish(&first, &challenge_id, &assertion)
            .await
            .status()
            .as_u16(),
        200
    );
    // Used up on the first replica, it is used up on the second.
    let res = login_finish(&second, &challenge_id, &assertion).await;
    assert_problem(res, 401, "invalid_credentials").await;
}

#[test]
fn relying_party_settings_follow_the_environment() {
    use user_service::config::Settings;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |f: &str| {
        let text = std::fs::read_to_string(repo.join(f)).unwrap();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_default()
                .to_string()
        };
        (get("WEBAUTHN_RP_ID"), get("WEBAUTHN_ORIGINS"))
    };
    assert_eq!(
        read(".env.dev"),
        (
            "localhost".into(),
            "http://localhost:3000,http://localhost:3001,http://localhost:5173".into()
        )
    );
    assert_eq!(
        read(".env.production"),
        (
            "stocksblitz.com".into(),
            "https://app.stocksblitz.com".into()
        )
    );
    assert_eq!(
        read(".env.staging"),
        (
            "staging.stocksblitz.com".into(),
            "https://app.staging.stocksblitz.com".into()
        )
    );

    // An origin outside the rp id, or plain http outside development, is a
    // start-up problem with its own line.
    let mut vars = crate::helpers::test_vars("postgres://u@localhost/db");
    vars.insert("WEBAUTHN_RP_ID".into(), "stocksblitz.com".into());
    vars.insert(
        "WEBAUTHN_ORIGINS".into(),
        "https://app.stocksblitz.com,https://evil.example".into(),
    );
    let s = Settings::from_vars(vars.clone()).unwrap();
    let problems = s.problems();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("https://evil.example") && p.contains("not under WEBAUTHN_RP_ID")),
        "{problems:?}"
    );
    // Unset, the origins are the CORS origins.
    vars.remove("WEBAUTHN_ORIGINS");
    vars.insert("WEBAUTHN_RP_ID".into(), "localhost".into());
    let s = Settings::from_vars(vars.clone()).unwrap();
    assert_eq!(s.webauthn_origins(), s.cors_origins());
    // Without CORS origins either (the compose file sets neither), the relying
    // party's own https origin, and the service still starts.
    vars.insert("CORS_ALLOWED_ORIGINS".into(), String::new());
    let bare = Settings::from_vars(vars).unwrap();
    assert_eq!(bare.webauthn_origins(), vec!["https://localhost".to_string()]);
    assert!(bare.problems().is_empty(), "{:?}", bare.problems());
    let shown: HashMap<_, _> = s.effective().into_iter().collect();
    assert_eq!(shown["WEBAUTHN_RP_ID"], "localhost");
}

/// Nothing of a ceremony reaches the service's log, even at debug level: not the
/// challenge, the attestation, the client data, the signature, nor the tokens a
/// passwordless login hands out; and no audit row holds them either.
#[tokio::test]
async fn ceremonies_leave_no_secret_in_the_log_or_the_audit_trail() {
    let port = crate::helpers::free_port();
    let database_url = crate::helpers::fresh_database().await;
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ENV_FILE", ".env.dev")
        .envs(crate::helpers::test_keys().iter().cloned())
        .env("APP_ENV", "development")
        .env("DATABASE_URL", &database_url)
        .env("REDIS_URL", crate::helpers::redis_url())
        .env("REDIS_KEY_PREFIX", format!("test:{}:", Uuid::new_v4().simple()))
        .env("USER_SERVICE_HOST", "127.0.0.1")
        .env("USER_SERVICE_PORT", port.to_string())
        .env("LOG_LEVEL", "debug")
        .env("LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    assert!(crate::helpers::wait_for_port(port).await, "the service starts");
    let app = TestApp::spawn_vars({
        // A second, in-process replica only for the harness's helpers; the
        // requests below all go to the child.
        crate::helpers::test_vars(&database_url)
    })
    .await;
    let child_app = TestApp {
        addr: format!("http://127.0.0.1:{port}"),
        port,
        database_url: database_url.clone(),
        db: app.db.clone(),
        state: app.state.clone(),
        shutdown: app.shutdown.clone(),
        http: reqwest::Client::new(),
        server: None,
    };
    let (_, _, token) = child_app.user_with_token().await;
    let mut device = soft_passkey();
    let start = json_of(
        post(&child_app, "/v1/users/me/passkeys/register/start", Some(&token), &json!({})).await,
        200,
    )
    .await;
    let credential = device.create(ORIGIN, &start["options"]);
    let res = post(
        &child_app,
        "/v1/users/me/passkeys/register/finish",
        Some(&token),
        &json!({"challenge_id": start["challenge_id"], "credential": credential}),
    )
    .await;
    json_of(res, 201).await;
    let (challenge_id, options) = login_start(&child_app).await;
    let assertion = device.get(ORIGIN, &options);
    let login = json_of(login_finish(&child_app, &challenge_id, &assertion).await, 200).await;
    // A refused one (replayed) logs its refusal, not its content.
    assert_eq!(login_finish(&child_app, &challenge_id, &assertion).await.status().as_u16(), 401);
    let wrong = device.get("http://localhost:9999", &login_start(&child_app).await.1);
    let _ = login_finish(&child_app, &login_start(&child_app).await.0, &wrong).await;

    let mut child = child;
    let _ = child.start_kill();
    let out = child.wait_with_output().await.unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("passkey"), "debug logging ran: {log}");
    let audit: String = sqlx::query_scalar(
        "select coalesce(string_agg(concat_ws(' ', actor_id, action, target_id, details::text), '\n'), '') from audit_logs",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let secrets = [
        ("registration challenge", start["options"]["challenge"].as_str().unwrap()),
        ("login challenge", options["challenge"].as_str().unwrap()),
        ("attestation", credential["response"]["attestationObject"].as_str().unwrap()),
        ("client data", assertion["response"]["clientDataJSON"].as_str().unwrap()),
        ("signature", assertion["response"]["signature"].as_str().unwrap()),
        ("authenticator data", assertion["response"]["authenticatorData"].as_str().unwrap()),
        ("access token", login["access_token"].as_str().unwrap()),
        ("refresh token", login["refresh_token"].as_str().unwrap()),
    ];
    for (what, value) in secrets {
        assert!(!log.contains(value), "the {what} is in the log");
        assert!(!audit.contains(value), "the {what} is in the audit trail");
    }
}
