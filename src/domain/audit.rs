//! What an audit row says: who did what to which thing, with what outcome.
//! The service builds entries; the store writes them inside the transaction of
//! the change. Never put a password, token, key or secret in `details`: ids and
//! prefixes only.

use serde_json::Value;

/// Who acts, as the audit log names them: (actor_type, actor_id).
pub trait AuditActor {
    fn audit_actor(&self) -> (&'static str, String);
}

/// Where a request came from: (ip, user agent).
pub trait AuditSource {
    fn audit_source(&self) -> (Option<std::net::IpAddr>, Option<String>);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// 'user', 'service_client', 'api_key', 'system' or 'anonymous'.
    pub actor_type: &'static str,
    pub actor_id: Option<String>,
    /// Dotted name: `auth.login.succeeded`, `api_key.revoked`, …
    pub action: String,
    pub target_type: Option<&'static str>,
    pub target_id: Option<String>,
    pub outcome: Outcome,
    pub ip: Option<std::net::IpAddr>,
    pub user_agent: Option<String>,
    pub details: Value,
}

impl AuditEntry {
    pub fn new(action: impl Into<String>, outcome: Outcome) -> Self {
        Self {
            actor_type: "anonymous",
            actor_id: None,
            action: action.into(),
            target_type: None,
            target_id: None,
            outcome,
            ip: None,
            user_agent: None,
            details: Value::Object(Default::default()),
        }
    }

    pub fn by(mut self, caller: &impl AuditActor) -> Self {
        let (t, id) = caller.audit_actor();
        self.actor_type = t;
        self.actor_id = Some(id);
        self
    }

    pub fn actor(mut self, actor_type: &'static str, id: impl ToString) -> Self {
        self.actor_type = actor_type;
        self.actor_id = Some(id.to_string());
        self
    }

    pub fn target(mut self, target_type: &'static str, id: impl ToString) -> Self {
        self.target_type = Some(target_type);
        self.target_id = Some(id.to_string());
        self
    }

    pub fn meta(mut self, meta: &impl AuditSource) -> Self {
        (self.ip, self.user_agent) = meta.audit_source();
        self
    }

    pub fn details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    /// Adds one field to the details object.
    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        if !self.details.is_object() {
            self.details = Value::Object(Default::default());
        }
        if let Value::Object(fields) = &mut self.details {
            fields.insert(key.to_string(), value.into());
        }
        self
    }
}
