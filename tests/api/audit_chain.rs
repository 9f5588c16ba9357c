//! The audit log's append-only guarantee against the service itself: with the two
//! roles of deploy/postgres/roles.sql, the role the service connects as can insert
//! and read audit_logs but cannot switch its triggers off, rewrite or delete rows;
//! staging refuses to serve as a role that could; and `admin verify-audit-chain`
//! finds rows the owner changed behind the triggers' back.
//!
//! Roles are cluster-wide: each test makes its own (unique names) and drops them,
//! with its database, whatever the outcome.

use std::future::Future;
use std::process::{Command, Output};
use std::sync::Arc;

use base64::Engine as _;
use sqlx::{Connection, Executor, PgConnection};

use crate::helpers::{admin_database_url, free_port, test_vars, wait_for_port};

const BINARY: &str = env!("CARGO_BIN_EXE_user-service");

/// An owner and an app role, and a database the owner owns, set up as the README
/// says: roles.sql, `migrate` as the owner (DATABASE_MIGRATION_URL), roles.sql again.
struct Roles {
    database: String,
    owner: String,
    app: String,
    password: String,
}

impl Roles {
    async fn create() -> Roles {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let roles = Roles {
            database: format!("us_t_{}_{}", std::process::id(), &id[..12]),
            owner: format!("us_owner_{}", &id[..12]),
            app: format!("us_app_{}", &id[..12]),
            password: format!("pw-{id}"),
        };
        let mut admin = PgConnection::connect(&admin_database_url()).await.unwrap();
        for role in [&roles.owner, &roles.app] {
            admin
                .execute(
                    format!(
                        r#"create role "{role}" login password '{}'"#,
                        roles.password
                    )
                    .as_str(),
                )
                .await
                .unwrap();
        }
        admin
            .execute(
                format!(
                    r#"create database "{}" owner "{}""#,
                    roles.database, roles.owner
                )
                .as_str(),
            )
            .await
            .unwrap();
        admin.close().await.ok();
        roles
    }

    fn url(&self, role: Option<&str>) -> String {
        let mut u = url::Url::parse(&admin_database_url()).unwrap();
        u.set_path(&format!("/{}", self.database));
        if let Some(role) = role {
            u.set_username(role).unwrap();
            u.set_password(Some(&self.password)).unwrap();
        }
        u.to_string()
    }

    fn owner_url(&self) -> String {
        self.url(Some(&self.owner))
    }

    fn app_url(&self) -> String {
        self.url(Some(&self.app))
    }

    /// deploy/postgres/roles.sql through psql, as the cluster's administrator.
    fn apply_roles_sql(&self) {
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-v")
            .arg(format!("owner={}", self.owner))
            .arg("-v")
            .arg(format!("app={}", self.app))
            .arg("-f")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/postgres/roles.sql"
            ))
            .arg(self.url(None))
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "roles.sql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn remove(&self) {
        let mut admin = PgConnection::connect(&admin_database_url()).await.unwrap();
        let _ = admin
            .execute(
                format!(
                    r#"drop database if exists "{}" with (force)"#,
                    self.database
                )
                .as_str(),
            )
            .await;
        for role in [&self.app, &self.owner] {
            let _ = admin
                .execute(format!(r#"drop role if exists "{role}""#).as_str())
                .await;
        }
        admin.close().await.ok();
    }
}

