//! Pure types and rules, no I/O: parse, don't validate.

pub mod account;
pub mod api_key;
pub mod email;
pub mod password;
pub mod policy;
pub mod user;
