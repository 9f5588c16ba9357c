//! The harness: a template database migrated once per run, a fresh copy per test,
//! a unique Redis key prefix per test, and typed HTTP and gRPC clients.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::sync::OnceCell;
use tonic::transport::Channel;
use user_service::app::App;
use user_service::config::{parse_env_file, Settings};
use user_service::service::Services;
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

/// Key material of this test run: generated once per process, so every app (and
/// every replica) a test starts shares it, and never a committed key.
pub fn test_keys() -> &'static [(String, String)] {
    static KEYS: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        user_service::crypto::key_material::GENERATED_IN_DEVELOPMENT
            .into_iter()
            .map(|k| {
                let v = user_service::crypto::key_material::generate(k).expect("generated");
                (k.to_string(), v)
            })
            .collect()
    })
}

/// The development settings from .env.dev and this run's keys, pointed at the
/// test stores.
pub fn test_vars(database_url: &str) -> HashMap<String, String> {
    let content = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.dev"))
        .expect(".env.dev readable");
    let mut vars: HashMap<String, String> = parse_env_file(&content, ".env.dev", &HashMap::new())
        .expect(".env.dev parses")
        .into_iter()
        .collect();
    vars.extend(test_keys().iter().cloned());
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
    /// The app's own service graph: tests call use cases directly through it.
    pub services: Services,
    pub settings: Settings,
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
        let services = app.services();
        let settings = app.settings().clone();
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
            services,
            settings,
            shutdown,
            http,
            server: Some(server),
        }
    }

    /// A Redis client of its own on the app's Redis and key prefix, connected
    /// (or, after 5 s, as it is).
    pub async fn redis(&self) -> user_service::store::Cache {
        let cache = user_service::store::Cache::connect(&self.settings).expect("redis client");
        for _ in 0..50 {
            if cache.ping().await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cache
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

// ---- users, tokens and service clients (issue 3) ----

/// A password the policy accepts (long, not guessable, no email in it).
pub const STRONG_PASSWORD: &str = "violet-tunnel-orbit-97-marsh";

/// Adds `authorization: Bearer <token>` to every gRPC call.
#[derive(Clone)]
pub struct BearerInterceptor(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub fn bearer_interceptor(token: &str) -> BearerInterceptor {
    BearerInterceptor(format!("Bearer {token}").parse().expect("ascii token"))
}

pub type AuthedChannel =
    tonic::service::interceptor::InterceptedService<Channel, BearerInterceptor>;

impl TestApp {
    /// Registers a user (full name "Test User"); returns the user JSON.
    pub async fn register(&self, email: &str, password: &str) -> serde_json::Value {
        let res = self
            .post_json(
                "/v1/auth/register",
                &serde_json::json!({"email": email, "password": password, "full_name": "Test User"}),
            )
            .await;
        let status = res.status().as_u16();
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(status, 201, "register {email}: {body}");
        body
    }

    /// Logs in; returns the access token. Uses a cookie-less client so the shared
    /// client's cookie jar is left alone.
    pub async fn login(&self, email: &str, password: &str) -> String {
        let res = reqwest::Client::new()
            .post(self.url("/v1/auth/login"))
            .json(&serde_json::json!({"email": email, "password": password}))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(status, 200, "login {email}: {body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    /// A new user with a random email: (id, email, access token).
    pub async fn user_with_token(&self) -> (uuid::Uuid, String, String) {
        let email = format!(
            "u{}@example.com",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let user = self.register(&email, STRONG_PASSWORD).await;
        let id = user["id"].as_str().unwrap().parse().unwrap();
        let token = self.login(&email, STRONG_PASSWORD).await;
        (id, email, token)
    }

    /// Grants the admin role; tokens already issued see it on their next request.
    pub async fn make_admin(&self, user_id: uuid::Uuid) {
        sqlx::query(
            "insert into user_roles (user_id, role_id) select $1, id from roles where name = 'admin'
             on conflict do nothing",
        )
        .bind(user_id)
        .execute(&self.db)
        .await
        .unwrap();
        // As a real role change does: the cached user record (roles) and policies
        // drop on every replica.
        self.services.invalidation.user_changed(user_id).await;
    }

    /// Creates a service client with these scopes and returns (client_id, secret).
    pub async fn service_client(&self, scopes: &[&str]) -> (String, String) {
        use secrecy::ExposeSecret;
        let client_id = format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let creds = self
            .services
            .service_clients
            .create(None, &client_id, &scopes)
            .await
            .expect("service client created");
        (
            creds.client_id,
            creds.client_secret.expose_secret().to_string(),
        )
    }

    /// A service token with these scopes, through POST /v1/auth/token.
    pub async fn service_token(&self, scopes: &[&str]) -> String {
        let (client_id, secret) = self.service_client(scopes).await;
        let res = self.service_token_raw(&client_id, &secret).await;
        let status = res.status().as_u16();
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(status, 200, "service token: {body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    /// POST /v1/auth/token (client credentials as a form), answered as is.
    pub async fn service_token_raw(&self, client_id: &str, secret: &str) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url("/v1/auth/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", secret),
            ])
            .send()
            .await
            .unwrap()
    }

    /// A gRPC channel that sends `authorization: Bearer <token>` on every call:
    /// `AuthServiceClient::new(app.grpc_with_token(&t).await)`.
    pub async fn grpc_with_token(&self, token: &str) -> AuthedChannel {
        tonic::service::interceptor::InterceptedService::new(
            self.channel().await,
            bearer_interceptor(token),
        )
    }
}

/// GET with a bearer token, from a client without the harness's cookie jar.
pub async fn get_bearer(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// POST /v1/auth/login, answered as is (no cookie jar, no status check).
/// POST /v1/auth/logout with a bearer access token.
pub async fn logout_bearer(app: &TestApp, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(app.url("/v1/auth/logout"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

pub async fn login_raw(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(app.url("/v1/auth/login"))
        .json(&serde_json::json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

/// A port nothing listens on right now (for a server a test starts itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether something accepts connections on 127.0.0.1:`port` within 5 s.
pub async fn wait_for_port(port: u16) -> bool {
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}
