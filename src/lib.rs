//! user-service: the identity service of the StocksBlitz trading platform.
//!
//! ```text
//!   gRPC callers ─┐                         ┌─ store::Db     (PostgreSQL, sqlx)
//!                 ├─ grpc/ ─┐               │
//!                 │         ├─ service/ ────┼─ store::Cache  (Redis, fred)
//!   browsers/curl ┴─ http/ ─┘   domain/     │
//!                         (rules, no I/O)   └─ crypto/      (argon2, JWT, AEAD)
//! ```
//!
//! Transports only translate and authenticate; `service/` decides; `domain/` holds
//! the pure types and rules; `store/` is the only place that sees sqlx or fred.

pub mod admin;
pub mod alert;
pub mod app;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod grpc;
pub mod http;
pub mod proto;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod telemetry;
