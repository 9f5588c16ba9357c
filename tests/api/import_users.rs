//! `admin import-users` (issue 15 point 4): users of the FastAPI user_service log in
//! with their old passwords, whose hashes (made by passlib, bcrypt and argon2-cffi:
//! tests/fixtures/make_import_users.py) are then replaced by current argon2id ones.

use serde_json::{json, Value};

use crate::helpers::{login_raw, TestApp, STRONG_PASSWORD};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/import_users.jsonl"
);

/// Each fixture user and the password its hash was made from.
const USERS: [(&str, &str, &str); 6] = [
    ("bcrypt-2b@example.com", "Correct horse 2b", "bcrypt"),
    ("bcrypt-2a@example.com", "Correct horse 2a", "bcrypt"),
    ("bcrypt-2y@example.com", "Correct horse 2y", "bcrypt"),
    ("argon2id@example.com", "Correct horse argon2id", "argon2"),
    ("argon2i@example.com", "Correct horse argon2i", "argon2"),
    (
        "pbkdf2@example.com",
        "Grüße, Mond – pbkdf2 ✓",
        "pbkdf2-sha256",
    ),
];

/// What a fresh argon2id hash of the service starts with.
const CURRENT: &str = "$argon2id$v=19$m=19456,t=2,p=1$";

