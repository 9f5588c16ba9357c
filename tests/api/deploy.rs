//! deploy/ stays in step with the code: every YAML document and unit file parses, and
//! every environment variable the deploy files set is one the service reads, so a
//! typo (`DATABSE_URL`) fails here instead of silently falling back to a default.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;
use user_service::config::Settings;

use crate::helpers::test_vars;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn deploy_files(suffixes: &[&str]) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files_under(&repo().join("deploy"), &mut all);
    all.retain(|p| {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        suffixes.iter().any(|s| name.ends_with(s))
    });
    all.sort();
    all
}

fn rel(p: &Path) -> String {
    p.strip_prefix(repo()).unwrap_or(p).display().to_string()
}

/// What the service reads: every setting `check-config` prints, the two variables that
/// pick the env file, and the secrets the env files expand with `${…}`.
fn known_names() -> BTreeSet<String> {
    let settings = Settings::from_vars(test_vars("postgres://u@localhost/db")).unwrap();
    let mut known: BTreeSet<String> = settings
        .effective()
        .into_iter()
        .map(|(k, _)| k.to_string())
        .collect();
    known.extend(["APP_ENV".to_string(), "ENV_FILE".to_string()]);
    for env in ["dev", "staging", "production"] {
        let text = std::fs::read_to_string(repo().join(format!(".env.{env}"))).unwrap();
        known.extend(referenced_variables(&text));
    }
    known
}

/// `${NAME}` references in a text.
fn referenced_variables(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        out.push(after[..end].to_string());
        rest = &after[end + 1..];
    }
    out
}

/// Names that are not settings, each with the file that sets it.
fn unknown(names: &BTreeMap<String, String>, known: &BTreeSet<String>) -> Vec<String> {
    names
        .iter()
        .filter(|(name, _)| !known.contains(*name))
        .map(|(name, file)| format!("{name} (in {file})"))
        .collect()
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            Value::deserialize(d).unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", rel(path)))
        })
        .collect();
    assert!(!docs.is_empty(), "{}: no YAML document", rel(path));
    for d in &docs {
        assert!(d.is_mapping(), "{}: a document is not a mapping", rel(path));
    }
    docs
}

/// Environment variable names a YAML document sets: Kubernetes `env:` lists, ConfigMap
/// data, Secret stringData (we name Secret keys after the variables they fill), and
/// compose `environment:` (mapping or `KEY=value` list) outside the database images.
fn yaml_env_names(doc: &Value, file: &str, out: &mut BTreeMap<String, String>) {
    let kind = doc.get("kind").and_then(Value::as_str);
    if let Some(data) = match kind {
        Some("ConfigMap") => doc.get("data"),
        Some("Secret") => doc.get("stringData").or_else(|| doc.get("data")),
        _ => None,
    } {
        for key in data.as_mapping().into_iter().flat_map(|m| m.keys()) {
            out.insert(key.as_str().unwrap().to_string(), file.to_string());
        }
    }
    if let Some(services) = doc.get("services").and_then(Value::as_mapping) {
        for (name, service) in services {
            let image = service.get("image").and_then(Value::as_str).unwrap_or("");
            // postgres/redis images take their own variables (POSTGRES_USER …).
            if image.starts_with("postgres") || image.starts_with("redis") {
                continue;
            }
            let env = service
                .get("environment")
                .unwrap_or_else(|| panic!("{file}: service {name:?} sets no environment"));
            match env {
                Value::Mapping(m) => {
                    for k in m.keys() {
                        out.insert(k.as_str().unwrap().to_string(), file.to_string());
                    }
                }
                Value::Sequence(items) => {
                    for item in items {
                        let s = item.as_str().unwrap();
                        out.insert(s.split('=').next().unwrap().to_string(), file.to_string());
                    }
                }
                other => panic!("{file}: unexpected environment {other:?}"),
            }
        }
    }
    walk_env_lists(doc, file, out);
}

fn walk_env_lists(v: &Value, file: &str, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                if k.as_str() == Some("env") {
                    if let Some(items) = child.as_sequence() {
                        for item in items {
                            let name =
                                item.get("name").and_then(Value::as_str).unwrap_or_else(|| {
                                    panic!("{file}: env entry without a name: {item:?}")
                                });
                            out.insert(name.to_string(), file.to_string());
                        }
                    }
                }
                walk_env_lists(child, file, out);
            }
        }
        Value::Sequence(items) => items.iter().for_each(|i| walk_env_lists(i, file, out)),
        _ => {}
    }
}

/// A systemd unit: `[Section]` headers and `Key=value` lines, `#`/`;` comments,
/// backslash continuations. Returns (section, key, value) triples.
fn parse_unit(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut section: Option<String> = None;
    let mut out = Vec::new();
    let mut pending = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let full = std::mem::take(&mut pending) + line;
        if full.starts_with('[') {
            assert!(full.ends_with(']'), "{}:{}: bad section", rel(path), i + 1);
            section = Some(full[1..full.len() - 1].to_string());
            continue;
        }
        let (key, value) = full
            .split_once('=')
            .unwrap_or_else(|| panic!("{}:{}: expected Key=value", rel(path), i + 1));
        let key = key.trim();
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "{}:{}: bad key {key:?}",
            rel(path),
            i + 1
        );
        let section = section
            .clone()
            .unwrap_or_else(|| panic!("{}:{}: entry before any section", rel(path), i + 1));
        out.push((section, key.to_string(), value.trim().to_string()));
    }
    out
}

