//! The one integration-test binary: every test starts the whole service on port 0
//! against a fresh migrated database and its own Redis key prefix.

mod helpers;

mod accounts;
mod api_keys;
mod auth;
mod browser;
mod config;
mod deploy;
mod edge;
mod foundation;
mod observability;
mod openapi;
mod scale_out;
mod tls;
