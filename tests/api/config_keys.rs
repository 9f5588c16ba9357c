//! Key material: nothing secret is tracked, and staging refuses development keys
//! however they are re-encoded (split from config.rs).

use std::collections::HashMap;
use std::process::Command;
use user_service::config::Settings;
use user_service::crypto::key_material;

use crate::config::{binary, dev_secrets, env_files, fresh_keys, vars, REPO};

/// Tracked files, from git when the checkout has it.
fn tracked_files() -> Vec<String> {
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(REPO)
        .output()
        .expect("git is installed");
    assert!(out.status.success(), "not a git checkout");
    String::from_utf8(out.stdout)
        .unwrap()
        .split('\0')
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn no_key_material_is_tracked() {
    // tests/ is left out: this file keeps the once-committed keys, to prove that
    // staging and production refuse them.
    let files: Vec<String> = tracked_files()
        .into_iter()
        .filter(|f| !f.starts_with("tests/"))
        .collect();
    assert!(
        files.iter().any(|f| f == ".env.dev") && files.iter().any(|f| f == "src/config/mod.rs")
    );
    let mut found = Vec::new();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(format!("{REPO}/{f}")) else {
            continue; // binary
        };
        if holds_pem_private_key(&text) {
            found.push(format!("{f}: a PEM private key"));
        }
        for known in [
            LEAKED_DEV_JWT_KEY_BODY,
            LEAKED_TEST_JWT_KEY_BODY,
            LEAKED_DEV_ENCRYPTION_KEY,
            LEAKED_DEV_HASH_SECRET,
            "MC4CAQAwBQYDK2VwBCIE", // the base64 start of any Ed25519 PKCS#8 key
        ] {
            if text.contains(known) {
                found.push(format!("{f}: known key text {}…", &known[..8]));
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
    // And nothing that could hold generated keys is tracked.
    assert!(
        !files.iter().any(|f| f.starts_with(".secrets/")),
        "{files:?}"
    );
}

/// A `-----BEGIN … PRIVATE KEY-----` header followed by a base64 body (the
/// examples' `REPLACE_ME` placeholder is not one).
fn holds_pem_private_key(text: &str) -> bool {
    text.match_indices("PRIVATE KEY-----").any(|(i, m)| {
        let before = &text[..i];
        let is_begin = before
            .rfind("-----")
            .is_some_and(|b| before[b..].starts_with("-----BEGIN "));
        let mut body = text[i + m.len()..].trim_start();
        while let Some(rest) = body.strip_prefix("\\n") {
            body = rest.trim_start();
        }
        is_begin
            && body
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '+' || *c == '/')
                .count()
                >= 16
    })
}

// Key material once committed to .env.dev and src/config.rs (and a test key),
// public since: kept here only to prove staging and production refuse it.
const LEAKED_DEV_JWT_KEY_BODY: &str =
    "MC4CAQAwBQYDK2VwBCIEIHIMUz8yDUrFpm+Ocp16MUk7hqttTC+7qo4AfnKyQunl";
const LEAKED_TEST_JWT_KEY_BODY: &str =
    "MC4CAQAwBQYDK2VwBCIEIKqg0ZQ3zbrb0k7qkQ8i7i0dqS2Qmpe1Lw3RkR3dX0aS";
const LEAKED_DEV_ENCRYPTION_KEY: &str = "ve4sOU9+Oo5nj2ts2u3Hpu4E6kk3oXLKg5gl1V7EP3I=";
const LEAKED_DEV_HASH_SECRET: &str = "dev-only-api-key-hash-secret-do-not-use-elsewhere";

/// Re-wraps a PEM body at `width` columns with `eol` line ends.
fn pem(label: &str, body: &str, width: usize, eol: &str) -> String {
    let b: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    let lines: Vec<String> = b
        .as_bytes()
        .chunks(width)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----{eol}{}{eol}-----END {label}-----{eol}",
        lines.join(eol)
    )
}

fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

/// The public key of a private key, as the PEM JWT_PREVIOUS_PUBLIC_KEYS holds.
fn public_pem(private: &str, width: usize) -> String {
    use base64::Engine;
    let raw = key_material::parse_signing_key(private).unwrap().public_key;
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend(raw);
    let b64 = base64::engine::general_purpose::STANDARD.encode(spki);
    pem("PUBLIC KEY", &b64, width, "\n")
}

/// Loads staging settings with these key values (and fresh ones for the rest).
fn staging_problems(dir: &std::path::Path, keys: &[(&str, String)]) -> Vec<String> {
    let mut v = vars(&[("APP_ENV", "staging")]);
    v.extend(fresh_keys("STAGING_"));
    for (k, val) in keys {
        v.insert(k.to_string(), val.clone());
    }
    match Settings::load_from(&v, dir) {
        Ok(s) => s.problems(),
        Err(e) => e.to_string().lines().map(str::to_string).collect(),
    }
}

fn reencode(b64: &str, engine: base64::engine::GeneralPurpose) -> String {
    use base64::Engine;
    let raw = key_material::decode_base64(b64).unwrap();
    engine.encode(raw)
}

#[test]
fn staging_refuses_development_keys_by_their_bytes_not_their_text() {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let dir = env_files();
    // This checkout's own development keys, generated by a development start.
    Settings::load_from(&vars(&[("APP_ENV", "development")]), &dir).unwrap();
    let dev: HashMap<String, String> = dev_secrets(&dir).into_iter().collect();
    let dev_ring = &dev["CREDENTIALS_ENCRYPTION_KEYS"];
    let dev_b64 = dev_ring.split_once(':').unwrap().1;
    let fresh = fresh_keys("");

    let refused = |problems: &[String], what: &str| {
        assert!(
            problems.iter().any(|p| p.starts_with(what)
                && p.ends_with("is development key material, refused in staging")),
            "{what}: {problems:?}"
        );
    };
    let cases: Vec<(&str, &str, String)> = vec![
        // The checkout's dev signing key, re-wrapped at 32 columns with CRLF.
        (
            "JWT_PRIVATE_KEY",
            "JWT_PRIVATE_KEY",
            pem(
                "PRIVATE KEY",
                &pem_body(&dev["JWT_PRIVATE_KEY"]),
                32,
                "\r\n",
            ),
        ),
        // The once-committed key as one line with literal \n, padded by spaces.
        (
            "JWT_PRIVATE_KEY",
            "JWT_PRIVATE_KEY",
            format!(
                "  -----BEGIN PRIVATE KEY-----\\n{}\\n-----END PRIVATE KEY-----  ",
                LEAKED_DEV_JWT_KEY_BODY
            ),
        ),
        (
            "JWT_PRIVATE_KEY",
            "JWT_PRIVATE_KEY",
            pem("PRIVATE KEY", LEAKED_TEST_JWT_KEY_BODY, 7, "\n"),
        ),
        // Their public halves among the previous keys, after a fresh one.
        (
            "JWT_PREVIOUS_PUBLIC_KEYS",
            "JWT_PREVIOUS_PUBLIC_KEYS key 2",
            public_pem(&fresh[0].1, 64) + &public_pem(&dev["JWT_PRIVATE_KEY"], 20),
        ),
        (
            "JWT_PREVIOUS_PUBLIC_KEYS",
            "JWT_PREVIOUS_PUBLIC_KEYS key 1",
            public_pem(&pem("PRIVATE KEY", LEAKED_DEV_JWT_KEY_BODY, 64, "\n"), 64),
        ),
        // Encryption keys relabelled, unpadded, URL-safe, second in the ring.
        (
            "CREDENTIALS_ENCRYPTION_KEYS",
            "CREDENTIALS_ENCRYPTION_KEYS key \"stg-20261201\"",
            format!("stg-20261201:{}", reencode(dev_b64, STANDARD_NO_PAD)),
        ),
        (
            "CREDENTIALS_ENCRYPTION_KEYS",
            "CREDENTIALS_ENCRYPTION_KEYS key \"old\"",
            format!(
                "{},old:{}",
                fresh[1].1,
                reencode(LEAKED_DEV_ENCRYPTION_KEY, URL_SAFE_NO_PAD)
            ),
        ),
        // Hash secrets, with whitespace around them.
        (
            "API_KEY_HASH_SECRET",
            "API_KEY_HASH_SECRET",
            format!(" {} ", dev["API_KEY_HASH_SECRET"]),
        ),
        (
            "API_KEY_HASH_SECRET",
            "API_KEY_HASH_SECRET",
            LEAKED_DEV_HASH_SECRET.to_string(),
        ),
    ];
    for (setting, what, value) in cases {
        let problems = staging_problems(&dir, &[(setting, value)]);
        refused(&problems, what);
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    // Fresh keys, a fresh previous key, in a directory with development keys: fine.
    let ok = staging_problems(
        &dir,
        &[("JWT_PREVIOUS_PUBLIC_KEYS", public_pem(&fresh[0].1, 64))],
    );
    assert!(ok.is_empty(), "{ok:?}");

    // The real binary refuses to serve with them.
    let out = Command::new(binary())
        .arg("serve")
        .current_dir(&dir)
        .env_clear()
        .envs(fresh_keys("STAGING_"))
        .env("APP_ENV", "staging")
        .env(
            "STAGING_CREDENTIALS_ENCRYPTION_KEYS",
            format!("x:{}", reencode(dev_b64, URL_SAFE_NO_PAD)),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: CREDENTIALS_ENCRYPTION_KEYS key \"x\" is development key material, refused in staging"),
        "{stderr}"
    );
}