/// `Environment=A=1 "B=two words"` → [A, B].
fn unit_environment_names(value: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in value.chars().chain(std::iter::once(' ')) {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if let Some((name, _)) = word.split_once('=') {
                    names.push(name.to_string());
                }
                word.clear();
            }
            c => word.push(c),
        }
    }
    names
}

/// `KEY=value` lines of a dotenv-style file (values may span lines inside quotes).
fn env_file_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_quote = false;
    for line in text.lines() {
        let t = line.trim();
        if in_quote {
            in_quote = t.matches('"').count() % 2 == 0;
            continue;
        }
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let (k, v) = t.split_once('=').expect("KEY=value");
        names.push(k.trim().to_string());
        in_quote = v.matches('"').count() % 2 == 1;
    }
    names
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let files = deploy_files(&[".yaml", ".yml"]);
    assert!(
        files.len() >= 8,
        "expected compose + k8s manifests, got {files:?}"
    );
    let mut kinds = BTreeSet::new();
    for f in &files {
        for doc in yaml_documents(f) {
            if let Some(k) = doc.get("kind").and_then(Value::as_str) {
                kinds.insert(k.to_string());
            }
        }
    }
    for k in [
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Job",
        "Kustomization",
    ] {
        assert!(
            kinds.contains(k),
            "no {k} manifest under deploy/ ({kinds:?})"
        );
    }
}

#[test]
fn kubernetes_probes_use_grpc_health_and_the_service_port() {
    let doc = yaml_documents(&repo().join("deploy/k8s/deployment.yaml")).remove(0);
    let container = &doc["spec"]["template"]["spec"]["containers"][0];
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(
        container["readinessProbe"]["grpc"]["port"].as_u64(),
        Some(port)
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/health/live")
    );
    let config = yaml_documents(&repo().join("deploy/k8s/configmap.yaml")).remove(0);
    assert_eq!(
        config["data"]["USER_SERVICE_PORT"]
            .as_str()
            .map(|p| p.parse::<u64>().unwrap()),
        Some(port)
    );
    // Every Secret key the manifests reference exists in the example Secret of
    // that name.
    let secrets = yaml_documents(&repo().join("deploy/k8s/secret.example.yaml"));
    let mut refs = Vec::new();
    for f in deploy_files(&[".yaml"]) {
        for doc in yaml_documents(&f) {
            collect_secret_refs(&doc, &mut refs);
        }
    }
    assert!(!refs.is_empty());
    for (name, key) in refs {
        let secret = secrets
            .iter()
            .find(|s| s["metadata"]["name"].as_str() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no Secret {name} in secret.example.yaml"));
        assert!(
            secret["stringData"].get(key.as_str()).is_some(),
            "secretKeyRef {name}/{key} missing from secret.example.yaml"
        );
    }
}

/// (secret name, key) of every `secretKeyRef` in a document.
fn collect_secret_refs(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                if k.as_str() == Some("secretKeyRef") {
                    out.push((
                        child["name"].as_str().unwrap().to_string(),
                        child["key"].as_str().unwrap().to_string(),
                    ));
                }
                collect_secret_refs(child, out);
            }
        }
        Value::Sequence(items) => items.iter().for_each(|i| collect_secret_refs(i, out)),
        _ => {}
    }
}

#[test]
fn systemd_units_parse_and_are_hardened() {
    let units = deploy_files(&[".service"]);
    let envs: Vec<String> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for e in [
        "user-service-dev.service",
        "user-service-staging.service",
        "user-service-production.service",
    ] {
        assert!(envs.iter().any(|n| n == e), "missing deploy/systemd/{e}");
    }
    for unit in &units {
        let entries = parse_unit(unit);
        let get = |section: &str, key: &str| {
            entries
                .iter()
                .find(|(s, k, _)| s == section && k == key)
                .map(|(_, _, v)| v.as_str())
        };
        for section in ["Unit", "Service", "Install"] {
            assert!(
                entries.iter().any(|(s, _, _)| s == section),
                "{}: no [{section}]",
                rel(unit)
            );
        }
        for (key, want) in [
            ("NoNewPrivileges", Some("yes")),
            ("ProtectSystem", Some("strict")),
            ("PrivateTmp", Some("yes")),
            ("ProtectHome", Some("yes")),
            ("CapabilityBoundingSet", Some("")),
            ("Restart", Some("on-failure")),
        ] {
            assert_eq!(get("Service", key), want, "{}: {key}", rel(unit));
        }
        for key in ["User", "WorkingDirectory", "EnvironmentFile", "ExecStart"] {
            assert!(
                get("Service", key).is_some_and(|v| !v.is_empty()),
                "{}: {key}",
                rel(unit)
            );
        }
        let name = unit.file_name().unwrap().to_string_lossy().to_string();
        let env = name
            .trim_start_matches("user-service-")
            .trim_end_matches(".service");
        let environment = get("Service", "Environment").unwrap_or_default();
        assert!(
            environment.contains(&format!(
                "ENV_FILE=/opt/stocksblitz/user-service/.env.{env}"
            )),
            "{}: ENV_FILE must point at .env.{env}",
            rel(unit)
        );
    }
}

