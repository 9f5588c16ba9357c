//! The notification outbox and its dispatcher, against a stand-in alert service:
//! delivery with the Idempotency-Key and bearer token, retries with backoff, dead
//! messages, rollback, two replicas, and a PostgreSQL restart mid-delivery.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use user_service::domain::recovery::Template;
use user_service::service::notify::notify_to;

use crate::alert_receiver::{to_receiver, Receiver};
use crate::helpers::{fresh_database, test_vars, TestApp, STRONG_PASSWORD};
use crate::own_postgres::OwnPostgres;

fn email() -> String {
    format!(
        "n{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

async fn outbox_row(app: &TestApp, id: &str) -> (String, i32, Value) {
    sqlx::query_as("select status, attempts, data from notification_outbox where id = $1::uuid")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// Waits until the message is in a final state (delivered or dead).
async fn settled(app: &TestApp, id: &str) -> (String, i32, Value) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let row = outbox_row(app, id).await;
        if row.0 != "pending" {
            return row;
        }
        assert!(Instant::now() < deadline, "{id} still pending: {row:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metric(app: &TestApp, template: &str, result: &str) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("notifications_total{")
                && l.contains(&format!("template=\"{template}\""))
                && l.contains(&format!("result=\"{result}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_notification_reaches_the_alert_service_as_the_contract_says() {
    let receiver = Receiver::start().await;
    let app = TestApp::spawn_with(|v| {
        to_receiver(v, &receiver);
        v.insert("ALERT_SERVICE_TOKEN".into(), "alert-bearer-token-1".into());
        v.insert("PUBLIC_APP_URL".into(), "https://app.example.test/".into());
    })
    .await;
    let e = email();
    let user = app.register(&e, STRONG_PASSWORD).await;
    assert_eq!(user["email_verified"], false, "{user}");

    let got = receiver
        .wait_for("email_verification", |b| b["to"] == e.as_str())
        .await;
    let body = &got.body;
    let id = body["id"].as_str().unwrap();
    assert_eq!(
        got.idempotency_key.as_deref(),
        Some(id),
        "Idempotency-Key is the id"
    );
    assert_eq!(
        got.authorization.as_deref(),
        Some("Bearer alert-bearer-token-1")
    );
    assert_eq!(body["template"], "email_verification");
    assert_eq!(body["user_id"], user["id"]);
    assert!(body["created_at"].as_str().unwrap().contains('T'));
    let mut keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["created_at", "data", "id", "template", "to", "user_id"]
    );
    let token = body["data"]["token"].as_str().unwrap();
    assert_eq!(token.len(), 43, "256 bits, base64url");
    assert_eq!(
        body["data"]["link"],
        format!("https://app.example.test/verify-email?token={token}")
    );
    assert!(body["data"]["expires_at"].is_string());

    // Delivered once; the outbox keeps no live token, the user_tokens table only
    // its hash.
    let (status, attempts, data) = settled(&app, id).await;
    assert_eq!((status.as_str(), attempts), ("delivered", 1));
    assert!(
        data.get("token").is_none() && data.get("link").is_none(),
        "{data}"
    );
    let stored: i64 = sqlx::query_scalar(
        "select count(*) from user_tokens where token_hash = sha256(convert_to($1, 'utf8'))",
    )
    .bind(token)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(stored, 1);
    let plain: i64 = sqlx::query_scalar(
        "select count(*) from user_tokens where encode(token_hash, 'escape') like '%' || $1 || '%'",
    )
    .bind(token)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(plain, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.all().len(), 1, "sent exactly once");
    assert!(metric(&app, "email_verification", "queued").await >= 1.0);
    assert!(metric(&app, "email_verification", "delivered").await >= 1.0);
}

#[tokio::test]
async fn refusals_are_retried_with_growing_waits_under_one_idempotency_key() {
    let receiver = Receiver::start().await;
    receiver.refuse_next(3);
    let app = TestApp::spawn_with(|v| to_receiver(v, &receiver)).await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;

    // The fourth attempt is answered 200.
    let deadline = Instant::now() + Duration::from_secs(15);
    while receiver.all().len() < 4 {
        assert!(Instant::now() < deadline, "{:?}", receiver.all());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = receiver.all();
    let id = got[0].body["id"].as_str().unwrap().to_string();
    assert!(got
        .iter()
        .all(|r| r.idempotency_key.as_deref() == Some(id.as_str())));
    assert!(got.iter().all(|r| r.body["id"] == id.as_str()));
    let (status, attempts, _) = settled(&app, &id).await;
    assert_eq!((status.as_str(), attempts), ("delivered", 4));
    // Backoff 100, 200, 400 ms (±20%), plus up to a poll interval each.
    let gaps: Vec<Duration> = got.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps[0] >= Duration::from_millis(75), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(300), "{gaps:?}");
    assert!(gaps[2] > gaps[0], "waits grow: {gaps:?}");
    assert!(metric(&app, "email_verification", "retried").await >= 3.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.all().len(), 4, "nothing after the 200");
}

#[tokio::test]
async fn a_message_refused_max_attempts_times_is_dead_and_keeps_no_token() {
    let receiver = Receiver::start().await;
    receiver.refuse_all(true);
    let app = TestApp::spawn_with(|v| {
        to_receiver(v, &receiver);
        v.insert("NOTIFY_MAX_ATTEMPTS".into(), "3".into());
    })
    .await;
    let e = email();
    app.register(&e, STRONG_PASSWORD).await;
    let got = receiver
        .wait_for("first attempt", |b| b["to"] == e.as_str())
        .await;
    let id = got.body["id"].as_str().unwrap().to_string();
    let (status, attempts, data) = settled(&app, &id).await;
    assert_eq!((status.as_str(), attempts), ("dead", 3));
    assert!(
        data.get("token").is_none() && data.get("link").is_none(),
        "{data}"
    );
    let error: String =
        sqlx::query_scalar("select last_error from notification_outbox where id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(error, "alert service answered 500");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.all().len(), 3, "no attempt after the last");
    assert!(metric(&app, "email_verification", "dead").await >= 1.0);
}

#[tokio::test]
async fn a_change_that_rolls_back_sends_nothing() {
    let receiver = Receiver::start().await;
    let app = TestApp::spawn_with(|v| to_receiver(v, &receiver)).await;
    {
        let mut tx = user_service::store::Db::connect_lazy(&app.settings)
            .unwrap()
            .begin()
            .await
            .unwrap();
        notify_to(
            &mut tx,
            Template::PasswordChanged,
            "rolled@example.com",
            None,
            json!({}),
        )
        .await
        .unwrap();
        // Dropped without commit: rolls back.
    }
    let mut tx = user_service::store::Db::connect_lazy(&app.settings)
        .unwrap()
        .begin()
        .await
        .unwrap();
    notify_to(
        &mut tx,
        Template::PasswordChanged,
        "kept@example.com",
        None,
        json!({}),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    receiver
        .wait_for("committed", |b| b["to"] == "kept@example.com")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.count("password_changed", "rolled@example.com"), 0);
    let rows: i64 = sqlx::query_scalar("select count(*) from notification_outbox")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn two_replicas_deliver_every_message_exactly_once() {
    let receiver = Receiver::start().await;
    // Slow answers keep messages in flight while the other replica polls.
    receiver.delay(Duration::from_millis(100));
    let database_url = fresh_database().await;
    let mut vars = test_vars(&database_url);
    to_receiver(&mut vars, &receiver);
    vars.insert("NOTIFY_POLL_INTERVAL_MS".into(), "10".into());
    let a = TestApp::spawn_vars(vars.clone()).await;
    let b = TestApp::spawn_vars(vars).await;

    let mut tx = user_service::store::Db::connect_lazy(&a.settings)
        .unwrap()
        .begin()
        .await
        .unwrap();
    for i in 0..60 {
        notify_to(
            &mut tx,
            Template::NewSignIn,
            &format!("r{i}@example.com"),
            None,
            json!({"ip": "192.0.2.1", "user_agent": null}),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pending: i64 = sqlx::query_scalar(
            "select count(*) from notification_outbox where status <> 'delivered'",
        )
        .fetch_one(&a.db)
        .await
        .unwrap();
        if pending == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{pending} not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = receiver.all();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *per_id
            .entry(r.body["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_id.len(), 60);
    assert!(
        per_id.values().all(|n| *n == 1),
        "a message was sent twice: {per_id:?}"
    );
    drop(b);
}

#[tokio::test]
async fn a_postgres_restart_mid_delivery_loses_nothing() {
    let Some(pg) = OwnPostgres::init(|_| {}) else {
        eprintln!("SKIPPED a_postgres_restart_mid_delivery…: no PostgreSQL server binaries");
        return;
    };
    pg.start("");
    let url = pg.url("");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    user_service::store::db::MIGRATOR.run(&pool).await.unwrap();
    pool.close().await;
    let receiver = Receiver::start().await;
    let mut vars = test_vars(&url);
    to_receiver(&mut vars, &receiver);
    let app = TestApp::spawn_vars(vars).await;

    // Three messages committed; the first delivery is held at the receiver.
    let (arrived, release) = receiver.hold_next();
    let mut tx = user_service::store::Db::connect_lazy(&app.settings)
        .unwrap()
        .begin()
        .await
        .unwrap();
    for to in ["p1@example.com", "p2@example.com", "p3@example.com"] {
        notify_to(&mut tx, Template::PasswordChanged, to, None, json!({}))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), arrived.notified())
        .await
        .expect("a delivery started");

    // PostgreSQL goes away while the messages are in flight: the dispatcher's
    // transaction (and its record of the delivery) is lost with the connection.
    pg.stop();
    release.notify_one();
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.start("");

    let deadline = Instant::now() + Duration::from_secs(30);
    let statuses = loop {
        let rows: Result<Vec<(String, String)>, _> =
            sqlx::query_as("select recipient, status from notification_outbox order by recipient")
                .fetch_all(&app.db)
                .await;
        if let Ok(rows) = rows {
            if rows.len() == 3 && rows.iter().all(|(_, s)| s == "delivered") {
                break rows;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not all delivered after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(statuses.len(), 3);
    let got = receiver.all();
    let recipients: HashSet<&str> = got.iter().map(|r| r.body["to"].as_str().unwrap()).collect();
    assert_eq!(
        recipients,
        HashSet::from(["p1@example.com", "p2@example.com", "p3@example.com"])
    );
    // What was sent before the restart went again under the same key, so the
    // alert service can tell a repeat from a new message.
    let mut keys: HashMap<&str, HashSet<&str>> = HashMap::new();
    for r in &got {
        keys.entry(r.body["to"].as_str().unwrap())
            .or_default()
            .insert(r.idempotency_key.as_deref().unwrap());
    }
    assert!(keys.values().all(|k| k.len() == 1), "{keys:?}");
    assert!(got.len() > 3, "the held delivery was repeated: {got:?}");
}

/// The settings of section 8 per environment: the defaults by APP_ENV, the env
/// files saying the same, and the log sink refused where it would log tokens.
#[test]
fn environments_choose_the_sink_and_whether_verification_is_required() {
    use user_service::config::Settings;
    let settings = |pairs: &[(&str, &str)]| {
        let mut vars = vec![
            (
                "DATABASE_URL".to_string(),
                "postgres://u@localhost/db".to_string(),
            ),
            ("REDIS_URL".to_string(), "redis://localhost/0".to_string()),
        ];
        vars.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Settings::from_vars(vars).unwrap()
    };
    for (env, file, required, sink) in [
        ("development", ".env.dev", false, "log"),
        ("staging", ".env.staging", true, "http"),
        ("production", ".env.production", true, "http"),
    ] {
        let s = settings(&[("APP_ENV", env)]);
        assert_eq!(s.require_verified_email(), required, "{env}");
        assert_eq!(s.notify_sink().as_str(), sink, "{env}");
        assert_eq!(s.password_reset_ttl_seconds, 1800);
        assert_eq!(s.notify_max_attempts, 8);
        let text =
            std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(
            text.lines()
                .any(|l| l == format!("REQUIRE_VERIFIED_EMAIL={required}")),
            "{file}"
        );
    }
    let prod_log = settings(&[("APP_ENV", "production"), ("NOTIFY_SINK", "log")]);
    assert!(
        prod_log
            .problems()
            .iter()
            .any(|p| p.starts_with("NOTIFY_SINK=log would print password-reset links")),
        "{:?}",
        prod_log.problems()
    );
    let no_url = settings(&[("NOTIFY_SINK", "http")]);
    assert!(no_url
        .problems()
        .contains(&"NOTIFY_SINK=http needs ALERT_SERVICE_URL".to_string()));
    let shown: HashMap<&str, String> = settings(&[("ALERT_SERVICE_TOKEN", "s3cret-token")])
        .effective()
        .into_iter()
        .collect();
    assert_eq!(shown["ALERT_SERVICE_TOKEN"], "***");
    assert_eq!(shown["PUBLIC_APP_URL"], "http://localhost:3000");
}
