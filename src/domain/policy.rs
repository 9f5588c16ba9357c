//! Policy evaluation as a pure function: a subject's policies, one action, one
//! resource → allowed or not, and which rule decided. Deny wins; nothing allows
//! by default.

use std::collections::BTreeSet;
use std::fmt;

use uuid::Uuid;

use super::FieldError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

impl Effect {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Effect::Allow),
            "deny" => Some(Effect::Deny),
            _ => None,
        }
    }
}

/// One row of `policies`: actions are scope names or `*`; resources are
/// `<type>:<id>`, `<type>:*` or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub effect: Effect,
    pub actions: Vec<String>,
    pub resources: Vec<String>,
}

impl Policy {
    fn covers_action(&self, action: &str) -> bool {
        self.actions.iter().any(|a| a == "*" || a == action)
    }

    fn covers_resource(&self, resource: &Resource) -> bool {
        self.resources.iter().any(|r| resource.matched_by(r))
    }

    fn applies(&self, action: &str, resource: &Resource) -> bool {
        self.covers_action(action) && self.covers_resource(resource)
    }
}

/// Who a permission question is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    User(Uuid),
    Client(String),
}

impl Subject {
    /// `user:<uuid>` or `client:<client_id>`.
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        let bad = || {
            FieldError::new(
                "subject",
                "invalid",
                "must be user:<uuid> or client:<client_id>",
            )
        };
        match s.split_once(':') {
            Some(("user", id)) => Uuid::parse_str(id).map(Subject::User).map_err(|_| bad()),
            Some(("client", id))
                if !id.is_empty()
                    && id.len() <= 64
                    && id.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c)
                    }) =>
            {
                Ok(Subject::Client(id.to_string()))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::User(id) => write!(f, "user:{id}"),
            Subject::Client(id) => write!(f, "client:{id}"),
        }
    }
}

/// An action is a scope name such as `orders:write`.
pub fn parse_action(s: &str) -> Result<String, FieldError> {
    let ok = s.split_once(':').is_some_and(|(a, b)| {
        let part = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        part(a) && part(b)
    });
    if ok {
        Ok(s.to_string())
    } else {
        Err(FieldError::new(
            "action",
            "invalid",
            "must be a scope name such as orders:write",
        ))
    }
}

/// What an action is performed on: `*` (anything) or `<type>:<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    Any,
    Item { kind: String, id: String },
}

impl Resource {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        if s == "*" {
            return Ok(Resource::Any);
        }
        match s.split_once(':') {
            Some((kind, id))
                if !kind.is_empty()
                    && kind.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    && !id.is_empty()
                    && id.len() <= 128
                    && !id.contains('*') =>
            {
                Ok(Resource::Item {
                    kind: kind.into(),
                    id: id.into(),
                })
            }
            _ => Err(FieldError::new(
                "resource",
                "invalid",
                "must be <type>:<id> or *",
            )),
        }
    }

    /// Whether a policy's resource pattern covers this resource. A question about
    /// `*` (anything) is covered only by a pattern that covers everything.
    fn matched_by(&self, pattern: &str) -> bool {
        if pattern == "*" {
            return true;
        }
        match self {
            Resource::Any => false,
            Resource::Item { kind, id } => match pattern.split_once(':') {
                Some((k, "*")) => k == kind,
                Some((k, i)) => k == kind && i == id,
                None => false,
            },
        }
    }
}

/// The answer to a permission question and the rule that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `policy:<name>`, `client_scope:<scope>`, `membership:<role>`, `owner`,
    /// `default:deny`, …
    pub decided_by: String,
}

impl Decision {
    pub fn allow(rule: impl Into<String>) -> Self {
        Self {
            allowed: true,
            decided_by: rule.into(),
        }
    }

    pub fn deny(rule: impl Into<String>) -> Self {
        Self {
            allowed: false,
            decided_by: rule.into(),
        }
    }

    pub fn default_deny() -> Self {
        Self::deny("default:deny")
    }
}