#[test]
fn nginx_sites_proxy_json_and_grpc_to_the_local_port() {
    for (env, port) in [("staging", 8111), ("production", 8211)] {
        let path = repo().join(format!("deploy/nginx/user-service-{env}.conf"));
        let text = std::fs::read_to_string(&path).unwrap();
        let code: String = text
            .lines()
            .map(|l| l.split('#').next().unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            code.matches('{').count(),
            code.matches('}').count(),
            "{env}: unbalanced braces"
        );
        for needle in [
            format!("server 127.0.0.1:{port};"),
            "grpc_pass grpc://".into(),
            "proxy_pass http://".into(),
            "location /stocksblitz.user.v1.".into(),
            "location /grpc.".into(),
            "ssl_certificate ".into(),
            "Strict-Transport-Security".into(),
            "X-Content-Type-Options".into(),
            "frame-ancestors".into(),
            "X-Forwarded-For".into(),
        ] {
            assert!(code.contains(&needle), "{env}: missing {needle:?}");
        }
        // One kept-alive pool for both would hand HTTP/1.1 connections to gRPC (502s).
        let target = |directive: &str| -> BTreeSet<String> {
            code.lines()
                .filter_map(|l| l.trim().strip_prefix(directive))
                .map(|t| t.trim_end_matches(';').to_string())
                .collect()
        };
        let grpc = target("grpc_pass grpc://");
        let http = target("proxy_pass http://");
        assert!(
            grpc.is_disjoint(&http),
            "{env}: grpc_pass and proxy_pass share an upstream"
        );
    }
}

#[test]
fn deploy_files_set_only_settings_the_service_knows() {
    let known = known_names();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for f in deploy_files(&[".yaml", ".yml"]) {
        for doc in yaml_documents(&f) {
            yaml_env_names(&doc, &rel(&f), &mut names);
        }
    }
    for unit in deploy_files(&[".service"]) {
        for (_, key, value) in parse_unit(&unit) {
            if key == "Environment" {
                for n in unit_environment_names(&value) {
                    names.insert(n, rel(&unit));
                }
            }
        }
    }
    for f in deploy_files(&[".env.example"]) {
        for n in env_file_names(&std::fs::read_to_string(&f).unwrap()) {
            names.insert(n, rel(&f));
        }
    }
    // The Dockerfile's ENV lines.
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let mut in_env = false;
    for line in dockerfile.lines() {
        let t = line.trim();
        if t.starts_with("ENV ") || in_env {
            for word in t.trim_start_matches("ENV ").split_whitespace() {
                if let Some((n, _)) = word.split_once('=') {
                    names.insert(n.to_string(), "deploy/Dockerfile".into());
                }
            }
            in_env = t.ends_with('\\');
        }
    }
    for must in [
        "DATABASE_URL",
        "REDIS_URL",
        "APP_ENV",
        "ENV_FILE",
        "USER_SERVICE_PORT",
    ] {
        assert!(
            names.contains_key(must),
            "no deploy file sets {must}: {names:?}"
        );
    }
    let bad = unknown(&names, &known);
    assert!(bad.is_empty(), "unknown settings in deploy/: {bad:?}");

    // The check itself catches a typo.
    let typo = BTreeMap::from([("DATABSE_URL".to_string(), "x".to_string())]);
    assert_eq!(unknown(&typo, &known).len(), 1);
}

#[test]
fn unit_and_env_file_parsers_read_what_systemd_reads() {
    assert_eq!(
        unit_environment_names(r#"APP_ENV=staging "ENV_FILE=/a b/.env" X="y z""#),
        ["APP_ENV", "ENV_FILE", "X"]
    );
    let text = "A=1\n# c\nB=\"line one\nline two\"\nC=\n";
    assert_eq!(env_file_names(text), ["A", "B", "C"]);
    assert_eq!(referenced_variables("x=${A}-${B_2}"), ["A", "B_2"]);
}

// --- systemd: the syscall filter lets the hashing threads lower their priority ----

/// Whether a unit's `SystemCallFilter=` lines, in order, allow `call`, as
/// systemd.exec(5) reads them: the first line decides the kind of list (allow, or
/// `~` deny), later lines add to or take from it, an empty one resets. `contains`
/// says whether a name (`@group` or call) covers `call`.
fn syscall_allowed(filters: &[String], call: &str, contains: &dyn Fn(&str) -> bool) -> bool {
    let mut allowed: Option<bool> = None;
    for f in filters {
        if f.is_empty() {
            allowed = None;
            continue;
        }
        let (deny, list) = match f.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, f.as_str()),
        };
        let named = list.split_whitespace().any(|t| t == call || contains(t));
        allowed = Some(match allowed {
            None => named != deny,
            Some(_) if named => !deny,
            Some(before) => before,
        });
    }
    allowed.unwrap_or(true)
}

