//! The outbound edge to the alert service: where notifications leave the process,
//! as an HTTP POST (`NOTIFY_SINK=http`) or a line in this service's own log
//! (`NOTIFY_SINK=log`, development: the link is there to click).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use uuid::Uuid;

use crate::config::{NotifySink, Settings};

/// The body the alert service receives (DESIGN.md section 8).
#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    pub id: Uuid,
    pub template: String,
    pub to: String,
    pub user_id: Option<Uuid>,
    pub data: serde_json::Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Why a delivery failed: what the log and `last_error` may say (a status or a
/// transport error kind, never the body or the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: String,
    /// The receiver's `Retry-After`, when it gave one in seconds.
    pub retry_after: Option<Duration>,
}

pub enum Sink {
    Http {
        client: reqwest::Client,
        url: String,
        token: Option<SecretString>,
    },
    Log,
}

impl Sink {
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        Ok(match settings.notify_sink() {
            NotifySink::Log => Sink::Log,
            NotifySink::Http => {
                let base = settings
                    .alert_service_url
                    .as_deref()
                    .ok_or_else(|| anyhow::anyhow!("NOTIFY_SINK=http needs ALERT_SERVICE_URL"))?;
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_millis(settings.notify_http_timeout_ms))
                    .connect_timeout(Duration::from_millis(
                        settings.notify_http_timeout_ms.min(5_000),
                    ))
                    .redirect(reqwest::redirect::Policy::none())
                    .build()?;
                Sink::Http {
                    client,
                    url: format!("{}/v1/notifications", base.trim_end_matches('/')),
                    token: settings.alert_service_token.clone(),
                }
            }
        })
    }

    /// Delivers one message: Ok on a 2xx answer, anything else is refused.
    pub async fn deliver(&self, n: &Notification) -> Result<(), Refused> {
        match self {
            Sink::Log => {
                // The development sink: the whole message, link included, so a
                // developer can follow it. Refused outside development (config).
                let link = n.data.get("link").and_then(|l| l.as_str()).unwrap_or("");
                tracing::info!(
                    target: "user_service::notify_log",
                    id = %n.id,
                    template = %n.template,
                    to = %n.to,
                    user_id = ?n.user_id,
                    link,
                    data = %n.data,
                    "notification (NOTIFY_SINK=log)"
                );
                Ok(())
            }
            Sink::Http { client, url, token } => {
                let mut req = client
                    .post(url)
                    .header("Idempotency-Key", n.id.to_string())
                    .json(n);
                if let Some(t) = token {
                    req = req.bearer_auth(t.expose_secret());
                }
                let res = req.send().await.map_err(|e| Refused {
                    reason: transport_error(&e),
                    retry_after: None,
                })?;
                let status = res.status();
                if status.is_success() {
                    return Ok(());
                }
                let retry_after = res
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                Err(Refused {
                    reason: format!("alert service answered {}", status.as_u16()),
                    retry_after,
                })
            }
        }
    }
}

/// A transport failure by kind: reqwest's Display would quote the URL, which is
/// harmless, but its source chain may carry more than the log needs.
fn transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_request() {
        "request failed"
    } else {
        "transport error"
    };
    format!("alert service {kind}")
}
