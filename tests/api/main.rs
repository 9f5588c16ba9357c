//! The one integration-test binary: every test starts the whole service on port 0
//! against a fresh migrated database and its own Redis key prefix. A large topic is a
//! directory (accounts/, api_keys/, auth/, deploy/): its mod.rs holds the helpers its
//! files share, each file one sub-topic.

mod helpers;

mod account_races;
mod account_rules;
mod accounts;
mod alert_receiver;
mod api_keys;
mod audit_chain;
mod auth;
mod browser;
mod config;
mod config_keys;
mod conflicts;
mod deploy;
mod edge;
mod foundation;
mod grpc_ids;
mod hostile_input;
mod http2;
mod import_users;
mod invitations;
mod lockout;
mod mfa_hygiene;
mod mfa_login;
mod mfa_step_up;
mod mfa_support;
mod mfa_totp;
mod network;
mod notify;
mod observability;
mod openapi;
mod own_postgres;
mod passkeys;
mod recovery;
mod recovery_logs;
mod request_span;
mod runtime;
mod scale_out;
mod service_scopes;
mod tls;
mod token_cache;