/// The syscall groups (recursively) that include sched_setscheduler: systemd 252's
/// sets, confirmed with `systemd-analyze syscall-filter` where it is installed.
fn groups_with_sched_setscheduler(group: &str) -> bool {
    const STATIC: [&str; 3] = ["@resources", "@system-service", "@known"];
    let analyze = |g: &str| -> Option<Vec<String>> {
        let out = std::process::Command::new("systemd-analyze")
            .args(["syscall-filter", g])
            .output()
            .ok()?;
        out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .skip(1)
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        })
    };
    fn expand(
        g: &str,
        analyze: &dyn Fn(&str) -> Option<Vec<String>>,
        seen: &mut BTreeSet<String>,
    ) -> Option<bool> {
        if !seen.insert(g.to_string()) {
            return Some(false);
        }
        let members = analyze(g)?;
        for m in members {
            if m == "sched_setscheduler" || (m.starts_with('@') && expand(&m, analyze, seen)?) {
                return Some(true);
            }
        }
        Some(false)
    }
    if !group.starts_with('@') {
        return false;
    }
    match expand(group, &analyze, &mut BTreeSet::new()) {
        Some(found) => {
            assert_eq!(
                found,
                STATIC.contains(&group),
                "systemd-analyze disagrees about {group}"
            );
            found
        }
        None => STATIC.contains(&group),
    }
}

#[test]
fn the_syscall_filter_reading_matches_systemd() {
    let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let f = &groups_with_sched_setscheduler;
    // The units as shipped before: ~@resources denied it.
    assert!(!syscall_allowed(
        &lines(&["@system-service", "~@privileged @resources"]),
        "sched_setscheduler",
        f
    ));
    assert!(syscall_allowed(
        &lines(&[
            "@system-service",
            "~@privileged @resources",
            "sched_setscheduler"
        ]),
        "sched_setscheduler",
        f
    ));
    assert!(!syscall_allowed(
        &lines(&["@basic-io"]),
        "sched_setscheduler",
        f
    ));
    assert!(syscall_allowed(
        &lines(&["~@privileged"]),
        "sched_setscheduler",
        f
    ));
    assert!(syscall_allowed(&[], "sched_setscheduler", f));
}

/// The hashing threads move themselves to SCHED_IDLE (src/crypto/password.rs); a
/// unit whose filter denies sched_setscheduler silently loses that.
#[test]
fn systemd_units_let_the_hashing_threads_lower_their_priority() {
    let units = deploy_files(&[".service"]);
    assert!(units.len() >= 3);
    for unit in &units {
        let entries = parse_unit(unit);
        let filters: Vec<String> = entries
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == "SystemCallFilter")
            .map(|(_, _, v)| v.clone())
            .collect();
        assert!(!filters.is_empty(), "{}: no SystemCallFilter", rel(unit));
        assert!(
            syscall_allowed(
                &filters,
                "sched_setscheduler",
                &groups_with_sched_setscheduler
            ),
            "{}: SystemCallFilter denies sched_setscheduler ({filters:?})",
            rel(unit)
        );
        // The rest of the sandbox stays: privileged calls denied, no real-time.
        let get = |key: &str| {
            entries
                .iter()
                .find(|(s, k, _)| s == "Service" && k == key)
                .map(|(_, _, v)| v.as_str())
        };
        assert_eq!(get("RestrictRealtime"), Some("yes"), "{}", rel(unit));
        assert!(
            filters
                .iter()
                .any(|f| f.starts_with('~') && f.contains("@privileged")),
            "{}",
            rel(unit)
        );
    }
}

