//! What a new API key may carry, as a parser: a `NewKey` (the request) becomes a
//! `Grant` (deduplicated, normalised, every rule met) or the list of field
//! errors, each naming its JSON path. Pure: the caller supplies what storage
//! knows (the scope catalog, the owner's access per account, the time).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::account::Access;
use super::api_key::{parse_allowed_ip, valid_key_name, MAX_ALLOWED_IPS};
use super::{instant, scope, FieldError};

/// Most scopes one key may carry.
pub const MAX_SCOPES: usize = 50;
/// Requests per minute a key may be limited to, at most.
pub const MAX_RATE_LIMIT: i64 = 1_000_000;

/// A key as its owner asks for it.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub allowed_ips: Vec<String>,
    pub trading_account_ids: Vec<Uuid>,
    pub rate_limit_per_minute: Option<i64>,
}

/// What the rules need besides the request.
#[derive(Debug, Clone, Copy)]
pub struct GrantFacts<'a> {
    /// The seeded scope catalog: (name, grantable to an API key).
    pub catalog: &'a [(String, bool)],
    /// The owner's access on every account they can reach. Only read when the
    /// request names accounts.
    pub access: &'a HashMap<Uuid, Access>,
    pub now: DateTime<Utc>,
}

/// A grant every rule passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Trimmed.
    pub name: String,
    /// Known, grantable, each once, in the order asked.
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Normalised networks (`10.1.2.3/8` → `10.0.0.0/8`), each once.
    pub allowed_ips: Vec<String>,
    /// Accounts the owner reaches with access covering every scope, each once;
    /// empty means every account the owner can access.
    pub trading_account_ids: Vec<Uuid>,
    pub rate_limit_per_minute: Option<i32>,
}

impl Grant {
    /// Every rule a new key's grant must meet; all failures at once, in field
    /// order.
    pub fn parse(req: NewKey, facts: GrantFacts<'_>) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let name = req.name.trim().to_string();
        if !valid_key_name(&name) {
            errors.push(FieldError::new(
                "name",
                "invalid",
                "must be 1 to 100 printable characters",
            ));
        }
        let scopes = parse_scopes(&req.scopes, facts.catalog, &mut errors);
        if let Some(t) = req.expires_at {
            match instant::check("expires_at", t) {
                Err(e) => errors.push(e),
                Ok(t) if t <= facts.now => errors.push(FieldError::new(
                    "expires_at",
                    "in_past",
                    "must be in the future",
                )),
                Ok(_) => {}
            }
        }
        let allowed_ips = parse_allowed_ips(&req.allowed_ips, &mut errors);
        let rate_limit_per_minute = match req.rate_limit_per_minute {
            None => None,
            Some(n) if (1..=MAX_RATE_LIMIT).contains(&n) => Some(n as i32),
            Some(_) => {
                errors.push(FieldError::new(
                    "rate_limit_per_minute",
                    "out_of_range",
                    format!("must be between 1 and {MAX_RATE_LIMIT}"),
                ));
                None
            }
        };
        let trading_account_ids =
            parse_accounts(&req.trading_account_ids, &scopes, facts.access, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            name,
            scopes,
            expires_at: req.expires_at,
            allowed_ips,
            trading_account_ids,
            rate_limit_per_minute,
        })
    }

    /// The first scope the owner does not hold (`held`: what their roles grant).
    /// A well-formed request, so 403 rather than a field error.
    pub fn first_unheld(&self, held: &[String]) -> Option<&str> {
        self.scopes
            .iter()
            .find(|s| !held.contains(s))
            .map(String::as_str)
    }
}

fn parse_scopes(
    asked: &[String],
    catalog: &[(String, bool)],
    errors: &mut Vec<FieldError>,
) -> Vec<String> {
    if asked.is_empty() {
        errors.push(FieldError::new(
            "scopes",
            "required",
            "at least one scope is required",
        ));
    } else if asked.len() > MAX_SCOPES {
        errors.push(FieldError::new(
            "scopes",
            "too_many",
            format!("at most {MAX_SCOPES} scopes"),
        ));
    }
    let mut scopes: Vec<String> = Vec::new();
    for (i, s) in asked.iter().enumerate() {
        match catalog.iter().find(|(name, _)| name == s) {
            Some((_, true)) => {
                if !scopes.contains(s) {
                    scopes.push(s.clone());
                }
            }
            Some((_, false)) => errors.push(FieldError::new(
                format!("scopes[{i}]"),
                "not_grantable",
                format!("scope {s:?} cannot be granted to an API key"),
            )),
            None => errors.push(FieldError::new(
                format!("scopes[{i}]"),
                "unknown_scope",
                format!("unknown scope {s:?}"),
            )),
        }
    }
    scopes
}

fn parse_allowed_ips(asked: &[String], errors: &mut Vec<FieldError>) -> Vec<String> {
    if asked.len() > MAX_ALLOWED_IPS {
        errors.push(FieldError::new(
            "allowed_ips",
            "too_many",
            format!("at most {MAX_ALLOWED_IPS} entries"),
        ));
    }
    let mut nets = Vec::new();
    for (i, s) in asked.iter().enumerate() {
        match parse_allowed_ip(s) {
            Some(net) => {
                let net = net.to_string();
                if !nets.contains(&net) {
                    nets.push(net);
                }
            }
            None => errors.push(FieldError::new(
                format!("allowed_ips[{i}]"),
                "invalid",
                "must be an IPv4 or IPv6 address or CIDR",
            )),
        }
    }
    nets
}