fn import(app: &TestApp, file: &str, dry_run: bool) -> Value {
    let mut args = vec!["admin", "import-users", file];
    if dry_run {
        args.push("--dry-run");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("ENV_FILE", ".env.dev")
        .envs(crate::helpers::test_keys().iter().cloned())
        .env("DATABASE_URL", &app.database_url)
        .env("REDIS_URL", crate::helpers::redis_url())
        .env("REDIS_KEY_PREFIX", &app.settings.redis_key_prefix)
        .env("LOG_LEVEL", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

async fn hash_of(app: &TestApp, email: &str) -> String {
    sqlx::query_scalar("select password_hash from users where lower(email) = lower($1)")
        .bind(email)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn audit_count(app: &TestApp, action: &str) -> i64 {
    sqlx::query_scalar("select count(*) from audit_logs where action = $1")
        .bind(action)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// Every user row and its roles, and the audit log's length: what a run that
/// "changes nothing" must leave as it found.
async fn snapshot(app: &TestApp) -> (Vec<(String, String, String, bool, String)>, i64) {
    let users = sqlx::query_as(
        "select u.email, coalesce(u.password_hash, ''), u.status, u.email_verified,
                coalesce(string_agg(r.name, ',' order by r.name), '')
           from users u
           left join user_roles ur on ur.user_id = u.id
           left join roles r on r.id = ur.role_id
          group by u.id order by u.email",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let audit = sqlx::query_scalar("select count(*) from audit_logs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    (users, audit)
}

#[tokio::test]
async fn each_hash_kind_logs_in_with_its_old_password_then_is_rehashed() {
    let app = TestApp::spawn().await;
    // A dry run reports what would happen and writes nothing.
    let before = snapshot(&app).await;
    let report = import(&app, FIXTURE, true);
    assert_eq!(
        report,
        json!({"imported": 6, "skipped": 0, "invalid": [], "dry_run": true})
    );
    assert_eq!(snapshot(&app).await, before);

    let report = import(&app, FIXTURE, false);
    assert_eq!(
        report,
        json!({"imported": 6, "skipped": 0, "invalid": [], "dry_run": false})
    );
    assert_eq!(audit_count(&app, "user.imported").await, 6);
    let (users, _) = snapshot(&app).await;
    for (email, _, status, verified, roles) in &users {
        assert_eq!(
            (status.as_str(), *verified, roles.as_str()),
            ("active", false, "user"),
            "{email}"
        );
    }

    for (email, password, scheme) in USERS {
        let legacy = hash_of(&app, email).await;
        assert!(!legacy.starts_with(CURRENT), "{email}: {legacy}");
        // A wrong password is refused like any other, and changes nothing.
        let wrong = login_raw(&app, email, &format!("{password}!")).await;
        assert_eq!(wrong.status(), 401, "{email}");
        assert_eq!(hash_of(&app, email).await, legacy, "{email}");

        let res = login_raw(&app, email, password).await;
        assert_eq!(res.status(), 200, "{email}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["user"]["email"], email);
        let upgraded = hash_of(&app, email).await;
        assert!(upgraded.starts_with(CURRENT), "{email}: {upgraded}");
        let from: String = sqlx::query_scalar(
            "select details->>'from' from audit_logs
              where action = 'user.password_rehashed' and target_id = (
                    select id::text from users where email = $1)",
        )
        .bind(email)
        .fetch_one(&app.db)
        .await
        .unwrap();
        assert_eq!(from, scheme, "{email}");
        // The old password goes on working under the new hash; a wrong one does not.
        assert_eq!(
            login_raw(&app, email, password).await.status(),
            200,
            "{email}"
        );
        assert_eq!(hash_of(&app, email).await, upgraded, "{email}");
        let wrong = login_raw(&app, email, "Correct horse 2c").await;
        assert_eq!(wrong.status(), 401, "{email}");
    }
    assert_eq!(audit_count(&app, "user.password_rehashed").await, 6);

    // A second run changes nothing: every email is there already.
    let before = snapshot(&app).await;
    let report = import(&app, FIXTURE, false);
    assert_eq!(
        report,
        json!({"imported": 0, "skipped": 6, "invalid": [], "dry_run": false})
    );
    assert_eq!(snapshot(&app).await, before);
}

#[tokio::test]
async fn invalid_lines_are_reported_by_number_and_taken_emails_skipped() {
    let app = TestApp::spawn().await;
    let taken = format!("taken-{}@example.com", uuid::Uuid::new_v4().simple());
    app.register(&taken, STRONG_PASSWORD).await;
    let fixture: Vec<String> = std::fs::read_to_string(FIXTURE)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let bcrypt = fixture[0].clone();
    let bcrypt_hash: Value = serde_json::from_str(&bcrypt).unwrap();
    let bcrypt_hash = bcrypt_hash["password_hash"].as_str().unwrap().to_string();
    let with = |email: &str, extra: Value| {
        let mut line =
            json!({"email": email, "full_name": "Moved In", "password_hash": bcrypt_hash});
        for (k, v) in extra.as_object().unwrap() {
            line[k] = v.clone();
        }
        line.to_string()
    };
    let secret_md5 = "$1$saltsalt$qjXMvbEw8oaL.CzflDugX/";
    let lines = [
        /* 1 */ bcrypt.clone(),
        /* 2 */ with(&taken.to_uppercase(), json!({})),
        /* 3 */ "{\"email\": \"broken@example.com\",".to_string(),
        /* 4 */ json!({"email": "nohash@example.com", "full_name": "N"}).to_string(),
        /* 5 */ with("md5@example.com", json!({"password_hash": secret_md5})),
        /* 6 */ "   ".to_string(),
        /* 7 */ with("root@example.com", json!({"roles": ["root"]})),
        /* 8 */ bcrypt.replace("bcrypt-2b@", "BCRYPT-2B@"),
        /* 9 */
        with(
            "short@example.com",
            json!({"password_hash": "$2b$10$tooshort"}),
        ),
        /* 10 */ with("suspended@example.com", json!({"status": "suspended"})),
        /* 11 */
        with(
            "pbkdf2-bad@example.com",
            json!({"password_hash": "$pbkdf2-sha256$29000$c2FsdA$!!!"}),
        ),
        /* 12 */
        with(
            "admin-moved@example.com",
            json!({"roles": ["admin", "user"], "status": "disabled", "email_verified": true,
                   "created_at": "2020-01-02T03:04:05Z"}),
        ),
        /* 13 */ with("not-an-email", json!({})),
    ];
    let dir = std::env::temp_dir().join(format!("us-import-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("users.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let file = file.to_str().unwrap();

    let taken_hash = hash_of(&app, &taken).await;
    let report = import(&app, file, false);
    assert_eq!(report["imported"], 2, "{report}");
    assert_eq!(report["skipped"], 2, "{report}");
    let invalid: Vec<(u64, String)> = report["invalid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["line"].as_u64().unwrap(),
                i["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let numbers: Vec<u64> = invalid.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [3, 4, 5, 7, 9, 10, 11, 13], "{report}");
    for (n, field) in [
        (4, "password_hash"),
        (5, "password_hash"),
        (7, "roles"),
        (9, "password_hash"),
        (10, "status"),
        (11, "password_hash"),
        (13, "email"),
    ] {
        let reason = &invalid.iter().find(|(l, _)| *l == n).unwrap().1;
        assert!(reason.starts_with(field), "line {n}: {reason}");
    }
    // Reasons never quote what the file holds.
    let text = report.to_string();
    for value in [
        secret_md5,
        "root",
        "suspended",
        "tooshort",
        "not-an-email",
        bcrypt_hash.as_str(),
    ] {
        assert!(!text.contains(value), "{text}");
    }
    // The registered user is left as it was.
    assert_eq!(hash_of(&app, &taken).await, taken_hash);
    let row: (String, bool, String, String) = sqlx::query_as(
        "select u.status, u.email_verified, to_char(u.created_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS'),
                string_agg(r.name, ',' order by r.name)
           from users u join user_roles ur on ur.user_id = u.id join roles r on r.id = ur.role_id
          where u.email = 'admin-moved@example.com' group by u.id",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "disabled".into(),
            true,
            "2020-01-02 03:04:05".into(),
            "admin,user".into()
        )
    );
    // A disabled user's right password still opens nothing.
    let res = login_raw(&app, "admin-moved@example.com", "Correct horse 2b").await;
    assert_eq!(res.status(), 401);
    assert_eq!(
        login_raw(&app, "bcrypt-2b@example.com", "Correct horse 2b")
            .await
            .status(),
        200
    );

    // Again, and again as a dry run: nothing changes, and the same lines are named.
    let before = snapshot(&app).await;
    for dry_run in [false, true] {
        let again = import(&app, file, dry_run);
        assert_eq!(again["imported"], 0, "{again}");
        assert_eq!(again["skipped"], 4, "{again}");
        assert_eq!(again["invalid"], report["invalid"]);
        assert_eq!(snapshot(&app).await, before);
    }
    std::fs::remove_dir_all(&dir).ok();
}
