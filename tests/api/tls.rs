//! TLS to the stores, each against a server of the test's own that speaks only TLS
//! and holds a certificate from a private CA made here: Redis over rediss:// with
//! REDIS_TLS_CA_FILE, PostgreSQL with sslmode=verify-full and sslrootcert.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use user_service::config::Settings;
use user_service::store::Db;

use crate::helpers::{free_port, test_vars, wait_for_port, TestApp};
use crate::own_postgres::OwnPostgres;

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost, as PEM
/// files in a folder of their own.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("us-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "user-service test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca_cert, &ca_key)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process killed with the test.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// redis-server with its plaintext port off and TLS on `port`. None only when
/// there is no redis-server, or one built without TLS; any other failure to
/// start fails the test.
async fn tls_redis(pki: &Pki) -> Option<(Server, u16)> {
    let port = free_port();
    let log = pki.dir.join("redis.log");
    let spawned = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", "0", "--save", ""])
        .args([
            "--appendonly",
            "no",
            "--logfile",
            &log.display().to_string(),
        ])
        .args(["--tls-port", &port.to_string()])
        .args(["--tls-cert-file", &pki.path("server.pem")])
        .args(["--tls-key-file", &pki.path("server.key")])
        .args(["--tls-ca-cert-file", &pki.path("ca.pem")])
        .args(["--tls-auth-clients", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut server = match spawned {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("redis-server: {e}"),
        Ok(child) => Server(child),
    };
    if wait_for_port(port).await {
        return Some((server, port));
    }
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    let mut err = String::new();
    if let Some(mut stderr) = server.0.stderr.take() {
        use std::io::Read as _;
        let _ = stderr.read_to_string(&mut err);
    }
    if format!("{said}{err}").contains("not built with TLS") {
        return None;
    }
    panic!("redis-server with TLS did not start:\n{said}\n{err}");
}

/// What /health says of Redis, once it stops changing (the client connects in the
/// background) or after five seconds.
async fn redis_health(app: &TestApp, want: &str) -> String {
    let mut seen = String::new();
    for _ in 0..50 {
        let body: serde_json::Value = app.get("/health").await.json().await.unwrap();
        seen = body["checks"]["redis"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if seen == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

#[tokio::test]
async fn redis_over_tls_trusts_the_configured_ca_and_nothing_else() {
    let pki = Pki::new();
    let Some((_redis, port)) = tls_redis(&pki).await else {
        eprintln!("SKIPPED redis_over_tls…: no redis-server, or one without TLS");
        return;
    };
    let url = format!("rediss://127.0.0.1:{port}/0");
    let app = TestApp::spawn_with(|v| {
        v.insert("REDIS_URL".into(), url.clone());
        v.insert("REDIS_TLS_CA_FILE".into(), pki.path("ca.pem"));
    })
    .await;
    // The server has no plaintext port: any answer came over TLS.
    assert_eq!(redis_health(&app, "ok").await, "ok");
    let window = Duration::from_secs(60);
    let redis = app.redis().await;
    let first = redis.incr_window("tls-probe", window).await.unwrap();
    let second = redis.incr_window("tls-probe", window).await.unwrap();
    assert_eq!((first.0, second.0), (1, 2));

    // Another CA: the server's certificate is refused, so Redis counts as down.
    let other = Pki::new();
    let stranger = TestApp::spawn_with(|v| {
        v.insert("REDIS_URL".into(), url.clone());
        v.insert("REDIS_TLS_CA_FILE".into(), other.path("ca.pem"));
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(redis_health(&stranger, "error").await, "error");

    // A CA file with a plaintext URL is a mistake worth stopping for.
    let mut vars = test_vars(&app.database_url);
    vars.insert("REDIS_TLS_CA_FILE".into(), pki.path("ca.pem"));
    let err = match user_service::app::App::build(Settings::from_vars(vars).unwrap()).await {
        Ok(_) => panic!("started with REDIS_TLS_CA_FILE and a plaintext REDIS_URL"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("does not use TLS"), "{err}");
}

/// A PostgreSQL cluster of the test's own: TLS on, and pg_hba allowing TCP only
/// over TLS (hostssl). None only when the machine has no PostgreSQL server
/// binaries.
fn tls_postgres(pki: &Pki) -> Option<OwnPostgres> {
    let pg = OwnPostgres::init(|dir| {
        for f in ["server.pem", "server.key"] {
            std::fs::copy(pki.dir.join(f), dir.join(f)).unwrap();
        }
    })?;
    // The key must be private to its owner, or PostgreSQL refuses it.
    pg.must(
        Command::new("chmod")
            .arg("600")
            .arg(pg.dir.join("server.key")),
    );
    std::fs::write(
        pg.data().join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    pg.start(&format!(
        "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
        pg.dir.join("server.pem").display(),
        pg.dir.join("server.key").display(),
    ));
    Some(pg)
}

/// The service's own pool for `database_url`, and whether a query went over TLS.
async fn connects_over_tls(database_url: &str) -> Result<bool, String> {
    let settings = Settings::from_vars(test_vars(database_url)).unwrap();
    let db = Db::connect_lazy(&settings).map_err(|e| e.to_string())?;
    let mut last = String::new();
    // The server may still be starting: retry for a few seconds.
    for _ in 0..30 {
        match db.uses_tls().await {
            Ok(ssl) => return Ok(ssl),
            Err(e) => last = e.to_string(),
        }
        if last.contains("certificate") || last.contains("UnknownIssuer") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}

#[tokio::test]
async fn postgres_over_verified_tls() {
    let pki = Pki::new();
    let Some(pg) = tls_postgres(&pki) else {
        eprintln!("SKIPPED postgres_over_verified_tls: no PostgreSQL server binaries");
        return;
    };
    let ca = pki.path("ca.pem");
    let verified = pg.url(&format!("sslmode=verify-full&sslrootcert={ca}"));
    assert_eq!(connects_over_tls(&verified).await, Ok(true));
    // Migrations run over it too (the service's real start-up path).
    let settings = Settings::from_vars(test_vars(&verified)).unwrap();
    Db::connect_lazy(&settings)
        .unwrap()
        .migrate()
        .await
        .unwrap();

    // pg_hba allows TCP only over TLS: a plaintext connection is turned away.
    let plain = connects_over_tls(&pg.url("sslmode=disable")).await;
    assert!(plain.is_err(), "plaintext connected: {plain:?}");

    // A certificate from another CA is refused before anything is sent.
    let other = Pki::new();
    let stranger = pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        other.path("ca.pem")
    ));
    let refused = connects_over_tls(&stranger).await;
    assert!(refused.is_err(), "an unknown CA was trusted: {refused:?}");
}
