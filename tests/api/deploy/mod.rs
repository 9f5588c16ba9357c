//! deploy/ stays in step with the code: every YAML document and unit file parses, and
//! every environment variable the deploy files set is one the service reads, so a
//! typo (`DATABSE_URL`) fails here instead of silently falling back to a default.

mod kubernetes;
mod nginx;
mod settings;
mod systemd;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

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

// --- Kubernetes ---------------------------------------------------------------------

fn k8s(path: &str) -> Vec<Value> {
    yaml_documents(&repo().join("deploy/k8s").join(path.trim_start_matches('/')))
}
