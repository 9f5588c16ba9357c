//! Broker credentials: never in a response or a log line, sealed so that equal
//! secrets differ and tampering fails closed, and re-encrypted to a new key.

use std::sync::{Arc, Mutex};

use serde_json::json;
use tonic::Code;
use user_service::proto::account_service_client::AccountServiceClient;
use user_service::proto::user_service_client::UserServiceClient;
use user_service::proto::{
    GetBrokerCredentialsRequest, GetTradingAccountRequest, ListUserAccountsRequest,
};
use uuid::Uuid;

use crate::helpers::TestApp;

use super::{account_client, audit_count, call, create_account, json_ok, put_credentials, team};

const NEW_KEY: &str = "new:3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs=";

/// Collects every log line the service writes while the test runs.
#[derive(Clone, Default)]
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// current_thread: the server's tasks run on this thread, so the thread-local
// subscriber below sees everything the service logs.
#[tokio::test(flavor = "current_thread")]
async fn credential_canary_never_leaks_but_reaches_the_credentials_client() {
    let sink = LogSink::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = TestApp::spawn().await;
    let t = team(&app).await;
    let a = t.account;
    let canary = format!("CANARY-{}", Uuid::new_v4());
    let secret = format!("{canary}-secret");
    let token = format!("{canary}-token");
    let mut responses = String::new();

    assert_eq!(
        put_credentials(
            &app,
            &t.owner.1,
            a,
            json!({"api_key": canary, "api_secret": secret, "access_token": token})
        )
        .await,
        204
    );
    let reads = [
        format!("/v1/trading-accounts/{a}"),
        "/v1/trading-accounts".to_string(),
        "/v1/users/me/accounts".to_string(),
        format!("/v1/trading-accounts/{a}/credentials"),
        format!("/v1/trading-accounts/{a}/members"),
    ];
    for path in &reads {
        let res = call(&app, reqwest::Method::GET, path, &t.owner.1, None).await;
        assert_eq!(res.status().as_u16(), 200, "{path}");
        responses.push_str(&res.text().await.unwrap());
    }
    let status = json_ok(
        call(
            &app,
            reqwest::Method::GET,
            &format!("/v1/trading-accounts/{a}/credentials"),
            &t.owner.1,
            None,
        )
        .await,
        200,
    )
    .await;
    assert_eq!(status["has_credentials"], true);
    assert!(status["credentials_updated_at"].is_string());
    let tail: String = canary
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert_eq!(status["credentials_hint"], format!("••••{tail}"));
    // A viewer's refused read, a validation error echoing nothing.
    responses.push_str(
        &call(
            &app,
            reqwest::Method::GET,
            &format!("/v1/trading-accounts/{a}/credentials"),
            &t.viewer.1,
            None,
        )
        .await
        .text()
        .await
        .unwrap(),
    );
    responses.push_str(
        &call(
            &app,
            reqwest::Method::PUT,
            &format!("/v1/trading-accounts/{a}/credentials"),
            &t.owner.1,
            Some(json!({"api_key": canary, "api_secret": secret, "extra": canary})),
        )
        .await
        .text()
        .await
        .unwrap(),
    );

    // gRPC account reads carry no credentials; GetBrokerCredentials does.
    let mut reader = account_client(&app, &["accounts:read", "users:read"]).await;
    let acct = reader
        .get_trading_account(GetTradingAccountRequest {
            account_id: a.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    responses.push_str(&format!("{acct:?}"));
    let mut users = UserServiceClient::new(
        app.grpc_with_token(&app.service_token(&["users:read"]).await)
            .await,
    );
    let listed = users
        .list_user_accounts(ListUserAccountsRequest {
            user_id: t.owner.0.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    responses.push_str(&format!("{listed:?}"));
    // Without credentials:read: PERMISSION_DENIED.
    let err = reader
        .get_broker_credentials(GetBrokerCredentialsRequest {
            account_id: a.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let (client_id, client_secret) = app.service_client(&["credentials:read"]).await;
    let res = reqwest::Client::new()
        .post(app.url("/v1/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", client_secret.as_str()),
        ])
        .send()
        .await
        .unwrap();
    let svc_token = json_ok(res, 200).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut creds_client = AccountServiceClient::new(app.grpc_with_token(&svc_token).await);
    let creds = creds_client
        .get_broker_credentials(GetBrokerCredentialsRequest {
            account_id: a.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .credentials
        .unwrap();
    assert_eq!(creds.api_key, canary);
    assert_eq!(creds.api_secret, secret);
    assert_eq!(creds.access_token, token);
    // Each read is audited with the client's id.
    assert_eq!(
        audit_count(&app, "trading_account.credentials.read", Some(&client_id)).await,
        1
    );

    assert!(!responses.contains(&canary), "a response leaked the canary");
    let audit: Vec<String> = sqlx::query_scalar(
        "select concat_ws(' ', actor_id, action, target_id, ip, user_agent, details::text) from audit_logs",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert!(audit.len() > 5);
    assert!(
        audit.iter().all(|row| !row.contains(&canary)),
        "an audit row leaked the canary"
    );
    let stored: Vec<String> =
        sqlx::query_scalar("select row_to_json(t)::text from trading_accounts t")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert!(
        stored.iter().all(|r| !r.contains("CANARY")),
        "plaintext at rest"
    );
    let logs = String::from_utf8_lossy(&sink.0.lock().unwrap()).to_string();
    assert!(!logs.is_empty(), "the log capture saw the service");
    assert!(!logs.contains(&canary), "a log line leaked the canary");
}

async fn ciphertexts(app: &TestApp, account: Uuid) -> (Vec<u8>, Vec<u8>, String) {
    sqlx::query_as(
        "select api_key_ciphertext, api_secret_ciphertext, credentials_key_id from trading_accounts where id = $1",
    )
    .bind(account)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn same_secret_encrypts_differently_and_tampering_fails_closed() {
    let app = TestApp::spawn().await;
    let (_, _, owner) = app.user_with_token().await;
    let a = create_account(&app, &owner, "T1").await;
    let b = create_account(&app, &owner, "T2").await;
    let creds = json!({"api_key": "same-api-key-1234", "api_secret": "same-secret"});
    assert_eq!(put_credentials(&app, &owner, a, creds.clone()).await, 204);
    let (key1, secret1, kid) = ciphertexts(&app, a).await;
    assert_eq!(put_credentials(&app, &owner, a, creds.clone()).await, 204);
    let (key2, secret2, _) = ciphertexts(&app, a).await;
    let ring = &crate::helpers::test_vars("")["CREDENTIALS_ENCRYPTION_KEYS"];
    assert_eq!(Some(kid.as_str()), ring.split(':').next());
    assert_ne!(key1, key2, "a fresh nonce per write");
    assert_ne!(secret1, secret2);
    assert_eq!(
        key1.len(),
        12 + "same-api-key-1234".len() + 16,
        "nonce || ciphertext || tag"
    );
    assert_eq!(put_credentials(&app, &owner, b, creds).await, 204);

    let mut client = account_client(&app, &["credentials:read"]).await;
    let get = |id: Uuid| GetBrokerCredentialsRequest {
        account_id: id.to_string(),
    };
    assert_eq!(
        client
            .get_broker_credentials(get(a))
            .await
            .unwrap()
            .into_inner()
            .credentials
            .unwrap()
            .api_secret,
        "same-secret"
    );

    // One flipped bit in the stored secret: refused, audited, nothing returned.
    sqlx::query(
        "update trading_accounts set api_secret_ciphertext =
            set_byte(api_secret_ciphertext, 14, get_byte(api_secret_ciphertext, 14) # 1)
          where id = $1",
    )
    .bind(a)
    .execute(&app.db)
    .await
    .unwrap();
    let err = client.get_broker_credentials(get(a)).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("integrity"));
    assert_eq!(
        audit_count(&app, "trading_account.credentials.decrypt_failed", None).await,
        1
    );

    // Another row's ciphertext does not open here: the account id is bound in.
    sqlx::query(
        "update trading_accounts set api_key_ciphertext = (select api_key_ciphertext from trading_accounts where id = $1),
                api_secret_ciphertext = (select api_secret_ciphertext from trading_accounts where id = $1)
          where id = $2",
    )
    .bind(b)
    .bind(a)
    .execute(&app.db)
    .await
    .unwrap();
    let err = client.get_broker_credentials(get(a)).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    // Nor does one field's ciphertext in another field of the same row.
    sqlx::query(
        "update trading_accounts set api_secret_ciphertext = api_key_ciphertext where id = $1",
    )
    .bind(b)
    .execute(&app.db)
    .await
    .unwrap();
    let err = client.get_broker_credentials(get(b)).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    assert_eq!(
        audit_count(&app, "trading_account.credentials.decrypt_failed", None).await,
        3
    );
    assert_eq!(
        audit_count(&app, "trading_account.credentials.read", None).await,
        1
    );
}

#[tokio::test]
async fn reencryption_moves_every_value_to_the_new_key() {
    let app = TestApp::spawn().await;
    let (_, _, owner) = app.user_with_token().await;
    let mut accounts = Vec::new();
    for i in 0..3 {
        let a = create_account(&app, &owner, &format!("R{i}")).await;
        let creds = json!({"api_key": format!("api-key-value-{i}"), "api_secret": format!("secret-{i}"), "access_token": "tok"});
        assert_eq!(put_credentials(&app, &owner, a, creds).await, 204);
        accounts.push(a);
    }
    let before_updated: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        sqlx::query_scalar("select credentials_updated_at from trading_accounts order by id")
            .fetch_all(&app.db)
            .await
            .unwrap();

    // A replica with the new key first, the old one still present.
    let mut vars = crate::helpers::test_vars(&app.database_url);
    let old_key = vars["CREDENTIALS_ENCRYPTION_KEYS"].clone();
    vars.insert(
        "CREDENTIALS_ENCRYPTION_KEYS".into(),
        format!("{NEW_KEY},{old_key}"),
    );
    let rotated = TestApp::spawn_vars(vars.clone()).await;
    let summary = rotated
        .services
        .accounts
        .reencrypt_credentials()
        .await
        .unwrap();
    assert_eq!(summary.active_key_id, "new");
    assert_eq!(summary.candidates, 3);
    assert_eq!(summary.reencrypted, 3);
    assert!(summary.failed.is_empty());
    // Safe to run again: nothing left to move.
    let again = rotated
        .services
        .accounts
        .reencrypt_credentials()
        .await
        .unwrap();
    assert_eq!((again.candidates, again.reencrypted), (0, 0));
    let kids: Vec<String> = sqlx::query_scalar(
        "select credentials_key_id from trading_accounts where credentials_key_id is not null",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(kids, ["new", "new", "new"]);
    let after_updated: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        sqlx::query_scalar("select credentials_updated_at from trading_accounts order by id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        before_updated, after_updated,
        "the credentials themselves did not change"
    );
    assert_eq!(
        audit_count(
            &app,
            "trading_account.credentials.reencrypted",
            Some("reencrypt-credentials")
        )
        .await,
        3
    );

    // The old key removed: everything still opens.
    vars.insert("CREDENTIALS_ENCRYPTION_KEYS".into(), NEW_KEY.into());
    vars.insert(
        "REDIS_KEY_PREFIX".into(),
        format!("test:{}:", Uuid::new_v4().simple()),
    );
    let new_only = TestApp::spawn_vars(vars).await;
    let mut client = account_client(&new_only, &["credentials:read"]).await;
    for (i, a) in accounts.iter().enumerate() {
        let c = client
            .get_broker_credentials(GetBrokerCredentialsRequest {
                account_id: a.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
            .credentials
            .unwrap();
        assert_eq!(c.api_key, format!("api-key-value-{i}"));
        assert_eq!(c.api_secret, format!("secret-{i}"));
        assert_eq!(c.access_token, "tok");
    }
    // And the replica that only knows the old key now fails closed.
    let mut old_client = account_client(&app, &["credentials:read"]).await;
    let err = old_client
        .get_broker_credentials(GetBrokerCredentialsRequest {
            account_id: accounts[0].to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
}
