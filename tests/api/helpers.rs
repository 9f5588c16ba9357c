//! The harness: a template database migrated once per run, a fresh copy per test,
//! a unique Redis key prefix per test, and typed HTTP and gRPC clients.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::sync::OnceCell;
use tonic::transport::Channel;
use user_service::app::{App, AppState};
use user_service::config::{parse_env_file, Settings};
use user_service::shutdown::Shutdown;

pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn database_url_for(name: &str) -> String {
    let mut u = url::Url::parse(&admin_database_url()).expect("TEST_DATABASE_URL is a URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// Migrates a template database once per test run; each test copies it, which is
/// far cheaper than migrating from zero every time.
async fn template_database() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let name = format!("us_tpl_{}", std::process::id());
            let mut admin = PgConnection::connect(&admin_database_url())
                .await
                .expect("PostgreSQL reachable at TEST_DATABASE_URL");
            drop_stale_databases(&mut admin).await;
            admin
                .execute(format!(r#"drop database if exists "{name}""#).as_str())
                .await
                .unwrap();
            admin
                .execute(format!(r#"create database "{name}""#).as_str())
                .await
                .unwrap();
            let pool = PgPool::connect(&database_url_for(&name)).await.unwrap();
            user_service::store::db::MIGRATOR.run(&pool).await.unwrap();
            pool.close().await;
            name
        })
        .await
}

/// Test databases carry the pid of the run that made them; drop those whose
/// process is gone (an earlier run that was interrupted).
async fn drop_stale_databases(admin: &mut PgConnection) {
    let names: Vec<String> = sqlx::query_scalar(
        "select datname from pg_database where datname like 'us\\_tpl\\_%' or datname like 'us\\_t\\_%'",
    )
    .fetch_all(&mut *admin)
    .await
    .unwrap_or_default();
    for name in names {
        let pid = name
            .trim_start_matches("us_tpl_")
            .trim_start_matches("us_t_")
            .split('_')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = admin
                .execute(format!(r#"drop database if exists "{name}" with (force)"#).as_str())
                .await;
        }
    }
}

/// A fresh database copied from the migrated template.
pub async fn fresh_database() -> String {
    let template = template_database().await;
    let name = format!(
        "us_t_{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let mut admin = PgConnection::connect(&admin_database_url()).await.unwrap();
    admin
        .execute(format!(r#"create database "{name}" template "{template}""#).as_str())
        .await
        .unwrap();
    admin.close().await.ok();
    database_url_for(&name)
}

/// The development settings from .env.dev, pointed at the test stores.
pub fn test_vars(database_url: &str) -> HashMap<String, String> {
    let content = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.dev"))
        .expect(".env.dev readable");
    let mut vars: HashMap<String, String> = parse_env_file(&content, ".env.dev", &HashMap::new())
        .expect(".env.dev parses")
        .into_iter()
        .collect();
    vars.insert("DATABASE_URL".into(), database_url.into());
    vars.insert("REDIS_URL".into(), redis_url());
    vars.insert(
        "REDIS_KEY_PREFIX".into(),
        format!("test:{}:", uuid::Uuid::new_v4().simple()),
    );
    vars.insert("USER_SERVICE_HOST".into(), "127.0.0.1".into());
    vars.insert("USER_SERVICE_PORT".into(), "0".into());
    vars.insert("LOG_LEVEL".into(), "warning".into());
    vars.insert("SHUTDOWN_GRACE_SECONDS".into(), "5".into());
    vars
}

pub struct TestApp {
    pub addr: String,
    pub port: u16,
    pub database_url: String,
    pub db: PgPool,
    pub state: AppState,
    pub shutdown: Shutdown,
    pub http: reqwest::Client,
    pub server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    /// The whole service on port 0 against a fresh database.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// Same, with settings adjusted first.
    pub async fn spawn_with(adjust: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
        let database_url = fresh_database().await;
        let mut vars = test_vars(&database_url);
        adjust(&mut vars);
        Self::spawn_vars(vars).await
    }

    /// A service from exactly these variables (a second replica shares a database
    /// and a Redis prefix by reusing the first one's variables).
    pub async fn spawn_vars(vars: HashMap<String, String>) -> TestApp {
        let database_url = vars["DATABASE_URL"].clone();
        let settings = Settings::from_vars(vars).expect("test settings");
        let app = App::build(settings).await.expect("app builds");
        let port = app.port();
        let state = app.state();
        let shutdown = app.shutdown();
        let server = tokio::spawn(app.run_until_stopped());
        let db = PgPool::connect_lazy(&database_url).unwrap();
        let http = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        TestApp {
            addr: format!("http://127.0.0.1:{port}"),
            port,
            database_url,
            db,
            state,
            shutdown,
            http,
            server: Some(server),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.addr, path)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("gRPC channel connects")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Stops the server as SIGTERM would and waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        match self.server.take() {
            Some(h) => h.await.expect("server task"),
            None => Ok(()),
        }
    }
}

/// Asserts the problem+json shape and returns the body.
pub async fn assert_problem(res: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(res.status().as_u16(), status, "status");
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert_eq!(ct, "application/problem+json");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert!(body["type"].is_string() && body["title"].is_string() && body["detail"].is_string());
    body
}

pub const SERVICES: [&str; 3] = [
    "stocksblitz.user.v1.AuthService",
    "stocksblitz.user.v1.UserService",
    "stocksblitz.user.v1.AccountService",
];
