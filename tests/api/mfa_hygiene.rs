//! The log-hygiene check, extended to second factors (issue 14 point 6): TOTP
//! secrets, codes, recovery codes and `mfa_token`s reach neither the logs
//! (captured at TRACE), nor the audit trail, nor the database in clear.

use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde_json::json;

use crate::helpers::{TestApp, STRONG_PASSWORD};
use crate::mfa_support::*;

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
// subscriber sees everything the service logs.
#[tokio::test(flavor = "current_thread")]
async fn second_factor_secrets_never_reach_logs_audit_or_storage() {
    let sink = LogSink::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = TestApp::spawn().await;
    let mut u = mfa_user(&app).await;
    let mut secrets: Vec<String> = vec![u.secret.clone(), u.last_code()];
    secrets.extend(u.recovery_codes.iter().cloned());
    secrets.extend(u.recovery_codes.iter().map(|c| c.replace('-', "")));

    // A wrong code, a right one, a recovery code, a step-up, a dead token.
    let (_, first) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    let mfa_token = first["mfa_token"].as_str().unwrap().to_string();
    secrets.push(mfa_token.clone());
    let _ = mfa_step(&app, &mfa_token, "totp", "012345").await;
    let code = u.next_code().await;
    secrets.push(code.clone());
    let body = json_of(mfa_step(&app, &mfa_token, "totp", &code).await, 200).await;
    let _ = mfa_step(&app, &mfa_token, "totp", &code).await;
    let (_, second) = password_step(&app, &u.email, STRONG_PASSWORD).await;
    let second_token = second["mfa_token"].as_str().unwrap().to_string();
    secrets.push(second_token.clone());
    json_of(
        mfa_step(&app, &second_token, "recovery_code", &u.recovery_codes[3]).await,
        200,
    )
    .await;
    let code = u.next_code().await;
    secrets.push(code.clone());
    let access = body["access_token"].as_str().unwrap();
    json_of(
        send(
            &app,
            Method::POST,
            "/v1/auth/step-up",
            Some(access),
            Some(json!({"method": "totp", "code": code})),
        )
        .await,
        200,
    )
    .await;
    let fresh = json_of(
        send(
            &app,
            Method::POST,
            "/v1/users/me/mfa/recovery-codes",
            Some(access),
            None,
        )
        .await,
        200,
    )
    .await;
    for c in fresh["recovery_codes"].as_array().unwrap() {
        secrets.push(c.as_str().unwrap().to_string());
    }

    let audit: Vec<String> = sqlx::query_scalar(
        "select concat_ws(' ', actor_id, action, target_id, ip, user_agent, details::text) from audit_logs",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert!(audit.len() > 8);
    let at_rest: Vec<String> = sqlx::query_scalar(
        "select row_to_json(t)::text from user_totp t
         union all select row_to_json(r)::text from user_recovery_codes r
         union all select row_to_json(c)::text from mfa_challenges c",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert!(at_rest.len() >= 12);
    let logs = String::from_utf8_lossy(&sink.0.lock().unwrap()).to_string();
    assert!(!logs.is_empty(), "the log capture saw the service");
    for s in &secrets {
        // A six-digit code may occur by chance in any long run of digits (a
        // timestamp): in logs, look for it as a value, quoted or assigned.
        let leaked = if s.len() == 6 && s.bytes().all(|b| b.is_ascii_digit()) {
            [format!("\"{s}\""), format!("={s}"), format!(": {s}")]
                .iter()
                .any(|p| logs.contains(p.as_str()))
        } else {
            logs.contains(s.as_str())
        };
        assert!(!leaked, "a log line leaked {s}");
        assert!(
            audit.iter().all(|row| !row.contains(s.as_str())),
            "an audit row leaked {s}"
        );
        assert!(
            at_rest.iter().all(|row| !row.contains(s.as_str())),
            "stored in clear: {s}"
        );
    }
}
