//! Users, login, tokens, sessions and service clients (issue 3), through the real
//! HTTP and gRPC stacks against PostgreSQL and Redis.

mod login;
mod login_failures;
mod sessions;
mod tokens;
mod users;

use crate::helpers::TestApp;

fn email() -> String {
    format!(
        "u{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

async fn audit_count(app: &TestApp, action: &str) -> i64 {
    sqlx::query_scalar("select count(*) from audit_logs where action = $1")
        .bind(action)
        .fetch_one(&app.db)
        .await
        .unwrap()
}