/// Each named account must be one the owner reaches, with access covering every
/// granted scope (a viewer cannot mint a trading key).
fn parse_accounts(
    asked: &[Uuid],
    scopes: &[String],
    access: &HashMap<Uuid, Access>,
    errors: &mut Vec<FieldError>,
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for (i, id) in asked.iter().enumerate() {
        let field = || format!("trading_account_ids[{i}]");
        match access.get(id) {
            // Same answer for "no such account" and "not yours".
            None => errors.push(FieldError::new(
                field(),
                "unknown_account",
                "no such trading account",
            )),
            Some(access) => {
                if let Some(s) = scope::first_uncovered(*access, scopes) {
                    errors.push(FieldError::new(
                        field(),
                        "insufficient_access",
                        format!(
                            "the scope {s} needs {} on this account; your access is {}",
                            scope::account_permission(s),
                            access.as_str()
                        ),
                    ));
                } else if !ids.contains(id) {
                    ids.push(*id);
                }
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::account::MemberRole;

    fn catalog() -> Vec<(String, bool)> {
        [
            ("accounts:read", true),
            ("orders:read", true),
            ("orders:write", true),
            ("admin:users", false),
        ]
        .into_iter()
        .map(|(s, g)| (s.to_string(), g))
        .collect()
    }

    fn parse(req: NewKey, access: &HashMap<Uuid, Access>) -> Result<Grant, Vec<FieldError>> {
        let catalog = catalog();
        Grant::parse(
            req,
            GrantFacts {
                catalog: &catalog,
                access,
                now: Utc::now(),
            },
        )
    }

    fn codes(r: Result<Grant, Vec<FieldError>>) -> Vec<(String, &'static str)> {
        r.unwrap_err()
            .into_iter()
            .map(|e| (e.field, e.code))
            .collect()
    }

    #[test]
    fn a_good_grant_is_normalised_and_deduplicated() {
        let g = parse(
            NewKey {
                name: "  ci  ".into(),
                scopes: vec!["orders:read".into(), "orders:read".into()],
                allowed_ips: vec![
                    "10.1.2.3/8".into(),
                    "10.0.0.0/8".into(),
                    "2001:db8::1".into(),
                ],
                rate_limit_per_minute: Some(60),
                ..Default::default()
            },
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(g.name, "ci");
        assert_eq!(g.scopes, ["orders:read"]);
        assert_eq!(g.allowed_ips, ["10.0.0.0/8", "2001:db8::1/128"]);
        assert_eq!(g.rate_limit_per_minute, Some(60));
        assert_eq!(g.first_unheld(&["orders:read".into()]), None);
        assert_eq!(g.first_unheld(&[]), Some("orders:read"));
    }

    #[test]
    fn every_failure_is_reported_at_once_naming_its_path() {
        let got = codes(parse(
            NewKey {
                name: String::new(),
                scopes: vec!["nope".into(), "admin:users".into()],
                expires_at: Some(Utc::now() - chrono::Duration::days(1)),
                allowed_ips: vec!["not-an-ip".into()],
                trading_account_ids: vec![Uuid::new_v4()],
                rate_limit_per_minute: Some(0),
            },
            &HashMap::new(),
        ));
        let want = [
            ("name", "invalid"),
            ("scopes[0]", "unknown_scope"),
            ("scopes[1]", "not_grantable"),
            ("expires_at", "in_past"),
            ("allowed_ips[0]", "invalid"),
            ("rate_limit_per_minute", "out_of_range"),
            ("trading_account_ids[0]", "unknown_account"),
        ];
        let want: Vec<(String, &str)> = want.iter().map(|(f, c)| (f.to_string(), *c)).collect();
        assert_eq!(got, want);
        let none = codes(parse(
            NewKey {
                name: "k".into(),
                ..Default::default()
            },
            &HashMap::new(),
        ));
        assert_eq!(none, [("scopes".to_string(), "required")]);
    }

    #[test]
    fn an_account_needs_access_covering_every_scope() {
        let (viewed, traded) = (Uuid::new_v4(), Uuid::new_v4());
        let access = HashMap::from([
            (viewed, Access::Member(MemberRole::Viewer)),
            (traded, Access::Member(MemberRole::Trader)),
        ]);
        let req = |scope: &str, ids: Vec<Uuid>| NewKey {
            name: "k".into(),
            scopes: vec![scope.into()],
            trading_account_ids: ids,
            ..Default::default()
        };
        let g = parse(req("orders:write", vec![traded, traded]), &access).unwrap();
        assert_eq!(g.trading_account_ids, [traded]);
        assert_eq!(
            codes(parse(req("orders:write", vec![viewed]), &access)),
            [("trading_account_ids[0]".to_string(), "insufficient_access")]
        );
        assert!(parse(req("orders:read", vec![viewed]), &access).is_ok());
    }
}
