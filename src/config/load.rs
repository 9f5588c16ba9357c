//! Loading: the env file merged under the process environment, placeholders,
//! development key material, then envy, reporting every problem in one pass.

use std::collections::HashMap;
use std::path::Path;

use super::env_file::{choose_env_file, parse_env_file_all};
use super::settings::from_env_iter;
use super::{
    dev_secrets, ConfigError, Environment, Settings, DEV_SECRETS_FILE, PLACEHOLDER_MARKER, SETTINGS,
};
use crate::crypto::key_material;

/// Empty values mean "unset" for optional settings (SENTRY_DSN= in a file),
/// except those the table marks `keep_empty` (ALLOWED_CLIENT_NETWORKS, where empty
/// means everyone).
fn keep_var((k, v): &(String, String)) -> bool {
    !v.is_empty() || SETTINGS.iter().any(|s| s.keep_empty && s.name == k)
}

/// An envy error without the value it quotes (the value may be a secret).
fn describe_envy_error(e: &envy::Error) -> String {
    match e {
        envy::Error::MissingValue(field) => format!("{} is required", field.to_ascii_uppercase()),
        envy::Error::Custom(msg) => match msg.split_once(" while parsing value '") {
            Some((reason, _)) => reason.to_string(),
            None => msg.clone(),
        },
    }
}