/// Runs `test` with migrated roles, then drops them and the database even when
/// the test panics.
async fn with_roles<F, Fut>(test: F)
where
    F: FnOnce(Arc<Roles>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let roles = Arc::new(Roles::create().await);
    let setup = roles.clone();
    let outcome = tokio::spawn(async move {
        setup.apply_roles_sql();
        let out = user_service(&setup, &["migrate"], &[]);
        assert!(
            out.status.success(),
            "migrate as the owner: {}",
            text(&out.stderr)
        );
        setup.apply_roles_sql();
        test(setup).await
    })
    .await;
    roles.remove().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The real binary with the test's development settings, DATABASE_URL as the app
/// role and DATABASE_MIGRATION_URL as the owner, in a folder without env files.
fn user_service(roles: &Roles, args: &[&str], extra: &[(&str, String)]) -> Output {
    command(roles, args, extra).output().unwrap()
}

fn command(roles: &Roles, args: &[&str], extra: &[(&str, String)]) -> Command {
    let mut c = Command::new(BINARY);
    c.args(args)
        .current_dir(std::env::temp_dir())
        .env_clear()
        .envs(test_vars(&roles.app_url()))
        .env("DATABASE_MIGRATION_URL", roles.owner_url());
    for (k, v) in extra {
        c.env(k, v);
    }
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The SQLSTATE of a refused statement.
async fn refused(conn: &mut PgConnection, sql: &str) -> String {
    let err = conn
        .execute(sql)
        .await
        .expect_err(&format!("{sql} was allowed"));
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.to_string())
        .unwrap_or_else(|| panic!("{sql}: {err}"))
}

async fn write_rows(conn: &mut PgConnection, n: i32) {
    for i in 0..n {
        sqlx::query(
            "insert into audit_logs (actor_type, action, outcome, details)
             values ('system', 'test.event', 'success', jsonb_build_object('n', $1::int))",
        )
        .bind(i)
        .execute(&mut *conn)
        .await
        .unwrap();
    }
}

fn verify(roles: &Roles) -> (Option<i32>, serde_json::Value, String) {
    let out = user_service(roles, &["admin", "verify-audit-chain"], &[]);
    let stdout = text(&out.stdout);
    let report = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout} / {}", text(&out.stderr)));
    (out.status.code(), report, text(&out.stderr))
}

#[tokio::test]
async fn the_service_role_cannot_alter_the_audit_log_and_tampering_is_found() {
    with_roles(|roles| async move {
        let mut app = PgConnection::connect(&roles.app_url()).await.unwrap();
        write_rows(&mut app, 5).await;
        let count: i64 = sqlx::query_scalar("select count(*) from audit_logs")
            .fetch_one(&mut app)
            .await
            .unwrap();
        assert_eq!(count, 5);

        // 42501 insufficient_privilege: not the owner, no UPDATE/DELETE/TRUNCATE grant.
        for sql in [
            "alter table audit_logs disable trigger all",
            "alter table audit_logs disable trigger audit_logs_no_update_delete",
            "update audit_logs set details = '{}'",
            "delete from audit_logs",
            "truncate audit_logs",
            "drop table audit_logs",
            "delete from _sqlx_migrations",
        ] {
            assert_eq!(refused(&mut app, sql).await, "42501", "{sql}");
        }
        app.close().await.ok();

        // The untouched chain verifies.
        let (code, report, stderr) = verify(&roles);
        assert_eq!(code, Some(0), "{report} {stderr}");
        assert_eq!(report["ok"], true);
        assert_eq!(report["rows"], 5);

        // The owner changes row 3 with the trigger off, and puts it back on.
        behind_the_triggers(&roles, "update audit_logs set details = '{\"n\": 99}' where chain_seq = 3").await;
        let report = assert_broken_at(&roles, 3).await;
        assert_eq!(report["rows"], 2, "two intact rows before it");

        // Recomputing the tampered row's own hash moves the break to the next row.
        behind_the_triggers(
            &roles,
            r#"update audit_logs set row_hash = sha256(coalesce(prev_hash, '\x'::bytea) || convert_to(concat_ws(E'\x1f',
                  chain_seq::text, to_char(occurred_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
                  actor_type, coalesce(actor_id, ''), action,
                  coalesce(target_type, ''), coalesce(target_id, ''), outcome,
                  coalesce(ip, ''), coalesce(user_agent, ''), details::text), 'UTF8'))
                where chain_seq = 3"#,
        )
        .await;
        assert_broken_at(&roles, 4).await;
    })
    .await;
}

