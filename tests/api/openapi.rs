//! GET /openapi.json: an OpenAPI 3.1 document that names every gateway route, and
//! (when schemathesis is installed) a fuzzing run against a live instance.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::TestApp;

/// DESIGN.md section 4, one `METHOD path` per route, plus the two account routes the
/// table folds into its rows (credentials status, member role change).
const EXPECTED: &[&str] = &[
    "GET /health",
    "GET /health/live",
    "POST /v1/auth/register",
    "POST /v1/auth/login",
    "POST /v1/auth/refresh",
    "POST /v1/auth/logout",
    "POST /v1/auth/token",
    "GET /.well-known/jwks.json",
    "GET /v1/users/me",
    "PATCH /v1/users/me",
    "POST /v1/users/me/password",
    "GET /v1/users/me/accounts",
    "GET /v1/users/me/sessions",
    "DELETE /v1/users/me/sessions/{id}",
    "POST /v1/trading-accounts",
    "GET /v1/trading-accounts",
    "GET /v1/trading-accounts/{id}",
    "PATCH /v1/trading-accounts/{id}",
    "DELETE /v1/trading-accounts/{id}",
    "PUT /v1/trading-accounts/{id}/credentials",
    "GET /v1/trading-accounts/{id}/credentials",
    "GET /v1/trading-accounts/{id}/members",
    "POST /v1/trading-accounts/{id}/members",
    "PATCH /v1/trading-accounts/{id}/members/{user_id}",
    "DELETE /v1/trading-accounts/{id}/members/{user_id}",
    "POST /v1/api-keys",
    "GET /v1/api-keys",
    "GET /v1/api-keys/{id}",
    "DELETE /v1/api-keys/{id}",
    "POST /v1/api-keys/{id}/rotate",
    "GET /v1/api-keys/{id}/usage",
    "GET /v1/admin/users",
    "PATCH /v1/admin/users/{id}",
    "GET /v1/admin/audit-logs",
    // Second factors (issue 14).
    "GET /v1/users/me/mfa",
    "POST /v1/users/me/mfa/totp",
    "DELETE /v1/users/me/mfa/totp",
    "POST /v1/users/me/mfa/totp/confirm",
    "POST /v1/users/me/mfa/recovery-codes",
    "POST /v1/auth/mfa",
    "POST /v1/auth/step-up",
    "DELETE /v1/admin/users/{id}/mfa",
    "GET /openapi.json",
    "GET /metrics",
    // DESIGN.md section 8: verification, reset, email change (issue 15).
    "POST /v1/auth/verify-email",
    "POST /v1/auth/password-reset",
    "POST /v1/auth/password-reset/confirm",
    "POST /v1/users/me/email",
    "POST /v1/users/me/email/verification",
    "POST /v1/admin/users/{id}/password-reset",
];

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

async fn document(app: &TestApp) -> Value {
    let res = app.get("/openapi.json").await;
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    res.json().await.unwrap()
}

fn operations(doc: &Value) -> BTreeSet<String> {
    doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| format!("{} {path}", m.to_uppercase()))
        })
        .collect()
}

#[tokio::test]
async fn openapi_document_is_3_1_and_names_every_route() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;

    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "version: {}",
        doc["openapi"]
    );
    let ops = operations(&doc);
    let missing: Vec<_> = EXPECTED.iter().filter(|e| !ops.contains(**e)).collect();
    assert!(
        missing.is_empty(),
        "routes missing from the document: {missing:?}"
    );

    // The other direction: a method the document does not list on one of its paths
    // must not be served (405), so an undocumented handler on a known path fails.
    let id = uuid::Uuid::new_v4().to_string();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", &id).replace("{user_id}", &id);
        for m in METHODS.iter().filter(|m| item.get(**m).is_none()) {
            let method = reqwest::Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let res = app
                .http
                .request(method, app.url(&concrete))
                .send()
                .await
                .unwrap();
            assert_eq!(
                res.status().as_u16(),
                405,
                "{} {path} is served but not documented",
                m.to_uppercase()
            );
        }
    }

    // Errors: problem+json with the Problem schema, whose `errors` items carry
    // field, code and message.
    let schemas = &doc["components"]["schemas"];
    let problem = &schemas["Problem"];
    for f in ["type", "title", "status", "detail", "code"] {
        assert!(
            problem["required"]
                .as_array()
                .unwrap()
                .contains(&Value::from(f)),
            "Problem.{f} required"
        );
    }
    let field_error = &schemas["FieldError"]["properties"];
    for f in ["field", "code", "message"] {
        assert!(field_error.get(f).is_some(), "FieldError.{f}");
    }
    let errors = problem["properties"]["errors"].to_string();
    assert!(
        errors.contains("#/components/schemas/FieldError"),
        "{errors}"
    );

    for op in &ops {
        let (method, path) = op.split_once(' ').unwrap();
        let operation = &doc["paths"][path][method.to_lowercase()];
        let responses = operation["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{op} has no success response"
        );
        let internal = &responses["500"]["content"]["application/problem+json"]["schema"];
        assert_eq!(
            internal["$ref"], "#/components/schemas/Problem",
            "{op}: 500 is problem+json"
        );
        for (status, response) in responses {
            if status.starts_with('4') || status.starts_with('5') {
                let schema = &response["content"]["application/problem+json"]["schema"]["$ref"];
                // /health answers 503 with its own JSON body, by design.
                if !(path == "/health" && status == "503") {
                    assert_eq!(
                        schema, "#/components/schemas/Problem",
                        "{op} {status}: problem+json"
                    );
                }
            }
        }
        if operation.get("requestBody").is_some() {
            assert!(responses.contains_key("400"), "{op}: 400 documented");
        }
        let secured = operation["security"].as_array().is_some_and(|s| {
            s.iter()
                .any(|r| r.as_object().is_some_and(|o| !o.is_empty()))
        });
        if secured {
            assert!(responses.contains_key("401"), "{op}: 401 documented");
        }
    }

    let mut ids = BTreeSet::new();
    for op in &ops {
        let (method, path) = op.split_once(' ').unwrap();
        let id = doc["paths"][path][method.to_lowercase()]["operationId"].clone();
        assert!(
            ids.insert(id.to_string()),
            "{op}: operationId {id} is not unique"
        );
    }

    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["bearer"]["bearerFormat"], "JWT");
    assert_eq!(schemes["api_key"]["in"], "header");
    assert_eq!(schemes["api_key"]["name"], "X-API-Key");
    assert_eq!(schemes["session_cookie"]["in"], "cookie");
    let me = &doc["paths"]["/v1/users/me"]["get"]["security"];
    for s in ["bearer", "api_key", "session_cookie"] {
        assert!(me.to_string().contains(s), "GET /v1/users/me accepts {s}");
    }
}

