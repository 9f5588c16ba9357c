//! The browser and the device for the passkey tests: software authenticators
//! from webauthn-authenticator-rs, and the HTTP calls of each ceremony.

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

use crate::helpers::TestApp;
/// The development front end (WEBAUTHN_ORIGINS in .env.dev).
pub const ORIGIN: &str = "http://localhost:3000";
const TIMEOUT_MS: u32 = 60_000;

/// A passkey provider around a software authenticator. The soft authenticators
/// only sign for credential ids they are given and refuse to store resident
/// keys; a passkey provider keeps every credential it made with its user handle,
/// so this one answers a discoverable request (no allowed credentials) with
/// the credential it holds for the site and returns the user handle, as a
/// phone or password manager does.
pub struct Device<B> {
    pub backend: B,
    /// credential id → user handle
    pub users: HashMap<Vec<u8>, Vec<u8>>,
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
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            users: HashMap::new(),
        }
    }

    /// `navigator.credentials.create({publicKey: options})` at `origin`, as JSON.
    pub fn create(&mut self, origin: &str, options: &Value) -> Value {
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
    pub fn get(&mut self, origin: &str, options: &Value) -> Value {
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
pub fn soft_passkey() -> Device<SoftPasskey> {
    Device::new(SoftPasskey::new(true))
}

pub fn soft_token() -> Device<SoftToken> {
    Device::new(SoftToken::new(true).expect("soft token").0)
}

/// An exact copy of a soft token, keys and signature counter included: a
/// cloned authenticator.
pub fn clone_of(d: &Device<SoftToken>) -> Device<SoftToken> {
    Device {
        backend: SoftToken::from_cbor(&d.backend.to_cbor().unwrap()).unwrap(),
        users: d.users.clone(),
    }
}

pub async fn post(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut req = reqwest::Client::new().post(app.url(path)).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

pub async fn json_of(res: reqwest::Response, status: u16) -> Value {
    let got = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    body
}

/// Registers a passkey for the bearer of `token` from `device` at ORIGIN; the
/// new passkey's JSON.
pub async fn register<B: AuthenticatorBackendHashedClientData>(
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
pub async fn login_start(app: &TestApp) -> (Value, Value) {
    let start = json_of(
        post(app, "/v1/auth/passkey/start", None, &json!({})).await,
        200,
    )
    .await;
    (start["challenge_id"].clone(), start["options"].clone())
}

pub async fn login_finish(
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
pub async fn passwordless<B: AuthenticatorBackendHashedClientData>(
    app: &TestApp,
    device: &mut Device<B>,
    origin: &str,
) -> reqwest::Response {
    let (id, options) = login_start(app).await;
    let credential = device.get(origin, &options);
    login_finish(app, &id, &credential).await
}

pub fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

pub async fn audit_count(app: &TestApp, action: &str, user_id: Uuid) -> i64 {
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