#[tokio::test]
async fn a_row_removed_from_the_middle_of_the_chain_is_found() {
    with_roles(|roles| async move {
        let mut app = PgConnection::connect(&roles.app_url()).await.unwrap();
        write_rows(&mut app, 4).await;
        app.close().await.ok();
        behind_the_triggers(&roles, "delete from audit_logs where chain_seq = 2").await;
        assert_broken_at(&roles, 3).await;
    })
    .await;
}

/// `sql` as the owner with the append-only trigger switched off, then back on:
/// what a service connected as the owner could do.
async fn behind_the_triggers(roles: &Roles, sql: &str) {
    let mut owner = PgConnection::connect(&roles.owner_url()).await.unwrap();
    for step in [
        "alter table audit_logs disable trigger audit_logs_no_update_delete",
        sql,
        "alter table audit_logs enable trigger audit_logs_no_update_delete",
    ] {
        owner.execute(step).await.unwrap();
    }
    owner.close().await.ok();
}

/// verify-audit-chain exits 1 naming the row at chain `position` (its id and
/// position) as the first broken link; returns its JSON report.
async fn assert_broken_at(roles: &Roles, position: i64) -> serde_json::Value {
    let mut app = PgConnection::connect(&roles.app_url()).await.unwrap();
    let id: i64 = sqlx::query_scalar("select id from audit_logs where chain_seq = $1")
        .bind(position)
        .fetch_one(&mut app)
        .await
        .unwrap();
    app.close().await.ok();
    let (code, report, stderr) = verify(roles);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["ok"], false);
    assert_eq!(report["broken"]["id"], id, "{report}");
    assert_eq!(report["broken"]["position"], position, "{report}");
    assert!(
        stderr.contains(&format!("row id {id} (position {position})")),
        "{stderr}"
    );
    report
}

/// Staging settings with key material of its own (not the development keys).
fn staging(port: u16) -> Vec<(&'static str, String)> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        b64.encode(pkcs8.as_ref())
    );
    let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    vec![
        ("APP_ENV", "staging".into()),
        ("USER_SERVICE_PORT", port.to_string()),
        ("DEBUG", "false".into()),
        ("SESSION_COOKIE_SECURE", "true".into()),
        ("CORS_ALLOWED_ORIGINS", "http://localhost:3002".into()),
        ("JWT_PRIVATE_KEY", pem),
        ("JWT_PREVIOUS_PUBLIC_KEYS", String::new()),
        (
            "CREDENTIALS_ENCRYPTION_KEYS",
            format!("stg-1:{}", b64.encode(key)),
        ),
        ("API_KEY_HASH_SECRET", "a9".repeat(32)),
        ("DATABASE_MIGRATION_URL", String::new()),
    ]
}

#[tokio::test]
async fn staging_refuses_to_serve_as_a_role_that_could_alter_the_audit_log() {
    with_roles(|roles| async move {
        let port = free_port();
        let mut as_owner = staging(port);
        as_owner.push(("DATABASE_URL", roles.owner_url()));

        let check = user_service(&roles, &["check-config"], &as_owner);
        let stdout = text(&check.stdout);
        assert_eq!(check.status.code(), Some(1), "{stdout}");
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("error: DATABASE_URL: role")
                    && l.contains(&format!("{:?} owns audit_logs", roles.owner))),
            "{stdout}"
        );

        let serve = user_service(&roles, &["serve"], &as_owner);
        let stderr = text(&serve.stderr);
        assert_eq!(serve.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("owns audit_logs"), "{stderr}");

        // The app role passes both and the service comes up.
        let as_app = staging(port);
        let check = user_service(&roles, &["check-config"], &as_app);
        assert_eq!(check.status.code(), Some(0), "{}", text(&check.stdout));
        let mut child = command(&roles, &["serve"], &as_app)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let up = wait_for_port(port).await;
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        assert!(
            up,
            "serve as the app role did not start: {}",
            text(&out.stderr)
        );
    })
    .await;
}
