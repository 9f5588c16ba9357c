//! Link tokens never reach the service log, except through the development log
//! sink, whose whole point is to print the link (scripts/run-local works without an
//! alert service). Through the real binary, at the development log level.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::alert_receiver::Receiver;
use crate::helpers::{
    free_port, fresh_database, redis_url, test_keys, wait_for_port, STRONG_PASSWORD,
};

const NEW_PASSWORD: &str = "copper-lantern-meadow-42-fjord";

/// The binary serving on a port of its own, its stdout and stderr collected.
struct Running {
    child: tokio::process::Child,
    port: u16,
    output: Arc<Mutex<String>>,
}

impl Running {
    async fn start(extra: &[(&str, String)]) -> Running {
        let port = free_port();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_user-service"));
        cmd.arg("serve")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ENV_FILE", ".env.dev")
            .envs(test_keys().iter().cloned())
            .env("DATABASE_URL", fresh_database().await)
            .env("REDIS_URL", redis_url())
            .env(
                "REDIS_KEY_PREFIX",
                format!("test:{}:", uuid::Uuid::new_v4().simple()),
            )
            .env("USER_SERVICE_HOST", "127.0.0.1")
            .env("USER_SERVICE_PORT", port.to_string())
            // The development level, the most a deployment logs.
            .env("LOG_LEVEL", "debug")
            .env("LOG_FORMAT", "json")
            .env("NOTIFY_POLL_INTERVAL_MS", "50")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for reader in [
            Box::new(out) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(err),
        ] {
            let output = output.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(reader).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut o = output.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        assert!(wait_for_port(port).await, "the service did not start");
        Running {
            child,
            port,
            output,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn post(&self, path: &str, token: Option<&str>, body: serde_json::Value) -> u16 {
        let mut req = reqwest::Client::new().post(self.url(path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap().status().as_u16()
    }

    async fn login(&self, email: &str, password: &str) -> String {
        let res = reqwest::Client::new()
            .post(self.url("/v1/auth/login"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 200);
        let body: serde_json::Value = res.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_string()
    }

    async fn stop(mut self) -> String {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let out = self.output.lock().unwrap().clone();
        out
    }
}

#[tokio::test]
async fn tokens_and_links_stay_out_of_the_log_with_the_http_sink() {
    let receiver = Receiver::start().await;
    let svc = Running::start(&[
        ("NOTIFY_SINK", "http".into()),
        ("ALERT_SERVICE_URL", receiver.url.clone()),
    ])
    .await;
    let e = format!(
        "h{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let new_e = format!(
        "n{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let register = json!({"email": e, "password": STRONG_PASSWORD, "full_name": "Log Test"});
    assert_eq!(svc.post("/v1/auth/register", None, register).await, 201);
    let token = svc.login(&e, STRONG_PASSWORD).await;
    let verify = receiver.message("email_verification", &e).await;
    let t = verify["data"]["token"].as_str().unwrap().to_string();
    assert_eq!(
        svc.post("/v1/auth/verify-email", None, json!({"token": t}))
            .await,
        204
    );
    let change = json!({"new_email": new_e, "current_password": STRONG_PASSWORD});
    assert_eq!(
        svc.post("/v1/users/me/email", Some(&token), change).await,
        202
    );
    let t = receiver.message("email_verification", &new_e).await["data"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        svc.post("/v1/auth/verify-email", None, json!({"token": t}))
            .await,
        204
    );
    assert_eq!(
        svc.post("/v1/auth/password-reset", None, json!({"email": new_e}))
            .await,
        202
    );
    let t = receiver.message("password_reset", &new_e).await["data"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    // A refused password and a used token are logged as requests like any other.
    let weak = json!({"token": t, "new_password": "password"});
    assert_eq!(
        svc.post("/v1/auth/password-reset/confirm", None, weak)
            .await,
        400
    );
    let ok = json!({"token": t, "new_password": NEW_PASSWORD});
    assert_eq!(
        svc.post("/v1/auth/password-reset/confirm", None, ok.clone())
            .await,
        204
    );
    assert_eq!(
        svc.post("/v1/auth/password-reset/confirm", None, ok).await,
        400
    );
    receiver.message("password_changed", &new_e).await;

    let log = svc.stop().await;
    assert!(log.contains("user-service listening"), "{log}");
    let tokens: Vec<String> = receiver
        .all()
        .iter()
        .filter_map(|r| r.body["data"]["token"].as_str().map(str::to_string))
        .collect();
    assert_eq!(tokens.len(), 3);
    for t in &tokens {
        assert!(
            !log.contains(t.as_str()),
            "a link token reached the log:\n{log}"
        );
    }
    assert!(!log.contains("token="), "a link reached the log:\n{log}");
    assert!(!log.contains(NEW_PASSWORD) && !log.contains(STRONG_PASSWORD));
}

#[tokio::test]
async fn the_development_log_sink_prints_the_link() {
    let svc = Running::start(&[("NOTIFY_SINK", "log".into())]).await;
    let e = format!(
        "l{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let register = json!({"email": e, "password": STRONG_PASSWORD, "full_name": "Log Sink"});
    assert_eq!(svc.post("/v1/auth/register", None, register).await, 201);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let found = svc
            .output
            .lock()
            .unwrap()
            .lines()
            .find(|l| l.contains("verify-email?token=") && l.contains(&e))
            .map(str::to_string);
        if let Some(l) = found {
            break l;
        }
        assert!(Instant::now() < deadline, "no link in the log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    let link = entry["link"].as_str().unwrap();
    assert!(
        link.starts_with("http://localhost:3000/verify-email?token="),
        "{line}"
    );
    let token = link.rsplit('=').next().unwrap();
    // The link works.
    assert_eq!(
        svc.post("/v1/auth/verify-email", None, json!({"token": token}))
            .await,
        204
    );
    let log = svc.stop().await;
    // Only the sink's line carries it.
    let carrying: Vec<&str> = log.lines().filter(|l| l.contains(token)).collect();
    assert_eq!(carrying.len(), 1, "{carrying:?}");
}