/// schemathesis from the venv scripts/api-check and scripts/test create, else PATH.
fn schemathesis() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SCHEMATHESIS") {
        return Some(PathBuf::from(p));
    }
    let venv = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/user-service/venv/bin/schemathesis"));
    if let Some(p) = venv.filter(|p| p.is_file()) {
        return Some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("schemathesis"))
            .find(|p| p.is_file())
    })
}

#[tokio::test]
async fn schemathesis_finds_no_server_errors_or_schema_violations() {
    let Some(bin) = schemathesis() else {
        eprintln!(
            "SKIPPED schemathesis_finds_no_server_errors_or_schema_violations: schemathesis \
             is not installed (scripts/api-check or scripts/test installs it into \
             ~/.cache/user-service/venv)"
        );
        return;
    };
    let app = TestApp::spawn().await;
    let (_, _, token) = app.user_with_token().await;
    // Real ids for the `{id}` paths, so fuzzing reaches the handlers behind the
    // ownership check instead of stopping at 404.
    let account = created_id(
        &app,
        &token,
        "/v1/trading-accounts",
        serde_json::json!({"broker": "zerodha", "broker_user_id": "FZ0001", "nickname": "fuzz"}),
    )
    .await;
    let key = created_id(
        &app,
        &token,
        "/v1/api-keys",
        serde_json::json!({"name": "fuzz", "scopes": ["accounts:read"]}),
    )
    .await;

    let dir = tempfile_dir();
    let config = dir.join("schemathesis.toml");
    std::fs::write(&config, CONFIG).unwrap();

    let started = Instant::now();
    let run = tokio::process::Command::new(&bin)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(app.url("/openapi.json"))
        .args(RUN_ARGS)
        .arg("--max-examples")
        .arg("10")
        .arg("--seed")
        .arg("20251128")
        .env("ST_TOKEN", &token)
        .env("ST_ACCOUNT_ID", &account)
        .env("ST_KEY_ID", &key)
        .env("NO_COLOR", "1")
        .current_dir(&dir)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("schemathesis finishes within 3 minutes")
        .expect("schemathesis runs");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("schemathesis took {:.1}s", elapsed.as_secs_f64());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "schemathesis failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("passed") && !stdout.contains("Tested: 0"),
        "schemathesis ran no operations:\n{stdout}"
    );
}

/// The bearer scheme is filled with the test user's token (through the environment,
/// so it never appears on a command line), and `{id}` with the user's own account
/// and key.
const CONFIG: &str = r#"[auth.openapi.bearer]
bearer = "${ST_TOKEN}"

[[operations]]
include-path-regex = "^/v1/trading-accounts/"
parameters = { "path.id" = "${ST_ACCOUNT_ID}" }

[[operations]]
include-path-regex = "^/v1/api-keys/"
parameters = { "path.id" = "${ST_KEY_ID}" }
"#;

async fn created_id(app: &TestApp, token: &str, path: &str, body: Value) -> String {
    let res = app
        .http
        .post(app.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 201, "POST {path}");
    let created: Value = res.json().await.unwrap();
    created["id"].as_str().unwrap().to_string()
}

/// Checks and exclusions shared with scripts/api-check: logging out or ending the
/// current session would revoke the token mid-run and turn every later case into a 401.
const RUN_ARGS: &[&str] = &[
    "--checks",
    "not_a_server_error,response_schema_conformance",
    "--exclude-path",
    "/v1/auth/logout",
    "--exclude-path",
    "/v1/users/me/sessions/{id}",
    // One worker: Python 3.11's `ast` is not thread-safe ("AST constructor recursion
    // depth mismatch" inside hypothesis), which turns parallel runs into tool errors.
    "--workers",
    "1",
];

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("schemathesis-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The gateway answers with its own wire types: only src/http/ derives OpenAPI
/// schemas, so a domain or service type cannot become part of the published
/// contract (or leak a field onto the wire) by accident.
#[test]
fn only_http_wire_types_derive_openapi_schemas() {
    fn scan(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !path.ends_with("src/http") {
                    scan(&path, found);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                if text.contains("utoipa") {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    let mut found = Vec::new();
    scan(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut found,
    );
    assert!(found.is_empty(), "utoipa outside src/http/: {found:?}");
}