/// Where systemd-analyze is installed: `verify` finds nothing but the binary that
/// is not installed here, and the offline security rating stays "OK" (below 2).
#[test]
fn systemd_analyze_accepts_the_units_when_it_is_installed() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no systemd-analyze");
        return;
    }
    let dir = std::env::temp_dir().join(format!("us-units-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    for unit in deploy_files(&[".service"]) {
        let copy = dir.join(unit.file_name().unwrap());
        std::fs::copy(&unit, &copy).unwrap();
        let verify = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let complaints: Vec<String> = String::from_utf8_lossy(&verify.stderr)
            .lines()
            .filter(|l| !l.contains("is not executable"))
            .map(str::to_string)
            .collect();
        assert!(complaints.is_empty(), "{}: {complaints:?}", rel(&unit));
        let security = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(&copy)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&security.stdout);
        let level: f64 = out
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{}: no rating in {out}", rel(&unit)));
        assert!(level < 2.0, "{}: exposure {level}", rel(&unit));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn metrics_report_whether_hashing_runs_at_low_priority() {
    let app = crate::helpers::TestApp::spawn().await;
    let body = app.get("/metrics").await.text().await.unwrap();
    // The test process is not sandboxed: SCHED_IDLE takes, and says so.
    assert!(
        body.lines().any(|l| l == "password_hashing_low_priority 1"),
        "{body}"
    );
}

/// Installs, in the calling process (a child before exec), a seccomp filter that
/// fails sched_setscheduler with EPERM, as systemd's `~@resources` did.
///
/// # Safety
/// Only async-signal-safe calls (prctl) on stack data: fit for `pre_exec`.
unsafe fn deny_sched_setscheduler() -> std::io::Result<()> {
    let stmt = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        // seccomp_data.nr, at offset 0; the call → EPERM, the rest → allowed.
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        stmt(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            1,
            libc::SYS_sched_setscheduler as u32,
        ),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl reads `prog` and the filter, both alive for the calls.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The binary in a sandbox that refuses SCHED_IDLE (the shipped units' old filter):
/// it starts, warns once, and /metrics says 0.
#[tokio::test]
async fn a_sandbox_refusing_sched_idle_gets_a_warning_and_a_metric() {
    use std::os::unix::process::CommandExt as _;
    let port = crate::helpers::free_port();
    let mut vars = test_vars(&crate::helpers::fresh_database().await);
    vars.insert("USER_SERVICE_PORT".into(), port.to_string());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"));
    cmd.arg("serve")
        .current_dir(std::env::temp_dir())
        .env_clear()
        .envs(vars)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: the closure only calls prctl (async-signal-safe) on its own stack.
    unsafe {
        cmd.pre_exec(|| deny_sched_setscheduler());
    }
    let mut child = cmd.spawn().unwrap();
    let up = crate::helpers::wait_for_port(port).await;
    let metrics = if up {
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    } else {
        String::new()
    };
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(up, "did not start under the filter:\n{log}");
    assert!(
        metrics
            .lines()
            .any(|l| l == "password_hashing_low_priority 0"),
        "{metrics}"
    );
    assert!(
        log.contains("password-hashing threads run at normal priority (SCHED_IDLE refused)"),
        "no start-up warning:\n{log}"
    );
    assert_eq!(
        log.matches("SCHED_IDLE refused").count(),
        1,
        "one warning, not one per thread:\n{log}"
    );
}

// --- README: the secrets file is never overwritten ------------------------------

/// Shell commands in a Markdown file's ```sh blocks, backslash continuations
/// joined.
fn shell_commands(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in markdown.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_block = t == "```sh" || t == "```bash";
            continue;
        }
        if !in_block || t.starts_with('#') {
            continue;
        }
        let code = t.split(" #").next().unwrap().trim_end();
        if let Some(cont) = code.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
        } else {
            pending.push_str(code);
            out.push(std::mem::take(&mut pending));
        }
    }
    out
}

/// Commands that put an example secrets file in place without a guard against an
/// existing one.
fn secrets_overwrites(commands: &[String]) -> Vec<String> {
    commands
        .iter()
        .filter(|c| c.contains(".env.example") && c.contains("/etc/stocksblitz"))
        .filter(|c| {
            let guarded = c.contains("test -e ")
                || c.contains("[ -e ")
                || c.contains("cp -n ")
                || c.contains("--no-clobber")
                || c.contains("--update=none");
            !guarded
        })
        .cloned()
        .collect()
}

#[test]
fn install_steps_never_overwrite_an_existing_secrets_file() {
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    let commands = shell_commands(&readme);
    assert!(
        commands
            .iter()
            .any(|c| c.contains("production.env.example")),
        "the README no longer installs the secrets file: {commands:?}"
    );
    let bad = secrets_overwrites(&commands);
    assert!(
        bad.is_empty(),
        "overwrites an existing secrets file: {bad:?}"
    );
    // Scripts too.
    for dir in ["scripts", "deploy"] {
        let mut files = Vec::new();
        files_under(&repo().join(dir), &mut files);
        for f in files.iter().filter(|f| {
            let name = f.file_name().unwrap().to_string_lossy();
            name.ends_with(".sh") || !name.contains('.')
        }) {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            let bad = secrets_overwrites(&lines);
            assert!(bad.is_empty(), "{}: {bad:?}", rel(f));
        }
    }
    // The step as it was shipped is caught.
    let old = "```sh\nsudo install -D -m 0640 -g stocksblitz deploy/systemd/production.env.example \\\n     /etc/stocksblitz/user-service/production.env\n```\n";
    assert_eq!(secrets_overwrites(&shell_commands(old)).len(), 1);
}

// --- nginx ------------------------------------------------------------------------

/// One nginx directive: its words and, for a block, the directives inside.
#[derive(Debug, Clone)]
struct Directive {
    words: Vec<String>,
    block: Option<Vec<Directive>>,
}

impl Directive {
    fn name(&self) -> &str {
        &self.words[0]
    }
    fn args(&self) -> String {
        self.words[1..].join(" ")
    }
    fn children(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or(&[])
    }
    fn all(&self, name: &str) -> Vec<&Directive> {
        self.children()
            .iter()
            .filter(|d| d.name() == name)
            .collect()
    }
    fn value(&self, name: &str) -> Option<String> {
        self.all(name).first().map(|d| d.args())
    }
}

