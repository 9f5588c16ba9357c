//! What the second-factor tests share: a user who enrols TOTP through the real
//! routes, TOTP codes computed here from the enrolment's base32 secret (RFC
//! 6238, independent of the service's own code), and the two-step login.

#![allow(dead_code)]

use base64::Engine as _;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{TestApp, STRONG_PASSWORD};

pub fn email() -> String {
    format!(
        "m{}@example.com",
        &Uuid::new_v4().simple().to_string()[..12]
    )
}

fn now_step() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 30
}

/// The code of `step` for a base32 secret, computed with totp-rs.
pub fn code_at(secret_b32: &str, step: u64) -> String {
    let secret = totp_rs::Secret::Encoded(secret_b32.to_string())
        .to_bytes()
        .expect("base32 secret");
    let t =
        totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 0, 30, secret, None, "x".into()).unwrap();
    t.generate(step * 30)
}

/// A user with TOTP, who remembers which time step was used last so every
/// code it hands out is one the service will accept (a code is accepted once,
/// and never one older than a code already used).
pub struct MfaUser {
    pub id: Uuid,
    pub email: String,
    pub secret: String,
    pub recovery_codes: Vec<String>,
    /// The access token of the (password-only) session that enrolled.
    pub enrol_token: String,
    last_step: Option<u64>,
}

impl MfaUser {
    /// The next acceptable code: the earliest step within one step of now and
    /// after the last one used; waits for the clock when none is left.
    pub async fn next_code(&mut self) -> String {
        loop {
            let now = now_step();
            let lowest = now - 1;
            let step = match self.last_step {
                Some(l) if l > now => None,
                Some(l) => Some((l + 1).max(lowest)),
                None => Some(lowest),
            };
            if let Some(step) = step {
                self.last_step = Some(step);
                return code_at(&self.secret, step);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// A code that was already accepted (for replay tests).
    pub fn last_code(&self) -> String {
        code_at(&self.secret, self.last_step.expect("a code was used"))
    }
}

pub async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new().request(method, app.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

pub async fn json_of(res: reqwest::Response, status: u16) -> Value {
    let got = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    body
}

/// Registers, logs in with the password, enrols and confirms TOTP.
pub async fn mfa_user(app: &TestApp) -> MfaUser {
    let email = email();
    let user = app.register(&email, STRONG_PASSWORD).await;
    let id = user["id"].as_str().unwrap().parse().unwrap();
    let token = app.login(&email, STRONG_PASSWORD).await;
    let enrol = json_of(
        send(
            app,
            reqwest::Method::POST,
            "/v1/users/me/mfa/totp",
            Some(&token),
            None,
        )
        .await,
        201,
    )
    .await;
    let mut u = MfaUser {
        id,
        email,
        secret: enrol["secret"].as_str().unwrap().to_string(),
        recovery_codes: Vec::new(),
        enrol_token: token.clone(),
        last_step: None,
    };
    let code = u.next_code().await;
    let confirmed = json_of(
        send(
            app,
            reqwest::Method::POST,
            "/v1/users/me/mfa/totp/confirm",
            Some(&token),
            Some(json!({ "code": code })),
        )
        .await,
        200,
    )
    .await;
    u.recovery_codes = confirmed["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    u
}

/// The password step: `(status, body)`.
pub async fn password_step(app: &TestApp, email: &str, password: &str) -> (u16, Value) {
    let res = send(
        app,
        reqwest::Method::POST,
        "/v1/auth/login",
        None,
        Some(json!({ "email": email, "password": password })),
    )
    .await;
    let status = res.status().as_u16();
    assert!(
        res.headers().get("set-cookie").is_none() || status == 200,
        "no cookie on a refusal"
    );
    (status, res.json().await.unwrap())
}

/// The second step as is.
pub async fn mfa_step(
    app: &TestApp,
    mfa_token: &str,
    method: &str,
    code: &str,
) -> reqwest::Response {
    send(
        app,
        reqwest::Method::POST,
        "/v1/auth/mfa",
        None,
        Some(json!({ "mfa_token": mfa_token, "method": method, "code": code })),
    )
    .await
}

/// Both steps with TOTP: the login body.
pub async fn full_login(app: &TestApp, u: &mut MfaUser) -> Value {
    let (status, first) = password_step(app, &u.email, STRONG_PASSWORD).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["mfa_required"], true, "{first}");
    let code = u.next_code().await;
    json_of(
        mfa_step(app, first["mfa_token"].as_str().unwrap(), "totp", &code).await,
        200,
    )
    .await
}

/// The claims of a JWT (not verified: the service signed it).
pub fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

pub async fn audit_count(app: &TestApp, action: &str) -> i64 {
    sqlx::query_scalar("select count(*) from audit_logs where action = $1")
        .bind(action)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

pub fn password() -> &'static str {
    STRONG_PASSWORD
}
