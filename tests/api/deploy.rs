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
    // Every Secret key the manifests reference exists in the example Secret.
    let secret = yaml_documents(&repo().join("deploy/k8s/secret.example.yaml")).remove(0);
    let mut refs = Vec::new();
    for f in deploy_files(&[".yaml"]) {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.lines().filter(|l| l.contains("secretKeyRef")) {
            let key = line.split("key: ").nth(1).unwrap();
            refs.push(key.split([',', '}']).next().unwrap().trim().to_string());
        }
    }
    assert!(!refs.is_empty());
    for key in refs {
        assert!(
            secret["stringData"].get(key.as_str()).is_some(),
            "secretKeyRef {key} missing from secret.example.yaml"
        );
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