/// nginx's configuration syntax: words, "quoted strings", `#` comments, `;` ends a
/// directive, `{ … }` a block.
fn parse_nginx(text: &str) -> Vec<Directive> {
    let mut tokens: Vec<String> = Vec::new();
    let mut chars = text.chars().peekable();
    let mut word = String::new();
    let flush = |word: &mut String, tokens: &mut Vec<String>| {
        if !word.is_empty() {
            tokens.push(std::mem::take(word));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '#' => {
                flush(&mut word, &mut tokens);
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' => {
                for q in chars.by_ref() {
                    if q == c {
                        break;
                    }
                    word.push(q);
                }
            }
            ';' | '{' | '}' => {
                flush(&mut word, &mut tokens);
                tokens.push(c.to_string());
            }
            c if c.is_whitespace() => flush(&mut word, &mut tokens),
            c => word.push(c),
        }
    }
    flush(&mut word, &mut tokens);
    fn block(tokens: &[String], i: &mut usize) -> Vec<Directive> {
        let mut out = Vec::new();
        let mut words = Vec::new();
        while *i < tokens.len() {
            let t = &tokens[*i];
            *i += 1;
            match t.as_str() {
                ";" => out.push(Directive {
                    words: std::mem::take(&mut words),
                    block: None,
                }),
                "{" => {
                    let inner = block(tokens, i);
                    out.push(Directive {
                        words: std::mem::take(&mut words),
                        block: Some(inner),
                    });
                }
                "}" => return out,
                _ => words.push(t.clone()),
            }
        }
        assert!(words.is_empty(), "unterminated directive {words:?}");
        out
    }
    block(&tokens, &mut 0)
}

fn nginx_conf(name: &str) -> Vec<Directive> {
    parse_nginx(&std::fs::read_to_string(repo().join("deploy/nginx").join(name)).unwrap())
}

fn is_tls(server: &Directive) -> bool {
    server
        .all("listen")
        .iter()
        .any(|l| l.words.iter().any(|w| w == "ssl"))
}

/// Mozilla "intermediate" for TLS 1.2: forward-secret ECDHE with AEAD ciphers.
const MOZILLA_INTERMEDIATE_ECDHE: [&str; 6] = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
];

#[test]
fn nginx_sites_hide_reflection_and_the_version_and_use_modern_ciphers() {
    for env in ["staging", "production"] {
        let conf = nginx_conf(&format!("user-service-{env}.conf"));
        let servers: Vec<&Directive> = conf.iter().filter(|d| d.name() == "server").collect();
        assert!(
            servers.len() >= 2,
            "{env}: expected an :80 and a :443 server"
        );
        for server in &servers {
            assert_eq!(
                server.value("server_tokens").as_deref(),
                Some("off"),
                "{env}: server_tokens on {server:?}"
            );
            // The catch-all lives in default-server.conf, once per host.
            for l in server.all("listen") {
                assert!(!l.args().contains("default_server"), "{env}: {l:?}");
            }
        }
        let tls = servers.iter().find(|s| is_tls(s)).expect("a TLS server");
        let ciphers = tls.value("ssl_ciphers").expect("ssl_ciphers set");
        for c in ciphers.split(':') {
            assert!(
                MOZILLA_INTERMEDIATE_ECDHE.contains(&c),
                "{env}: cipher {c} is not in Mozilla's intermediate ECDHE list"
            );
        }
        assert_eq!(
            tls.value("ssl_protocols").as_deref(),
            Some("TLSv1.2 TLSv1.3")
        );

        let locations = tls.all("location");
        let at = |path: &str| locations.iter().find(|l| l.args() == path).copied();
        // No catch-all /grpc. prefix that would pass reflection through.
        assert!(at("/grpc.").is_none(), "{env}: /grpc. proxies reflection");
        assert!(at("/grpc.health.v1.Health/").is_some(), "{env}: health");
        let reflection = at("/grpc.reflection.").expect("a /grpc.reflection. location");
        let rules: Vec<(String, String)> = reflection
            .children()
            .iter()
            .filter(|d| d.name() == "allow" || d.name() == "deny")
            .map(|d| (d.name().to_string(), d.args()))
            .collect();
        assert_eq!(
            rules.last(),
            Some(&("deny".to_string(), "all".to_string())),
            "{env}: reflection must end with deny all: {rules:?}"
        );
        for (kind, net) in &rules[..rules.len() - 1] {
            assert_eq!(kind, "allow", "{env}: {rules:?}");
            let net: ipnet::IpNet = net
                .parse()
                .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .unwrap_or_else(|_| panic!("{env}: allow {net}"));
            let internal = match net.addr() {
                std::net::IpAddr::V4(a) => a.is_private() || a.is_loopback(),
                std::net::IpAddr::V6(a) => a.is_loopback() || (a.segments()[0] & 0xfe00) == 0xfc00,
            };
            assert!(internal, "{env}: reflection open to {net}");
        }
    }
}

#[test]
fn nginx_default_server_drops_unknown_host_names() {
    let conf = nginx_conf("default-server.conf");
    let servers: Vec<&Directive> = conf.iter().filter(|d| d.name() == "server").collect();
    for port in ["80", "443"] {
        let server = servers
            .iter()
            .find(|s| {
                s.all("listen")
                    .iter()
                    .any(|l| l.words[1] == port && l.words.iter().any(|w| w == "default_server"))
            })
            .unwrap_or_else(|| panic!("no default_server on {port}"));
        assert_eq!(server.value("return").as_deref(), Some("444"), ":{port}");
        assert_eq!(server.value("server_tokens").as_deref(), Some("off"));
        if port == "443" {
            assert!(is_tls(server));
            assert_eq!(
                server.value("ssl_reject_handshake").as_deref(),
                Some("on"),
                "unknown SNI names must not even get the certificate"
            );
        }
    }
}

