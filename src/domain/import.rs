//! One line of an `admin import-users` file (DESIGN.md section 8): a user exported
//! from the FastAPI user_service, `{email, full_name, password_hash, roles?, status?,
//! email_verified?, created_at?}`. Parsing names the field that is wrong, never its
//! value (a hash is a secret of sorts, and the file may hold anything).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::email::Email;
use super::user::Role;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedUser {
    pub email: Email,
    pub full_name: String,
    /// Checked by the service (crypto::legacy), which knows the hash formats.
    pub password_hash: String,
    /// Sorted, without duplicates; `["user"]` when absent.
    pub roles: Vec<String>,
    /// `active` (when absent) or `disabled`.
    pub status: &'static str,
    pub email_verified: bool,
    /// When absent, the time of the import.
    pub created_at: Option<DateTime<Utc>>,
}

/// Parses one non-blank line; the error is `field: what is wrong`.
pub fn parse_line(line: &str) -> Result<ImportedUser, String> {
    let value: Value = serde_json::from_str(line).map_err(|_| "not a JSON object".to_string())?;
    let Value::Object(fields) = value else {
        return Err("not a JSON object".into());
    };
    let email = Email::parse(required_str(&fields, "email")?).map_err(|m| format!("email: {m}"))?;
    let full_name = full_name(required_str(&fields, "full_name")?)?;
    let password_hash = required_str(&fields, "password_hash")?.to_string();
    let roles = match fields.get("roles") {
        None | Some(Value::Null) => vec!["user".to_string()],
        Some(Value::Array(items)) => {
            let mut roles = items
                .iter()
                .map(|r| match r.as_str() {
                    Some(r) if Role::parse(r).is_some() => Ok(r.to_string()),
                    _ => Err(format!(
                        "roles: each must be one of {}",
                        Role::ALL.map(|r| r.as_str()).join(", ")
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if roles.is_empty() {
                return Err("roles: must not be empty (leave it out for [\"user\"])".into());
            }
            roles.sort();
            roles.dedup();
            roles
        }
        Some(_) => return Err("roles: must be an array of role names".into()),
    };
    let status = match fields.get("status") {
        None | Some(Value::Null) => "active",
        Some(Value::String(s)) if s == "active" => "active",
        Some(Value::String(s)) if s == "disabled" => "disabled",
        Some(_) => return Err("status: must be \"active\" or \"disabled\"".into()),
    };
    let email_verified = match fields.get("email_verified") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("email_verified: must be true or false".into()),
    };
    let created_at = match fields.get("created_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|_| "created_at: must be an RFC 3339 timestamp".to_string())?
                .with_timezone(&Utc),
        ),
        Some(_) => return Err("created_at: must be an RFC 3339 timestamp".into()),
    };
    Ok(ImportedUser {
        email,
        full_name,
        password_hash,
        roles,
        status,
        email_verified,
        created_at,
    })
}

fn required_str<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    match fields.get(name) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(format!("{name}: required")),
        Some(_) => Err(format!("{name}: must be a string")),
    }
}

/// The sign-up rule for names (service/auth.rs): 1 to 200 characters once trimmed,
/// no control characters.
fn full_name(raw: &str) -> Result<String, String> {
    let s = raw.trim();
    if s.is_empty() || s.chars().count() > 200 {
        return Err("full_name: must be 1 to 200 characters".into());
    }
    if s.chars().any(char::is_control) {
        return Err("full_name: must not contain control characters".into());
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_section_8_shape_with_its_defaults() {
        let u = parse_line(r#"{"email": "A@Example.com", "full_name": " Ann ", "password_hash": "$2b$x", "id": 7}"#)
            .unwrap();
        assert_eq!(u.full_name, "Ann");
        assert_eq!(u.roles, ["user"]);
        assert_eq!(
            (u.status, u.email_verified, u.created_at),
            ("active", false, None)
        );

        let u = parse_line(
            r#"{"email": "b@example.com", "full_name": "B", "password_hash": "h",
                "roles": ["viewer", "admin", "viewer"], "status": "disabled",
                "email_verified": true, "created_at": "2020-01-02T03:04:05+02:00"}"#,
        )
        .unwrap();
        assert_eq!(u.roles, ["admin", "viewer"]);
        assert_eq!((u.status, u.email_verified), ("disabled", true));
        assert_eq!(
            u.created_at.unwrap().to_rfc3339(),
            "2020-01-02T01:04:05+00:00"
        );
    }

    #[test]
    fn names_the_field_never_the_value() {
        for (line, says) in [
            ("[1, 2]", "not a JSON object"),
            ("{\"email\": ", "not a JSON object"),
            (
                r#"{"full_name": "x", "password_hash": "h"}"#,
                "email: required",
            ),
            (
                r#"{"email": "secret-ish", "full_name": "x", "password_hash": "h"}"#,
                "email: ",
            ),
            (
                r#"{"email": "a@example.com", "full_name": "", "password_hash": "h"}"#,
                "full_name: ",
            ),
            (
                r#"{"email": "a@example.com", "full_name": "x", "password_hash": 5}"#,
                "password_hash: must be a string",
            ),
            (
                r#"{"email": "a@example.com", "full_name": "x", "password_hash": "h", "roles": ["root"]}"#,
                "roles: ",
            ),
            (
                r#"{"email": "a@example.com", "full_name": "x", "password_hash": "h", "roles": []}"#,
                "roles: ",
            ),
            (
                r#"{"email": "a@example.com", "full_name": "x", "password_hash": "h", "status": "suspended"}"#,
                "status: ",
            ),
            (
                r#"{"email": "a@example.com", "full_name": "x", "password_hash": "h", "email_verified": "yes"}"#,
                "email_verified: ",
            ),
            (
                r#"{"email": "a@example.com", "full_name": "x", "password_hash": "h", "created_at": "yesterday"}"#,
                "created_at: ",
            ),
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(err.starts_with(says), "{line}: {err}");
            for value in ["secret-ish", "root", "suspended", "yesterday"] {
                assert!(!err.contains(value), "{err}");
            }
        }
    }
}
