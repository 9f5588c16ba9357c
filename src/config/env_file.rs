//! The env file: which one applies, its `KEY=value` lines and `${VAR}` expansion.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{ConfigError, Environment};

/// Which env file applies: ENV_FILE if set, else `.env` in `dir` if present, else
/// `.env.<dev|staging|production>` by APP_ENV (development when unset).
pub fn choose_env_file(vars: &HashMap<String, String>, dir: &Path) -> Option<PathBuf> {
    if let Some(f) = vars.get("ENV_FILE").filter(|f| !f.is_empty()) {
        let p = PathBuf::from(f);
        return Some(if p.is_absolute() { p } else { dir.join(p) });
    }
    let dot_env = dir.join(".env");
    if dot_env.is_file() {
        return Some(dot_env);
    }
    let env = vars
        .get("APP_ENV")
        .and_then(|e| Environment::parse(e))
        .unwrap_or(Environment::Development);
    let p = dir.join(format!(".env.{}", env.file_suffix()));
    p.is_file().then_some(p)
}

/// Parses `KEY=value` lines (`export ` allowed, `#` comments, single or double
/// quotes, `\n` escapes inside double quotes) and expands `${VAR}` from `vars` and
/// from keys earlier in the file. An unset variable is an error naming it.
pub fn parse_env_file(
    content: &str,
    file: &str,
    vars: &HashMap<String, String>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let (values, mut errors) = parse_env_file_all(content, file, vars);
    if errors.is_empty() {
        Ok(values)
    } else {
        Err(errors.remove(0))
    }
}

/// Like [`parse_env_file`], but reads past problems: every bad line and every unset
/// `${VAR}` is reported (a line with one is left out), so one pass shows them all.
pub fn parse_env_file_all(
    content: &str,
    file: &str,
    vars: &HashMap<String, String>,
) -> (Vec<(String, String)>, Vec<ConfigError>) {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut errors = Vec::new();
    for (idx, raw) in content.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            errors.push(ConfigError::Syntax {
                file: file.into(),
                line: line_no,
                message: "expected KEY=value".into(),
            });
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            errors.push(ConfigError::Syntax {
                file: file.into(),
                line: line_no,
                message: format!("invalid variable name {key:?}"),
            });
            continue;
        }
        let value = value.trim();
        let (value, expand) =
            if let Some(v) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
                (v.to_string(), false)
            } else if let Some(v) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                (v.replace("\\n", "\n").replace("\\\"", "\""), true)
            } else {
                // Unquoted: a ` #` starts a comment.
                let v = value.split(" #").next().unwrap_or("").trim_end();
                (v.to_string(), true)
            };
        if !expand {
            out.push((key.to_string(), value));
            continue;
        }
        let expanded = expand_vars(&value, |name| {
            vars.get(name).cloned().or_else(|| {
                out.iter()
                    .rev()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            })
        });
        match expanded {
            Ok(v) => out.push((key.to_string(), v)),
            Err(unset) => errors.extend(unset.into_iter().map(|var| ConfigError::UnsetVariable {
                file: file.into(),
                line: line_no,
                var,
            })),
        }
    }
    (out, errors)
}

/// Replaces every `${NAME}`; the error lists every unset name.
fn expand_vars(
    value: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(value.len());
    let mut unset = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = &after[..end];
        match lookup(name) {
            Some(v) => out.push_str(&v),
            None if !unset.iter().any(|u| u == name) => unset.push(name.to_string()),
            None => {}
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if unset.is_empty() {
        Ok(out)
    } else {
        Err(unset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expands_and_reports_unset_variable_by_name() {
        let v = vars(&[("PW", "s3cret")]);
        let parsed = parse_env_file("A=x${PW}y\nB=\"${A}-z\"\nC='${NOT}'", "f", &v).unwrap();
        assert_eq!(parsed[0].1, "xs3crety");
        assert_eq!(parsed[1].1, "xs3crety-z");
        assert_eq!(parsed[2].1, "${NOT}");
        let err = parse_env_file("# c\nDB=${MISSING_PW}", "f", &v).unwrap_err();
        assert!(err.to_string().contains("MISSING_PW"), "{err}");
    }
}
