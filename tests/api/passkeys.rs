//! Passkeys (DESIGN §8) through the real HTTP routes, with software
//! authenticators from webauthn-authenticator-rs playing the browser and the
//! device: registration, passwordless login, a wrong origin, a replayed
//! assertion, a cloned authenticator, a passkey as second factor, two replicas.

mod client;
mod hygiene;

use serde_json::{json, Value};
use uuid::Uuid;

use self::client::*;
use crate::helpers::{assert_problem, TestApp};

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
            // A user with a passkey creates keys after a recent second factor
            // (step-up): the passwordless login's token has one.
            Some(access),
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

    // Removing it is a step-up operation: refused with the password session,
    // done with the passwordless one (audited); it logs nobody in any more.
    let res = reqwest::Client::new()
        .delete(app.url(&path))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_problem(res, 403, "mfa_required").await;
    let res = reqwest::Client::new()
        .delete(app.url(&path))
        .bearer_auth(access)
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
        .services
        .passkeys
        .start_second_factor(user_id)
        .await
        .unwrap();
    let assertion = clone.get(ORIGIN, &challenge.options);
    let meta = user_service::service::RequestMeta::default();
    let err = app
        .services
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
    let passkeys = &app.services.passkeys;
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
    // Audited by the flow that asked (POST /v1/auth/mfa or step-up), not twice.
    assert_eq!(audit_count(&app, "auth.mfa.failed", user_id).await, 0);

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
    // A dead mfa_token: 401 invalid_credentials, as on POST /v1/auth/mfa.
    assert_problem(res, 401, "invalid_credentials").await;

    // A step-up starts the same assertion for the signed-in user.
    let res = post(
        &app,
        "/v1/auth/step-up/webauthn/start",
        Some(&token),
        &json!({}),
    )
    .await;
    let start = json_of(res, 200).await;
    let challenge_id = Uuid::parse_str(start["challenge_id"].as_str().unwrap()).unwrap();
    let assertion = device.get(ORIGIN, &start["options"]);
    passkeys
        .finish_second_factor(&meta, user_id, challenge_id, assertion)
        .await
        .unwrap();
    let res = post(&app, "/v1/auth/step-up/webauthn/start", None, &json!({})).await;
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
