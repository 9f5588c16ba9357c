//! The runtime under stress (issue 10 point 5, issue 11 point 4): statements
//! bounded in time, a database that goes away answering 503, a shutdown that
//! keeps its deadline whatever PostgreSQL does, clean closes of keep-alive
//! connections, and connection limits and timeouts against idle floods and
//! slow headers.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::{Connection, Executor, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::user_service_client::UserServiceClient;
use user_service::proto::{GetUserRequest, VerifyApiKeyRequest};

use crate::helpers::{
    assert_problem, free_port, fresh_database, test_vars, wait_for_port, TestApp,
};

/// Holds `lock table users` in an open transaction until dropped: every
/// statement on users waits, as on a stalled database.
struct UsersLocked(PgConnection);

impl UsersLocked {
    async fn take(database_url: &str) -> UsersLocked {
        let mut c = PgConnection::connect(database_url).await.unwrap();
        c.execute("begin").await.unwrap();
        c.execute("lock table users in access exclusive mode")
            .await
            .unwrap();
        UsersLocked(c)
    }

    async fn release(mut self) {
        self.0.execute("rollback").await.unwrap();
        self.0.close().await.unwrap();
    }
}

/// The service's backends in this database that are waiting for a lock.
async fn backends_waiting(database_url: &str) -> Vec<i32> {
    let mut c = PgConnection::connect(database_url).await.unwrap();
    let pids = sqlx::query_scalar(
        "select pid from pg_stat_activity where datname = current_database() \
         and application_name = 'user-service' and wait_event_type = 'Lock'",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    c.close().await.ok();
    pids
}

async fn until_waiting(database_url: &str) -> Vec<i32> {
    for _ in 0..100 {
        let pids = backends_waiting(database_url).await;
        if !pids.is_empty() {
            return pids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no request reached the database");
}

/// Ends the backends waiting on the lock, as the server does on a fast shutdown.
async fn terminate_waiting(admin: &mut PgConnection, database_url: &str) {
    for pid in until_waiting(database_url).await {
        sqlx::query("select pg_terminate_backend($1)")
            .bind(pid)
            .execute(&mut *admin)
            .await
            .unwrap();
    }
}

fn login(app_url: String) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    tokio::spawn(
        reqwest::Client::new()
            .post(format!("{app_url}/v1/auth/login"))
            .timeout(Duration::from_secs(30))
            .json(&json!({"email": "stalled@example.com", "password": "whatever-it-is-1"}))
            .send(),
    )
}

#[tokio::test]
async fn a_stalled_database_answers_503_within_the_statement_timeout() {
    let app = TestApp::spawn_with(|v| {
        v.insert("DATABASE_STATEMENT_TIMEOUT_MS".into(), "500".into());
    })
    .await;
    let lock = UsersLocked::take(&app.database_url).await;
    let started = Instant::now();
    let res = login(app.addr.clone()).await.unwrap().unwrap();
    let took = started.elapsed();
    assert_problem(res, 503, "unavailable").await;
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    lock.release().await;
}

#[tokio::test]
async fn a_backend_terminated_by_the_server_answers_unavailable_not_internal() {
    let app = TestApp::spawn().await;
    let (user_id, _, _) = app.user_with_token().await;
    let token = app.service_token(&["users:read"]).await;
    let mut users = UserServiceClient::new(app.grpc_with_token(&token).await);
    let lock = UsersLocked::take(&app.database_url).await;

    // A request waiting on the database when the server ends its backend
    // (what pg_ctl stop -m fast or pg_terminate_backend does: SQLSTATE 57P01).
    let in_flight = login(app.addr.clone());
    let mut admin = PgConnection::connect(&app.database_url).await.unwrap();
    terminate_waiting(&mut admin, &app.database_url).await;
    assert_problem(in_flight.await.unwrap().unwrap(), 503, "unavailable").await;

    // The same over gRPC: UNAVAILABLE.
    let call = tokio::spawn(async move {
        users
            .get_user(GetUserRequest {
                user_id: user_id.to_string(),
            })
            .await
    });
    terminate_waiting(&mut admin, &app.database_url).await;
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    lock.release().await;
    // And the service carries on once the database is back.
    assert_eq!(app.get("/health").await.status(), 200);
}

/// The service binary with exactly these variables, its open-file limit set
/// to `nofile` when given.
struct Binary {
    child: Child,
    port: u16,
}

impl Binary {
    async fn start(mut vars: HashMap<String, String>, nofile: Option<u64>) -> Binary {
        let port = free_port();
        vars.insert("USER_SERVICE_PORT".into(), port.to_string());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_user-service"));
        cmd.arg("serve")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ENV_FILE", "/dev/null")
            .envs(&vars)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap();
        let b = Binary { child, port };
        assert!(wait_for_port(port).await, "the service did not start");
        b
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn sigterm(&self) {
        // SAFETY: a plain kill(2) of our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }

    /// Waits for the exit up to `limit`: Some(success) or None if still running.
    async fn exited_within(&mut self, limit: Duration) -> Option<bool> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.success());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_keeps_the_grace_period_when_the_database_stalls() {
    let database_url = fresh_database().await;
    let mut vars = test_vars(&database_url);
    vars.insert("SHUTDOWN_GRACE_SECONDS".into(), "2".into());
    // The statement timeout must not be what ends the wait here.
    vars.insert("DATABASE_STATEMENT_TIMEOUT_MS".into(), "60000".into());
    let mut service = Binary::start(vars, None).await;
    let lock = UsersLocked::take(&database_url).await;

    let email = format!("stall-{}@example.com", uuid::Uuid::new_v4().simple());
    let register = tokio::spawn(
        reqwest::Client::new()
            .post(service.url("/v1/auth/register"))
            .timeout(Duration::from_secs(30))
            .json(&json!({"email": email, "password": "correct horse battery staple 9", "full_name": "S"}))
            .send(),
    );
    until_waiting(&database_url).await;
    let signalled = Instant::now();
    service.sigterm();
    let exited = service.exited_within(Duration::from_secs(8)).await;
    let took = signalled.elapsed();
    // Released only now: on a service that outlives its grace, the write
    // would go on and commit.
    lock.release().await;
    eprintln!("exited {took:?} after SIGTERM (grace 2 s)");
    assert_eq!(exited, Some(true), "still running {took:?} after SIGTERM");
    assert!(
        took < Duration::from_secs(2 + 3),
        "exited {took:?} after SIGTERM with a 2 s grace"
    );
    // The request the grace period could not finish got a real 503, with the
    // headers every gateway answer carries (DESIGN §9).
    let res = register.await.unwrap().unwrap();
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("cache-control", "no-store"),
    ] {
        assert_eq!(
            res.headers().get(name).and_then(|v| v.to_str().ok()),
            Some(value),
            "{name} on the 503 at the deadline: {:?}",
            res.headers()
        );
    }
    assert_problem(res, 503, "unavailable").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut c = PgConnection::connect(&database_url).await.unwrap();
    let written: i64 = sqlx::query_scalar("select count(*) from users where email = $1")
        .bind(&email)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(
        written, 0,
        "a write committed after its request was cancelled"
    );
}

/// Writes one HTTP/1.1 request; reads one response (head and a Content-Length
/// body). Returns the response head, lower-cased.
async fn exchange(conn: &mut TcpStream, request: &[u8]) -> String {
    conn.write_all(request).await.unwrap();
    read_response(conn).await.expect("a response")
}

async fn read_response(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + len {
                let n = conn.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(head);
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until the peer closes: Ok(what it sent) on a clean end of stream.
async fn read_to_close(conn: &mut TcpStream, limit: Duration) -> std::io::Result<String> {
    let mut all = Vec::new();
    match tokio::time::timeout(limit, conn.read_to_end(&mut all)).await {
        Ok(Ok(_)) => Ok(String::from_utf8_lossy(&all).to_ascii_lowercase()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

const HEALTH: &[u8] = b"GET /health/live HTTP/1.1\r\nhost: t\r\n\r\n";

#[tokio::test]
async fn keep_alive_connections_close_cleanly_at_sigterm() {
    let mut app = TestApp::spawn().await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        let mut c = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
        let head = exchange(&mut c, HEALTH).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        idle.push(c);
    }
    // One request in flight (its body still arriving) when SIGTERM comes.
    let mut busy = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let body = br#"{"email":"nobody@example.com","password":"wrong-password-123"}"#;
    busy.write_all(
        format!(
            "POST /v1/auth/login HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    busy.write_all(&body[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    app.shutdown.trigger();
    // Requests that race the shutdown on idle keep-alive connections.
    for c in &mut idle {
        let _ = c.write_all(HEALTH).await;
    }
    busy.write_all(&body[10..]).await.unwrap();
    let head = read_response(&mut busy).await.unwrap();
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    for c in &mut idle {
        match read_to_close(c, Duration::from_secs(5)).await {
            // Either answered with connection: close, or closed unanswered.
            Ok(seen) => assert!(
                seen.is_empty() || seen.contains("connection: close"),
                "{seen}"
            ),
            Err(e) => panic!("an idle keep-alive connection ended with {e:?}, not a clean close"),
        }
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn slow_and_silent_connections_are_closed() {
    let app = TestApp::spawn_with(|v| {
        v.insert("HTTP_HEADER_READ_TIMEOUT_SECONDS".into(), "1".into());
        v.insert("HTTP_IDLE_TIMEOUT_SECONDS".into(), "2".into());
    })
    .await;
    let started = Instant::now();
    // Connected, never says anything.
    let mut silent = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    // Headers one line every 300 ms, never finished (slowloris).
    let mut slow = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let trickle = async {
        slow.write_all(b"GET /health HTTP/1.1\r\nhost: t\r\n")
            .await
            .unwrap();
        for i in 0..30 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if slow
                .write_all(format!("x-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), slow.read_to_end(&mut rest)).await;
        started.elapsed()
    };
    // A keep-alive connection idle after one request.
    let mut kept = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    exchange(&mut kept, HEALTH).await;
    let (silent_end, slow_end, kept_end) = tokio::join!(
        async {
            let _ = read_to_close(&mut silent, Duration::from_secs(10)).await;
            started.elapsed()
        },
        trickle,
        async {
            let _ = read_to_close(&mut kept, Duration::from_secs(10)).await;
            started.elapsed()
        },
    );
    assert!(
        silent_end < Duration::from_secs(4),
        "silent connection open {silent_end:?}"
    );
    assert!(
        slow_end < Duration::from_secs(5),
        "slow headers went on for {slow_end:?}"
    );
    // HTTP/1.1 waits for the next request's headers no longer than for the first.
    assert!(
        kept_end < Duration::from_secs(4),
        "idle keep-alive open {kept_end:?}"
    );
    // Meanwhile the service answers.
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test]
async fn an_idle_connection_flood_leaves_room_for_health_and_verify() {
    user_service::server::raise_fd_limit();
    let database_url = fresh_database().await;
    let vars = test_vars(&database_url);
    // The same database, Redis prefix and keys: a token the test mints here is
    // one the binary accepts.
    let app = TestApp::spawn_vars(vars.clone()).await;
    let token = app.service_token(&["auth:verify"]).await;
    // 400 descriptors; the connection bound follows from them.
    let service = Binary::start(vars, Some(400)).await;

    let mut flood = Vec::new();
    for _ in 0..1500 {
        match TcpStream::connect(("127.0.0.1", service.port)).await {
            Ok(c) => flood.push(c),
            Err(_) => break,
        }
    }
    assert!(
        flood.len() >= 1000,
        "only {} connections opened",
        flood.len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let res = reqwest::Client::new()
        .get(service.url("/health"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("health answers during the flood");
    assert_eq!(res.status(), 200);
    let channel = tonic::transport::Endpoint::from_shared(service.url(""))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("a gRPC connection during the flood");
    let mut verifier =
        AuthServiceClient::with_interceptor(channel, crate::helpers::bearer_interceptor(&token));
    let answer = verifier
        .verify_api_key(VerifyApiKeyRequest {
            api_key: "sbk_dev_nothing".into(),
            ..Default::default()
        })
        .await
        .expect("VerifyApiKey answers during the flood")
        .into_inner();
    assert!(!answer.valid);
    drop(flood);
}