/// The nginx binary: `NGINX` if set, else `nginx` on PATH or in /usr/sbin.
fn nginx_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NGINX") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

#[test]
fn nginx_accepts_the_sites_when_it_is_installed() {
    let Some(nginx) = nginx_binary() else {
        eprintln!("skipped: no nginx binary (set NGINX=/path/to/nginx to run it)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("us-nginx-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    // A throwaway certificate in place of the placeholders.
    let cert = rcgen::generate_simple_self_signed(vec!["users.stocksblitz.com".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let mut includes = String::new();
    for name in [
        "default-server.conf",
        "user-service-staging.conf",
        "user-service-production.conf",
    ] {
        let text = std::fs::read_to_string(repo().join("deploy/nginx").join(name)).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with("ssl_certificate_key ") {
                    format!("ssl_certificate_key {};", dir.join("key.pem").display())
                } else if t.starts_with("ssl_certificate ") {
                    format!("ssl_certificate {};", dir.join("cert.pem").display())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.join(name), text).unwrap();
        includes.push_str(&format!("  include {};\n", dir.join(name).display()));
    }
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  \
             client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n  \
             uwsgi_temp_path {d}; scgi_temp_path {d};\n{includes}}}\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(&nginx)
        .arg("-t")
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "nginx -t failed:\n{stderr}");
    assert!(stderr.contains("test is successful"), "{stderr}");
}

// --- Kubernetes ---------------------------------------------------------------------

fn k8s(path: &str) -> Vec<Value> {
    yaml_documents(&repo().join("deploy/k8s").join(path.trim_start_matches('/')))
}

/// The resources a kustomization lists, as (file, documents).
fn kustomization_resources(dir: &str) -> Vec<(String, Vec<Value>)> {
    let k = k8s(&format!("{dir}/kustomization.yaml")).remove(0);
    k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| {
            let r = r.as_str().unwrap();
            let path = if dir.is_empty() {
                r.to_string()
            } else {
                format!("{dir}/{r}")
            };
            let docs = k8s(&path);
            (path, docs)
        })
        .collect()
}

