//! The usage buffer across a graceful shutdown, floods of made-up keys that must not
//! reach PostgreSQL, and a Redis reconnect dropping the cache.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use user_service::config::Environment;
use user_service::domain::api_key::ApiKeySecret;
use user_service::proto::{VerifyApiKeyRequest, VerifyReason};
use uuid::Uuid;

use crate::helpers::{test_vars, TestApp};

use super::{audit_rows, create_key, reason, req, revoke, send, verifier, verify, PrivateRedis};

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

/// Keys in use are reloaded in batches before they go stale, so no request waits
/// for a revalidation: a change PostgreSQL never announced (triggers off, so no
/// invalidation) arrives within the fresh time, and verification never reads
/// PostgreSQL itself after the first miss. Without the refresh, the first hit past
/// the fresh time reads the key again on the request's path.
#[tokio::test]
async fn keys_in_use_are_reloaded_ahead_of_staleness_off_the_request_path() {
    // 8 s fresh: hits after 6 s queue the key, the refresher runs every second.
    let app = TestApp::spawn_with(|v| {
        v.insert("API_KEY_CACHE_TTL_SECONDS".into(), "8".into());
    })
    .await;
    let (_, _, token) = app.user_with_token().await;
    let k = create_key(
        &app,
        &token,
        json!({"name": "before", "scopes": ["orders:read"]}),
    )
    .await;
    let secret = k["key"].as_str().unwrap().to_string();
    let mut client = verifier(&app).await;
    let first = verify(&mut client, req(&secret)).await;
    assert!(first.valid);
    assert_eq!(first.key.unwrap().name, "before");
    let lookups = app.services.api_keys.db_lookups();
    assert_eq!(lookups, 1);

    crate::token_cache::without_triggers(
        &app.db,
        "update api_keys set name = 'after' where id = $1::uuid",
        k["id"].as_str().unwrap(),
    )
    .await;
    let start = Instant::now();
    let mut renamed_at = None;
    while start.elapsed() < Duration::from_secs(12) {
        let r = verify(&mut client, req(&secret)).await;
        assert!(r.valid);
        if renamed_at.is_none() && r.key.unwrap().name == "after" {
            renamed_at = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renamed_at = renamed_at.expect("the refresh never brought the new name");
    assert!(
        renamed_at < Duration::from_secs(8),
        "the new name arrived after {renamed_at:?}, past the fresh time"
    );
    assert_eq!(
        app.services.api_keys.db_lookups(),
        lookups,
        "a request read the key from PostgreSQL: the refresh did not run ahead"
    );
}
