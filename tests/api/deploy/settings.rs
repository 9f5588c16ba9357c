//! Every YAML file parses, the deploy files set only settings the service reads, and
//! the install steps never overwrite a secrets file.

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml::Value;
use user_service::config::Settings;

use crate::helpers::test_vars;

use super::{
    deploy_files, env_file_names, files_under, parse_unit, referenced_variables, rel, repo,
    unit_environment_names, unknown, yaml_documents,
};

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
