//! The one integration-test binary: every test starts the whole service on port 0
//! against a fresh migrated database and its own Redis key prefix.

mod helpers;

mod accounts;
mod api_keys;
mod auth;
mod config;
mod deploy;
mod foundation;
mod network;
mod observability;
mod openapi;
mod runtime;
mod scale_out;
mod tls;
mod token_cache;
