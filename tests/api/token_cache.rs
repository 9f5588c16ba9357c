//! Issue 13: access tokens, sessions, users and accounts answered from each
//! replica's own caches, and every revocation still reaching VerifyToken and the
//! gateway on every replica within one second — over Redis, over PostgreSQL
//! NOTIFY when Redis is down — while a PostgreSQL outage leaves recently verified
//! keys and tokens verifying for a bounded time.

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::PgPool;
use tonic::Code;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::{VerifyApiKeyRequest, VerifyTokenRequest, VerifyTokenResponse};
use user_service::service::invalidation::Change;
use uuid::Uuid;

use crate::helpers::{
    fresh_database, get_bearer, logout_bearer, test_vars, AuthedChannel, TestApp, STRONG_PASSWORD,
};

type Verifier = AuthServiceClient<AuthedChannel>;

/// Runs `sql` (one `$1` text parameter) with triggers off, so no NOTIFY is sent:
/// a change the service is never told about.
pub async fn without_triggers(db: &PgPool, sql: &str, param: &str) {
    let mut tx = db.begin().await.unwrap();
    sqlx::query("set local session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(sql)
        .bind(param)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Polls `seen` until it holds; fails if that takes a second or more.
async fn within_a_second<F, Fut>(what: &str, mut seen: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if seen().await {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{what}: not seen by the other replica after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn verifier(app: &TestApp) -> Verifier {
    let token = app.service_token(&["auth:verify"]).await;
    AuthServiceClient::new(app.grpc_with_token(&token).await)
}

async fn verify_token(v: &mut Verifier, token: &str) -> VerifyTokenResponse {
    v.verify_token(VerifyTokenRequest {
        token: token.into(),
    })
    .await
    .expect("an answer, not an error")
    .into_inner()
}

async fn me_status(app: &TestApp, token: &str) -> u16 {
    get_bearer(app, "/v1/users/me", token)
        .await
        .status()
        .as_u16()
}

/// Both ways in answer `valid` / 200 (twice, so the second is a cache hit).
async fn warm(app: &TestApp, v: &mut Verifier, token: &str) -> VerifyTokenResponse {
    for _ in 0..2 {
        assert!(verify_token(v, token).await.valid);
        assert_eq!(me_status(app, token).await, 200);
    }
    verify_token(v, token).await
}

/// VerifyToken refuses and the gateway answers 401.
async fn refused(app: &TestApp, mut v: Verifier, token: &str) -> bool {
    !verify_token(&mut v, token).await.valid && me_status(app, token).await == 401
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut b = reqwest::Client::new()
        .request(method, app.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        b = b.json(&body);
    }
    let res = b.send().await.unwrap();
    let status = res.status().as_u16();
    let body = res.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// A new user's access token and API key: (token, key id, key).
async fn user_with_key(app: &TestApp) -> (String, Uuid, String) {
    let (_, _, token) = app.user_with_token().await;
    let (status, key) = send(
        app,
        reqwest::Method::POST,
        "/v1/api-keys",
        &token,
        Some(json!({"name": "k", "scopes": ["orders:read"]})),
    )
    .await;
    assert_eq!(status, 201, "{key}");
    let id = key["id"].as_str().unwrap().parse().unwrap();
    (token, id, key["key"].as_str().unwrap().to_string())
}

async fn verify_key(mut v: Verifier, key: String) -> Result<bool, tonic::Status> {
    v.verify_api_key(VerifyApiKeyRequest {
        api_key: key,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().valid)
}

async fn two_replicas(
    adjust: impl FnOnce(&mut std::collections::HashMap<String, String>),
) -> (TestApp, TestApp) {
    let mut vars = test_vars(&fresh_database().await);
    adjust(&mut vars);
    let first = TestApp::spawn_vars(vars.clone()).await;
    let second = TestApp::spawn_vars(vars).await;
    (first, second)
}

/// An admin's access token on `app`.
async fn admin_token(app: &TestApp) -> String {
    let (id, email, _) = app.user_with_token().await;
    app.make_admin(id).await;
    app.login(&email, STRONG_PASSWORD).await
}

#[tokio::test]
async fn repeat_tokens_are_answered_from_the_replicas_own_cache() {
    let app = TestApp::spawn_with(|v| {
        v.insert("TOKEN_CACHE_TTL_SECONDS".into(), "2".into());
    })
    .await;
    let mut v = verifier(&app).await;
    let (_, _, token) = app.user_with_token().await;
    let sid = warm(&app, &mut v, &token).await.session_id;

    // Ended behind the service's back, with no message on either channel: only
    // a cache answers `valid` now, and only until its lifetime ends.
    without_triggers(
        &app.db,
        "update sessions set revoked_at = now(), revoked_reason = 'ended' where id = $1::uuid",
        &sid,
    )
    .await;
    let written = Instant::now();
    assert!(verify_token(&mut v, &token).await.valid, "not cached");
    assert_eq!(me_status(&app, &token).await, 200, "not cached");
    tokio::time::sleep(Duration::from_millis(2200).saturating_sub(written.elapsed())).await;
    let r = verify_token(&mut v, &token).await;
    assert!(!r.valid, "the cache outlived TOKEN_CACHE_TTL_SECONDS");
    assert_eq!(me_status(&app, &token).await, 401);

    // A token that does not verify is never served from the cache.
    assert!(!verify_token(&mut v, &format!("{token}x")).await.valid);
}

#[tokio::test]
async fn every_revocation_reaches_the_other_replica_within_a_second() {
    let (a, b) = two_replicas(|_| {}).await;
    let mut vb = verifier(&b).await;
    let admin = admin_token(&a).await;

    // Logout.
    let (_, _, t) = a.user_with_token().await;
    warm(&b, &mut vb, &t).await;
    assert_eq!(logout_bearer(&a, &t).await.status(), 204);
    within_a_second("logout", || refused(&b, vb.clone(), &t)).await;

    // Ending one session from another.
    let (_, email, t1) = a.user_with_token().await;
    let t2 = a.login(&email, STRONG_PASSWORD).await;
    let sid1 = warm(&b, &mut vb, &t1).await.session_id;
    let (status, _) = send(
        &a,
        reqwest::Method::DELETE,
        &format!("/v1/users/me/sessions/{sid1}"),
        &t2,
        None,
    )
    .await;
    assert_eq!(status, 204);
    within_a_second("ended session", || refused(&b, vb.clone(), &t1)).await;

    // A password change ends the other sessions.
    let (_, email, t1) = a.user_with_token().await;
    let t2 = a.login(&email, STRONG_PASSWORD).await;
    warm(&b, &mut vb, &t1).await;
    let (status, body) = send(
        &a,
        reqwest::Method::POST,
        "/v1/users/me/password",
        &t2,
        Some(json!({"current_password": STRONG_PASSWORD,
                    "new_password": "another Correct horse 93 battery"})),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    within_a_second("password change", || refused(&b, vb.clone(), &t1)).await;

    // Disabling the user.
    let (id, _, t) = a.user_with_token().await;
    warm(&b, &mut vb, &t).await;
    let (status, body) = send(
        &a,
        reqwest::Method::PATCH,
        &format!("/v1/admin/users/{id}"),
        &admin,
        Some(json!({"status": "disabled"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    within_a_second("disabled user", || refused(&b, vb.clone(), &t)).await;

    // A role taken away: the gateway forbids, VerifyToken no longer lists it.
    let (id, email, _) = a.user_with_token().await;
    a.make_admin(id).await;
    let t = a.login(&email, STRONG_PASSWORD).await;
    let roles = warm(&b, &mut vb, &t).await.user.unwrap().roles;
    assert!(roles.contains(&"admin".to_string()), "{roles:?}");
    assert_eq!(get_bearer(&b, "/v1/admin/users", &t).await.status(), 200);
    let (status, body) = send(
        &a,
        reqwest::Method::PATCH,
        &format!("/v1/admin/users/{id}"),
        &admin,
        Some(json!({"roles": ["user"]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    within_a_second("role change", || {
        let (b, mut vb, t) = (&b, vb.clone(), t.clone());
        async move {
            let r = verify_token(&mut vb, &t).await;
            r.valid
                && !r.user.unwrap().roles.contains(&"admin".to_string())
                && get_bearer(b, "/v1/admin/users", &t).await.status() == 403
        }
    })
    .await;

    // A membership ended: the account leaves the member's VerifyToken answer.
    let (_, _, owner) = a.user_with_token().await;
    let (member_id, member_email, member) = a.user_with_token().await;
    let (status, acct) = send(
        &a,
        reqwest::Method::POST,
        "/v1/trading-accounts",
        &owner,
        Some(json!({"broker": "zerodha", "broker_user_id": "AB1234", "nickname": "main"})),
    )
    .await;
    assert_eq!(status, 201, "{acct}");
    let account = acct["id"].as_str().unwrap().to_string();
    // Invited, then accepted by the member (membership takes consent).
    crate::accounts::add_member(
        &a,
        &owner,
        account.parse().unwrap(),
        &member_email,
        "trader",
        &member,
    )
    .await;
    let has_account = |r: &VerifyTokenResponse| {
        r.accounts
            .iter()
            .any(|x| x.account.as_ref().is_some_and(|acc| acc.id == account))
    };
    within_a_second("membership added", || {
        let (mut vb, member) = (vb.clone(), member.clone());
        async move { has_account(&verify_token(&mut vb, &member).await) }
    })
    .await;
    let (status, body) = send(
        &a,
        reqwest::Method::DELETE,
        &format!("/v1/trading-accounts/{account}/members/{member_id}"),
        &owner,
        None,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    within_a_second("membership ended", || {
        let (mut vb, member) = (vb.clone(), member.clone());
        async move {
            let r = verify_token(&mut vb, &member).await;
            r.valid && !has_account(&r)
        }
    })
    .await;
}

#[tokio::test]
async fn with_redis_down_revocations_still_reach_the_other_replica_within_a_second() {
    // A Redis of this test's own, which it stops (never the shared one).
    let Some(mut redis) = crate::api_keys::PrivateRedis::start().await else {
        panic!("redis-server is needed for this test");
    };
    let (a, b) = two_replicas(|v| {
        v.insert(
            "REDIS_URL".into(),
            format!("redis://127.0.0.1:{}/0", redis.port),
        );
    })
    .await;
    let mut vb = verifier(&b).await;
    let (_, _, t) = a.user_with_token().await;
    let (t2, key_id, secret) = user_with_key(&a).await;
    let key_valid =
        |vb: Verifier, secret: String| async move { verify_key(vb, secret).await.unwrap() };
    warm(&b, &mut vb, &t).await;
    assert!(key_valid(vb.clone(), secret.clone()).await);
    assert!(key_valid(vb.clone(), secret.clone()).await);

    redis.stop();

    assert_eq!(logout_bearer(&a, &t).await.status(), 204);
    within_a_second("logout with Redis down", || refused(&b, vb.clone(), &t)).await;

    let (status, body) = send(
        &a,
        reqwest::Method::DELETE,
        &format!("/v1/api-keys/{key_id}"),
        &t2,
        None,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    within_a_second("key revoked with Redis down", || {
        let (vb, secret) = (vb.clone(), secret.clone());
        async move { !key_valid(vb, secret).await }
    })
    .await;
}

/// A TCP relay to the shared PostgreSQL that the test can cut, so the service
/// loses its database while nobody else's does.
struct DbRelay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl DbRelay {
    async fn start(target: u16) -> DbRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        DbRelay { port, task }
    }

    /// Closes the listener and every relayed connection (the JoinSet aborts
    /// its tasks when dropped with the accept loop).
    fn cut(&self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_database_outage_leaves_recent_keys_and_tokens_verifying_within_a_bound() {
    let real = fresh_database().await;
    let mut url = url::Url::parse(&real).unwrap();
    let relay = DbRelay::start(url.port().unwrap_or(5432)).await;
    url.set_port(Some(relay.port)).unwrap();
    let mut vars = test_vars(url.as_str());
    for (k, val) in [
        ("API_KEY_CACHE_TTL_SECONDS", "1"),
        ("TOKEN_CACHE_TTL_SECONDS", "1"),
        ("CACHE_STALE_SECONDS", "4"),
        ("DATABASE_ACQUIRE_TIMEOUT_MS", "300"),
    ] {
        vars.insert(k.into(), val.into());
    }
    let app = TestApp::spawn_vars(vars).await;
    let mut v = verifier(&app).await;
    let (_, _, t) = app.user_with_token().await;
    let (t2, key_id, secret) = user_with_key(&app).await;
    assert!(verify_key(v.clone(), secret.clone()).await.unwrap());

    // An unrelated write of the key's owner (a new name) keeps the key cached.
    let lookups = app.services.api_keys.db_lookups();
    let (status, body) = send(
        &app,
        reqwest::Method::PATCH,
        "/v1/users/me",
        &t2,
        Some(json!({"full_name": "New Name"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(verify_key(v.clone(), secret.clone()).await.unwrap());
    assert_eq!(
        app.services.api_keys.db_lookups(),
        lookups,
        "the key left the cache"
    );

    let (_, _, t3) = app.user_with_token().await;
    let sid3: Uuid = warm(&app, &mut v, &t3).await.session_id.parse().unwrap();
    let r = warm(&app, &mut v, &t).await;
    assert!(r.valid);
    assert!(verify_key(v.clone(), secret.clone()).await.unwrap());

    relay.cut();
    let cut = Instant::now();
    // Past the fresh lifetime (1 s): the copies verified before the outage hold.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        assert!(
            verify_token(&mut v, &t).await.valid,
            "token dropped in the outage"
        );
        assert_eq!(me_status(&app, &t).await, 200);
        assert!(
            verify_key(v.clone(), secret.clone()).await.unwrap(),
            "key dropped in the outage"
        );
    }

    // A revocation received during the outage applies at once: there is nothing
    // to fall back on, so the answer is "cannot tell", never `valid`.
    app.services
        .invalidation
        .publish(Change::Session(sid3))
        .await;
    let err = v
        .verify_token(VerifyTokenRequest { token: t3.clone() })
        .await
        .expect_err("a revoked session is not served stale");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(me_status(&app, &t3).await, 503);
    app.services
        .invalidation
        .publish(Change::ApiKey(key_id))
        .await;
    let err = verify_key(v.clone(), secret.clone())
        .await
        .expect_err("a revoked key is not served stale");
    assert_eq!(err.code(), Code::Unavailable);

    // And the stale bound holds: 1 s fresh + 4 s stale after the last load.
    tokio::time::sleep(Duration::from_millis(5600).saturating_sub(cut.elapsed())).await;
    let err = v
        .verify_token(VerifyTokenRequest { token: t.clone() })
        .await
        .expect_err("served past CACHE_STALE_SECONDS");
    assert_eq!(err.code(), Code::Unavailable);
}

/// The `sb_session=…` pair a response sets.
fn session_cookie(res: &reqwest::Response) -> String {
    let set = res.headers()["set-cookie"].to_str().unwrap();
    set.split(';').next().unwrap().to_string()
}

async fn me_with_cookie(app: &TestApp, cookie: &str) -> u16 {
    reqwest::Client::new()
        .get(app.url("/v1/users/me"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_rotated_or_ended_session_cookie_is_refused_by_the_other_replica_within_a_second() {
    let (a, b) = two_replicas(|_| {}).await;
    let (_, email, _) = a.user_with_token().await;
    let login = crate::helpers::login_raw(&a, &email, STRONG_PASSWORD).await;
    assert_eq!(login.status(), 200);
    let cookie = session_cookie(&login);
    let body: Value = login.json().await.unwrap();
    for _ in 0..2 {
        assert_eq!(me_with_cookie(&b, &cookie).await, 200);
    }

    // Rotated on the first replica: the old value is dead on the second.
    let res = reqwest::Client::new()
        .post(a.url("/v1/auth/refresh"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rotated = session_cookie(&res);
    within_a_second("rotated cookie", || async {
        me_with_cookie(&b, &cookie).await == 401
    })
    .await;
    assert_eq!(me_with_cookie(&b, &rotated).await, 200);

    // The session ended on the first replica: the current cookie dies too.
    let access = body["access_token"].as_str().unwrap();
    assert_eq!(logout_bearer(&a, access).await.status(), 204);
    within_a_second("ended session's cookie", || async {
        me_with_cookie(&b, &rotated).await == 401
    })
    .await;
}

/// Every verification allocates its future and copies it as it is built, so the
/// hot paths' futures must not carry the state of branches they rarely take: a
/// Redis command's future is ~6.6 KB and a database write's ~1.5 KB (release
/// build), and an `async fn` that awaits one inline is at least that large even
/// when the branch never runs. VerifyApiKey's future was 7.5 KB for that
/// reason; all five are 536–848 bytes now, in debug and release builds alike.
#[tokio::test]
async fn the_verification_futures_carry_no_cold_branch_state() {
    use std::mem::size_of_val;
    use user_service::service::api_keys::VerifyRequest;
    use user_service::service::{Caller, RequestMeta};

    const BOUND: usize = 2048;
    let app = TestApp::spawn().await;
    let s = &app.services;
    let caller = Caller::ServiceClient {
        client_id: "edge".into(),
        scopes: vec!["auth:verify".to_string()].into(),
    };
    let (meta, req) = (RequestMeta::default(), VerifyRequest::default());
    let sizes = [
        (
            "ApiKeyService::verify_for_client (VerifyApiKey)",
            size_of_val(&s.api_keys.verify_for_client(&caller, &meta, "k", &req)),
        ),
        (
            "ApiKeyService::authenticate (X-API-Key)",
            size_of_val(&s.api_keys.authenticate("k", None, "op")),
        ),
        (
            "Sessions::verify_token (VerifyToken)",
            size_of_val(&s.sessions.verify_token(&caller, "t")),
        ),
        (
            "Sessions::verify_access_token (bearer)",
            size_of_val(&s.sessions.verify_access_token("t")),
        ),
        (
            "Sessions::verify_session_cookie (cookie)",
            size_of_val(&s.sessions.verify_session_cookie("c")),
        ),
    ];
    println!("{sizes:#?}");
    for (name, size) in sizes {
        assert!(size <= BOUND, "{name}: a future of {size} bytes");
    }
}
