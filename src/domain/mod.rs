//! Pure types and rules, no I/O: parse, don't validate.

pub mod account;
pub mod api_key;
pub mod api_key_grant;
pub mod audit;
pub mod email;
pub mod import;
pub mod instant;
pub mod invitation;
pub mod lockout;
pub mod mfa;
pub mod network;
pub mod passkey;
pub mod password;
pub mod policy;
pub mod recovery;
pub mod scope;
pub mod session;
pub mod user;

/// One field-level validation failure (the gateway answers it as
/// `http::problem::FieldError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The request field (or `body` / `query`) that failed.
    pub field: String,
    /// Machine code of the failure, e.g. `invalid`, `too_weak`, `required`.
    pub code: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            code,
            message: message.into(),
        }
    }
}