impl Settings {
    /// Loads from the process environment and the env file in the current directory.
    pub fn load() -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        let dir = std::env::current_dir().map_err(|e| ConfigError::Read {
            file: ".".into(),
            message: e.to_string(),
        })?;
        Self::load_from(&vars, &dir)
    }

    /// The whole loading rule, with the environment passed in so tests need not
    /// touch the process environment. Fails with every problem found, loading and
    /// validation alike (see [`Settings::inspect_from`]).
    pub fn load_from(vars: &HashMap<String, String>, dir: &Path) -> Result<Self, ConfigError> {
        let (settings, mut problems) = Self::inspect_from(vars, dir)?;
        if problems.is_empty() {
            Ok(settings)
        } else {
            problems.extend(settings.problems());
            Err(ConfigError::Insecure(problems))
        }
    }

    /// Reads everything it can and reports each loading problem instead of stopping
    /// at the first: every unset `${VAR}`, bad line, invalid value, missing required
    /// setting and unfilled `REPLACE_ME` placeholder (whose setting is then treated
    /// as unset). Development fills unset key settings from `.secrets/dev.env` under
    /// `dir`, generating it once. Fails outright only when a file cannot be read or
    /// written.
    pub fn inspect_from(
        vars: &HashMap<String, String>,
        dir: &Path,
    ) -> Result<(Self, Vec<String>), ConfigError> {
        let mut merged: HashMap<String, String> = HashMap::new();
        let mut problems = Vec::new();
        if let Some(path) = choose_env_file(vars, dir) {
            let name = path.display().to_string();
            let content = std::fs::read_to_string(&path).map_err(|e| ConfigError::Read {
                file: name.clone(),
                message: e.to_string(),
            })?;
            let (values, errors) = parse_env_file_all(&content, &name, vars);
            merged.extend(values);
            // A file line whose variable is unset does not matter when a process
            // variable overrides that setting anyway.
            let lines = content.lines().collect::<Vec<_>>();
            for e in errors {
                let overridden = match &e {
                    ConfigError::UnsetVariable { line, .. } => lines
                        .get(line - 1)
                        .and_then(|l| l.trim().trim_start_matches("export ").split_once('='))
                        .is_some_and(|(k, _)| vars.contains_key(k.trim())),
                    _ => false,
                };
                if !overridden {
                    problems.push(e.to_string());
                }
            }
        }
        // Real process variables win over file values and are used as given.
        for (k, v) in vars {
            merged.insert(k.clone(), v.clone());
        }
        let mut placeholders: Vec<String> = merged
            .iter()
            .filter(|(_, v)| v.contains(PLACEHOLDER_MARKER))
            .map(|(k, _)| k.clone())
            .collect();
        placeholders.sort();
        for k in &placeholders {
            merged.remove(k);
        }

        let env = merged
            .get("APP_ENV")
            .map(|e| Environment::parse(e))
            .unwrap_or(Some(Environment::Development));
        let dev_secrets = dir.join(DEV_SECRETS_FILE);
        let mut development_key_fingerprints = Vec::new();
        match env {
            Some(Environment::Development) => {
                for (k, v) in dev_secrets::fill_unset(&dev_secrets, &merged)? {
                    merged.insert(k, v);
                }
            }
            Some(_) => {
                if let Some(dev) = dev_secrets::read(&dev_secrets)? {
                    let get = |k: &str| dev.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
                    development_key_fingerprints = key_material::fingerprints_of(
                        get("JWT_PRIVATE_KEY"),
                        get("JWT_PREVIOUS_PUBLIC_KEYS"),
                        get("CREDENTIALS_ENCRYPTION_KEYS"),
                        get("API_KEY_HASH_SECRET"),
                    );
                }
            }
            None => {}
        }

        let (mut settings, load_problems) = Self::from_vars_reporting(merged);
        // Reported for the settings themselves (JWT_PRIVATE_KEY), not for the
        // variables a file expanded into them (STAGING_JWT_PRIVATE_KEY).
        let names: Vec<&str> = settings.effective().into_iter().map(|(k, _)| k).collect();
        problems.extend(
            placeholders
                .iter()
                .filter(|k| names.contains(&k.as_str()))
                .map(|k| {
                    format!("{k} still holds the example placeholder {PLACEHOLDER_MARKER}: set a real value")
                }),
        );
        problems.extend(load_problems);
        settings.development_key_fingerprints = development_key_fingerprints;
        Ok((settings, problems))
    }

    /// Deserializes from a variable map (no file, no expansion).
    pub fn from_vars<I>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let vars = vars.into_iter().filter(keep_var);
        from_env_iter(vars).map_err(|e| ConfigError::Invalid(describe_envy_error(&e)))
    }

    /// Deserializes, reporting every invalid value and missing required setting
    /// rather than the first: each variable is tried on its own, bad ones are left
    /// out (their defaults apply) and missing required ones are left empty, so the
    /// effective settings can still be shown.
    fn from_vars_reporting(vars: HashMap<String, String>) -> (Self, Vec<String>) {
        let mut vars: Vec<(String, String)> = vars.into_iter().filter(keep_var).collect();
        vars.sort();
        let mut problems = Vec::new();
        if from_env_iter(vars.clone()).is_err() {
            vars.retain(|(k, v)| {
                let probe = [("DATABASE_URL", "-"), ("REDIS_URL", "-")]
                    .into_iter()
                    .filter(|(name, _)| name != k)
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .chain([(k.clone(), v.clone())]);
                match from_env_iter(probe) {
                    Ok(_) => true,
                    Err(e) => {
                        problems.push(format!("{k}: {}", describe_envy_error(&e)));
                        false
                    }
                }
            });
        }
        loop {
            match from_env_iter(vars.clone()) {
                Ok(s) => return (s, problems),
                Err(envy::Error::MissingValue(field)) => {
                    let name = field.to_ascii_uppercase();
                    problems.push(format!("{name} is required"));
                    vars.push((name, String::new()));
                }
                // Every variable deserialized on its own above; one that fails only
                // in company is reported as such, and defaults apply.
                Err(e) => {
                    problems.push(describe_envy_error(&e));
                    let defaults = [("DATABASE_URL", ""), ("REDIS_URL", "")]
                        .map(|(k, v)| (k.to_string(), v.to_string()));
                    let s = from_env_iter(defaults).expect("the defaults deserialize");
                    return (s, problems);
                }
            }
        }
    }
}
