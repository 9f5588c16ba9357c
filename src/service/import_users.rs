//! Moving users in (`admin import-users FILE [--dry-run]`, DESIGN.md section 8):
//! users of the FastAPI user_service keep their passwords. Their bcrypt, argon2 or
//! pbkdf2-sha256 hashes are stored as they are, verified at login on the hashing
//! pool, and replaced by a current argon2id hash at the first successful login
//! ([`upgrade_password_hash`]).

use std::collections::HashSet;
use std::io::BufRead;

use secrecy::SecretString;
use serde::Serialize;
use uuid::Uuid;

use super::audit::{AuditEntry, Outcome};
use super::{RequestMeta, ServiceError, ServiceResult};
use crate::crypto::legacy;
use crate::crypto::password::{needs_rehash, PasswordHasher};
use crate::domain::import::{parse_line, ImportedUser};
use crate::store::{imports, Db, StoreError};

/// What `import-users` prints.
#[derive(Debug, Default, Serialize)]
pub struct ImportReport {
    pub imported: u64,
    /// Emails already taken (whatever their case), here or earlier in the file.
    pub skipped: u64,
    pub invalid: Vec<InvalidLine>,
    pub dry_run: bool,
}

/// A line left out, by its number (from 1) and why, naming the field at fault but
/// never quoting the line.
#[derive(Debug, Serialize)]
pub struct InvalidLine {
    pub line: usize,
    pub reason: String,
}

/// Imports every valid line of `input`; blank lines are ignored. Each user goes in
/// with its roles and its `user.imported` audit row in a transaction of its own,
/// so the audit chain's lock is held briefly, an interrupted import keeps what it
/// committed, and a re-run skips those (a second run changes nothing). A dry run
/// reads the same and writes nothing.
pub async fn import_users(
    db: &Db,
    input: impl BufRead,
    dry_run: bool,
) -> ServiceResult<ImportReport> {
    let mut report = ImportReport {
        dry_run,
        ..ImportReport::default()
    };
    let mut seen = HashSet::new();
    for (index, line) in input.split(b'\n').enumerate() {
        let number = index + 1;
        let line = line.map_err(|e| ServiceError::Internal(e.into()))?;
        let parsed = String::from_utf8(line)
            .map_err(|_| "not UTF-8".to_string())
            .and_then(|line| {
                let line = line.trim();
                if line.is_empty() {
                    return Ok(None);
                }
                let user = parse_line(line)?;
                let scheme = legacy::check(&user.password_hash)
                    .map_err(|e| format!("password_hash: {e}"))?;
                Ok(Some((user, scheme)))
            });
        let (user, scheme) = match parsed {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(reason) => {
                report.invalid.push(InvalidLine {
                    line: number,
                    reason,
                });
                continue;
            }
        };
        if !seen.insert(user.email.as_str().to_lowercase()) {
            report.skipped += 1;
            continue;
        }
        let imported = if dry_run {
            !imports::email_taken(db, user.email.as_str()).await?
        } else {
            insert(db, &user, scheme).await?
        };
        if imported {
            report.imported += 1;
        } else {
            report.skipped += 1;
        }
    }
    Ok(report)
}

async fn insert(db: &Db, user: &ImportedUser, scheme: legacy::Scheme) -> ServiceResult<bool> {
    let id = Uuid::now_v7();
    let mut tx = db.begin().await?;
    if !imports::insert(&mut tx, id, user).await? {
        return Ok(false);
    }
    tx.audit(
        &AuditEntry::new("user.imported", Outcome::Success)
            .actor("system", "cli")
            .target("user", id)
            .details(serde_json::json!({
                "roles": user.roles,
                "status": user.status,
                "email_verified": user.email_verified,
                "hash": scheme.as_str(),
            })),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// After a successful password check at login: a hash that is not argon2id with the
/// current parameters (an imported one) is replaced by one that is, so a legacy
/// hash lives until its user's first login. It never fails the login: a failure is
/// logged, and the next login tries again.
pub(crate) async fn upgrade_password_hash(
    hasher: &PasswordHasher,
    db: &Db,
    meta: &RequestMeta,
    user_id: Uuid,
    current: Option<&str>,
    password: SecretString,
) {
    let Some(old) = current.filter(|h| needs_rehash(h)) else {
        return;
    };
    let from = legacy::check(old).map_or("unknown", |s| s.as_str());
    let new = match hasher.hash(password).await {
        Ok(new) => new,
        Err(e) => {
            tracing::warn!(error = %e, %user_id, "password re-hash skipped");
            return;
        }
    };
    let replaced = async {
        let mut tx = db.begin().await?;
        if imports::replace_password_hash(&mut tx, user_id, old, &new).await? {
            tx.audit(
                &AuditEntry::new("user.password_rehashed", Outcome::Success)
                    .actor("user", user_id)
                    .target("user", user_id)
                    .meta(meta)
                    .details(serde_json::json!({ "from": from })),
            )
            .await?;
            tx.commit().await?;
        }
        Ok::<_, StoreError>(())
    }
    .await;
    if let Err(e) = replaced {
        tracing::warn!(error = %e, %user_id, "password re-hash not stored");
    }
}