fn container_images(doc: &Value) -> Vec<String> {
    let spec = &doc["spec"]["template"]["spec"];
    spec["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["image"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn kustomize_does_not_own_the_shared_namespace() {
    let main = k8s("kustomization.yaml").remove(0);
    assert_eq!(main["namespace"].as_str(), Some("stocksblitz"));
    for dir in ["", "migrate"] {
        for (file, docs) in kustomization_resources(dir) {
            for d in docs {
                assert_ne!(
                    d["kind"].as_str(),
                    Some("Namespace"),
                    "{file}: `kubectl delete -k` would delete the platform's namespace"
                );
            }
        }
    }
    // Creating it is documented, apart from the kustomization.
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    assert!(readme.contains("kubectl apply -f deploy/k8s/namespace.yaml"));
}

#[test]
fn the_deployment_and_the_migration_job_run_one_image_tag() {
    let image_of = |dir: &str, kind: &str| -> Vec<String> {
        kustomization_resources(dir)
            .into_iter()
            .flat_map(|(_, docs)| docs)
            .filter(|d| d["kind"].as_str() == Some(kind))
            .flat_map(|d| container_images(&d))
            .collect()
    };
    let deployment = image_of("", "Deployment");
    let job = image_of("migrate", "Job");
    assert_eq!(deployment.len(), 1);
    assert_eq!(
        job, deployment,
        "the Job runs another image than the Deployment"
    );
    // No tag in the manifests: the one tag is the shared component's.
    assert!(
        !deployment[0].contains(':'),
        "{deployment:?} carries its own tag"
    );
    let mut tags = Vec::new();
    let mut kustomizations = Vec::new();
    files_under(&repo().join("deploy/k8s"), &mut kustomizations);
    for f in kustomizations
        .iter()
        .filter(|f| f.file_name().unwrap() == "kustomization.yaml")
    {
        let k = yaml_documents(f).remove(0);
        for i in k["images"].as_sequence().into_iter().flatten() {
            tags.push((rel(f), i["name"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(
        tags,
        [(
            "deploy/k8s/image/kustomization.yaml".to_string(),
            deployment[0].clone()
        )],
        "exactly one images: entry, in the shared component"
    );
    let component = k8s("image/kustomization.yaml").remove(0);
    assert_eq!(component["kind"].as_str(), Some("Component"));
    for (dir, path) in [("", "image"), ("migrate", "../image")] {
        let k = k8s(&format!("{dir}/kustomization.yaml")).remove(0);
        assert!(
            k["components"]
                .as_sequence()
                .is_some_and(|c| c.iter().any(|c| c.as_str() == Some(path))),
            "deploy/k8s/{dir}: does not include the image component"
        );
    }
    // With kubectl at hand, what kustomize renders agrees.
    let render = |dir: &str| -> Option<Vec<String>> {
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join("deploy/k8s").join(dir))
            .output()
            .ok()?;
        assert!(
            out.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        Some(
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("image: "))
                .map(str::to_string)
                .collect(),
        )
    };
    if let (Some(d), Some(j)) = (render(""), render("migrate")) {
        assert_eq!(d.len(), 1);
        assert_eq!(d, j);
        assert!(d[0].starts_with("stocksblitz/user-service:"), "{d:?}");
    }
}

#[test]
fn forwarded_addresses_count_only_from_the_ingress_behind_a_network_policy() {
    let config = k8s("configmap.yaml").remove(0);
    assert!(
        config["data"].get("TRUST_FORWARDED_FOR").is_none(),
        "the boolean trusts X-Forwarded-For from anyone who reaches the pod"
    );
    let proxies = config["data"]["TRUSTED_PROXIES"]
        .as_str()
        .expect("TRUSTED_PROXIES set");
    for cidr in proxies.split(',').map(str::trim) {
        let net: ipnet::IpNet = cidr.parse().unwrap_or_else(|_| panic!("{cidr}"));
        assert!(
            net.prefix_len() > 0,
            "TRUSTED_PROXIES trusts everyone: {cidr}"
        );
    }
    let policy = kustomization_resources("")
        .into_iter()
        .flat_map(|(_, docs)| docs)
        .find(|d| d["kind"].as_str() == Some("NetworkPolicy"))
        .expect("a NetworkPolicy in the kustomization");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["app"].as_str(),
        Some("user-service")
    );
    assert!(policy["spec"]["policyTypes"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|t| t.as_str() == Some("Ingress")));
    let rules = policy["spec"]["ingress"].as_sequence().unwrap();
    let mut peers = Vec::new();
    for rule in rules {
        let from = rule["from"]
            .as_sequence()
            .expect("every rule names its sources (no `from` admits everyone)");
        for p in from {
            assert!(
                p.get("ipBlock").is_none(),
                "an ipBlock admits addresses, not the platform's pods: {p:?}"
            );
            for sel in ["namespaceSelector", "podSelector"] {
                if let Some(s) = p.get(sel) {
                    assert!(
                        s.get("matchLabels").is_some() || s.get("matchExpressions").is_some(),
                        "an empty {sel} admits everyone: {p:?}"
                    );
                }
            }
            peers.push(serde_yaml::to_string(p).unwrap());
        }
    }
    let all = peers.join("\n");
    for who in [
        "ingress-nginx",
        "backend",
        "alert",
        "calendar",
        "ticker",
        "monitoring",
    ] {
        assert!(all.contains(who), "no NetworkPolicy peer for {who}:\n{all}");
    }
}

#[test]
fn the_metrics_token_comes_from_the_secret_and_the_scraper_sends_it() {
    let config = k8s("configmap.yaml").remove(0);
    assert!(
        config["data"].get("METRICS_TOKEN").is_none(),
        "a secret in plain config"
    );
    let secret = k8s("secret.example.yaml")
        .into_iter()
        .find(|s| s["metadata"]["name"].as_str() == Some("user-service"))
        .unwrap();
    assert!(
        secret["stringData"]["METRICS_TOKEN"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "METRICS_TOKEN missing or empty in secret.example.yaml"
    );
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    assert!(
        readme.contains("--from-literal=METRICS_TOKEN="),
        "the secret instructions leave out METRICS_TOKEN"
    );
    let deployment = k8s("deployment.yaml").remove(0);
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap();
    let token = env
        .iter()
        .find(|e| e["name"].as_str() == Some("METRICS_TOKEN"))
        .expect("the Deployment passes METRICS_TOKEN");
    let r = &token["valueFrom"]["secretKeyRef"];
    assert_eq!(r["name"].as_str(), Some("user-service"));
    assert_ne!(
        r["optional"].as_bool(),
        Some(true),
        "a pod nobody can scrape"
    );
    let monitor = k8s("servicemonitor.yaml").remove(0);
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    assert_eq!(endpoint["authorization"]["type"].as_str(), Some("Bearer"));
    assert_eq!(
        endpoint["authorization"]["credentials"]["key"].as_str(),
        Some("METRICS_TOKEN")
    );
    assert_eq!(
        endpoint["authorization"]["credentials"]["name"].as_str(),
        Some("user-service")
    );
}

#[test]
fn only_the_migration_job_holds_the_owner_role() {
    let refs = |path: &str| {
        let mut out = Vec::new();
        for d in k8s(path) {
            collect_secret_refs(&d, &mut out);
        }
        out
    };
    let job = refs("migrate/job.yaml");
    assert!(job.contains(&(
        "user-service-migrate".to_string(),
        "DATABASE_MIGRATION_URL".to_string()
    )));
    let deployment = refs("deployment.yaml");
    assert!(
        deployment
            .iter()
            .all(|(name, key)| name != "user-service-migrate" && key != "DATABASE_MIGRATION_URL"),
        "{deployment:?}"
    );
}