/// Deny wins over allow; with neither, the answer is no. Among several matching
/// policies of the same effect the first by name decides, so answers are stable.
pub fn evaluate(policies: &[Policy], action: &str, resource: &Resource) -> Decision {
    let first = |effect: Effect| {
        policies
            .iter()
            .filter(|p| p.effect == effect && p.applies(action, resource))
            .map(|p| p.name.as_str())
            .min()
    };
    if let Some(name) = first(Effect::Deny) {
        return Decision::deny(format!("policy:{name}"));
    }
    if let Some(name) = first(Effect::Allow) {
        return Decision::allow(format!("policy:{name}"));
    }
    Decision::default_deny()
}

/// The scopes these policies grant everywhere: allowed actions on `*` minus those
/// any deny takes away. A wildcard action is not a scope and is not listed.
pub fn granted_scopes(policies: &[Policy]) -> Vec<String> {
    let allowed: BTreeSet<&str> = policies
        .iter()
        .filter(|p| p.effect == Effect::Allow)
        .flat_map(|p| p.actions.iter().map(String::as_str))
        .filter(|a| *a != "*")
        .collect();
    allowed
        .into_iter()
        .filter(|a| evaluate(policies, a, &Resource::Any).allowed)
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, effect: Effect, actions: &[&str], resources: &[&str]) -> Policy {
        Policy {
            name: name.into(),
            effect,
            actions: actions.iter().map(|s| s.to_string()).collect(),
            resources: resources.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn seeded_viewer() -> Vec<Policy> {
        vec![
            p(
                "read_only_scopes",
                Effect::Allow,
                &["accounts:read", "orders:read"],
                &["*"],
            ),
            p(
                "viewer_no_writes",
                Effect::Deny,
                &["accounts:write", "orders:write"],
                &["*"],
            ),
        ]
    }

    #[test]
    fn deny_wins_over_allow() {
        let mut ps = seeded_viewer();
        ps.push(p("trader_scopes", Effect::Allow, &["orders:write"], &["*"]));
        let d = evaluate(&ps, "orders:write", &Resource::Any);
        assert_eq!(d, Decision::deny("policy:viewer_no_writes"));
        let d = evaluate(&ps, "orders:read", &Resource::Any);
        assert_eq!(d, Decision::allow("policy:read_only_scopes"));
    }

    #[test]
    fn nothing_matching_is_a_default_deny() {
        let d = evaluate(&seeded_viewer(), "admin:users", &Resource::Any);
        assert_eq!(d, Decision::default_deny());
        assert_eq!(
            evaluate(&[], "accounts:read", &Resource::Any),
            Decision::default_deny()
        );
    }

    #[test]
    fn resource_patterns() {
        let ps = vec![p(
            "one_account",
            Effect::Allow,
            &["orders:write"],
            &["trading_account:42"],
        )];
        let item = |k: &str, i: &str| Resource::Item {
            kind: k.into(),
            id: i.into(),
        };
        assert!(evaluate(&ps, "orders:write", &item("trading_account", "42")).allowed);
        assert!(!evaluate(&ps, "orders:write", &item("trading_account", "43")).allowed);
        // A grant on one item does not answer a question about everything.
        assert!(!evaluate(&ps, "orders:write", &Resource::Any).allowed);
        let ps = vec![p("kind", Effect::Allow, &["*"], &["trading_account:*"])];
        assert!(evaluate(&ps, "orders:read", &item("trading_account", "7")).allowed);
        assert!(!evaluate(&ps, "orders:read", &item("user", "7")).allowed);
    }

    #[test]
    fn scopes_are_allows_minus_denies() {
        let mut ps = seeded_viewer();
        ps.push(p(
            "trader_scopes",
            Effect::Allow,
            &["accounts:write", "market_data:read"],
            &["*"],
        ));
        assert_eq!(
            granted_scopes(&ps),
            vec!["accounts:read", "market_data:read", "orders:read"]
        );
    }

    #[test]
    fn parsing() {
        assert!(Subject::parse("user:not-a-uuid").is_err());
        assert_eq!(
            Subject::parse("client:backend").unwrap(),
            Subject::Client("backend".into())
        );
        assert!(Subject::parse("group:x").is_err());
        assert!(Resource::parse("trading_account:*").is_err());
        assert_eq!(Resource::parse("*").unwrap(), Resource::Any);
        assert!(parse_action("orders:write").is_ok());
        assert!(parse_action("orders").is_err());
    }
}
