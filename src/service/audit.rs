//! What an audit row says. Built here, written by `Tx::audit` inside the
//! transaction of the change. Never put a password, token, key or secret in
//! `details`: ids and prefixes only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::{Caller, RequestMeta};
use crate::domain::audit::{AuditActor, AuditSource};
pub use crate::domain::audit::{AuditEntry, Outcome};
use crate::store::{StoreResult, Tx};

impl AuditActor for Caller {
    fn audit_actor(&self) -> (&'static str, String) {
        self.actor()
    }
}

impl AuditSource for RequestMeta {
    fn audit_source(&self) -> (Option<std::net::IpAddr>, Option<String>) {
        (self.ip, self.user_agent.clone())
    }
}

/// Authorisation failures written per actor per minute: the first
/// `DENIALS_KEPT_PER_WINDOW` as their own rows, then one `authz.denied.throttled`
/// row; later ones in that minute are only counted, and their number is written
/// as one `authz.denied.suppressed` row when the actor's next denial opens a new
/// window (and counted in the `audit_denials_suppressed_total` metric at once).
/// So a hostile stream of requests for random ids writes a few rows a minute, not
/// hundreds a second. In-process: each replica keeps its own count.
pub const DENIALS_KEPT_PER_WINDOW: u64 = 20;
pub const DENIAL_WINDOW: Duration = Duration::from_secs(60);

struct DenialWindow {
    started: Instant,
    started_at: DateTime<Utc>,
    seen: u64,
}

/// An audit actor: (actor_type, actor_id).
type Actor = (&'static str, Option<String>);

#[derive(Clone, Default)]
pub struct DenialAudit {
    windows: Arc<Mutex<HashMap<Actor, DenialWindow>>>,
}

impl DenialAudit {
    /// The rows to write for one more denial (`authz.denied` entry): the entry
    /// itself, a summary, both, or nothing.
    pub fn admit(&self, entry: AuditEntry) -> Vec<AuditEntry> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() > 10_000 {
            windows.retain(|_, w| now.duration_since(w.started) < DENIAL_WINDOW);
        }
        let w = windows
            .entry((entry.actor_type, entry.actor_id.clone()))
            .or_insert(DenialWindow {
                started: now,
                started_at: Utc::now(),
                seen: 0,
            });
        let summary = |e: &AuditEntry, action: &str, details: Value| {
            let mut s = e.clone();
            s.action = action.into();
            s.target_type = None;
            s.target_id = None;
            s.details = details;
            s
        };
        let mut rows = Vec::new();
        if now.duration_since(w.started) >= DENIAL_WINDOW {
            let suppressed = w.seen.saturating_sub(DENIALS_KEPT_PER_WINDOW);
            if suppressed > 0 {
                rows.push(summary(
                    &entry,
                    "authz.denied.suppressed",
                    json!({
                        "suppressed": suppressed,
                        "window_started_at": w.started_at,
                        "window_seconds": DENIAL_WINDOW.as_secs(),
                    }),
                ));
            }
            *w = DenialWindow {
                started: now,
                started_at: Utc::now(),
                seen: 0,
            };
        }
        w.seen += 1;
        if w.seen <= DENIALS_KEPT_PER_WINDOW {
            rows.push(entry);
        } else {
            metrics::counter!("audit_denials_suppressed_total").increment(1);
            if w.seen == DENIALS_KEPT_PER_WINDOW + 1 {
                rows.push(summary(
                    &entry,
                    "authz.denied.throttled",
                    json!({
                        "kept": DENIALS_KEPT_PER_WINDOW,
                        "window_started_at": w.started_at,
                        "window_seconds": DENIAL_WINDOW.as_secs(),
                    }),
                ));
            }
        }
        rows
    }

    /// Writes what `admit` keeps of one denial in `tx`, the transaction of the
    /// request that was refused.
    pub async fn write(&self, tx: &mut Tx, entry: AuditEntry) -> StoreResult<()> {
        for row in self.admit(entry) {
            tx.audit(&row).await?;
        }
        Ok(())
    }
}

/// Writes `entry` in a transaction of its own, for a refusal that changes
/// nothing else; a failed write is logged (the refusal still answers).
pub(crate) async fn write_alone(db: &crate::store::Db, entry: AuditEntry) {
    let r = async {
        let mut tx = db.begin().await?;
        tx.audit(&entry).await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = r {
        tracing::error!(error = %e, action = %entry.action, "audit write failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_actor_gets_the_first_denials_then_one_summary_per_window() {
        let denials = DenialAudit::default();
        let entry = AuditEntry::new("authz.denied", Outcome::Denied).actor("user", "u1");
        let written: Vec<String> = (0..500)
            .flat_map(|_| denials.admit(entry.clone()))
            .map(|e| e.action)
            .collect();
        assert_eq!(written.len() as u64, DENIALS_KEPT_PER_WINDOW + 1);
        assert_eq!(written.last().unwrap(), "authz.denied.throttled");
        // Another actor is not held back by the first.
        let other = AuditEntry::new("authz.denied", Outcome::Denied).actor("user", "u2");
        assert_eq!(denials.admit(other).len(), 1);
    }
}
