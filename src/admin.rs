//! Operator subcommands (`user-service admin …`). Each prints JSON on stdout.
//! Those that run a use case build the same `Services` graph as the server (no
//! listener, no background work).

use clap::Subcommand;

use crate::config::Settings;
use crate::service::service_clients::ClientCredentials;
use crate::service::Services;

/// How long each store gets to close when a command is done.
const STORE_CLOSE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Re-encrypt every broker credential and TOTP secret under the active key
    /// (safe to re-run).
    ReencryptCredentials,
    /// Create a user (e.g. the first admin); prints the user as JSON. The password
    /// is read from stdin, never from the command line.
    CreateUser {
        #[arg(long)]
        email: String,
        #[arg(long)]
        full_name: String,
        /// Repeatable; `user` when none is given.
        #[arg(long = "role")]
        roles: Vec<String>,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Create a service client; prints {"client_id", "client_secret"} (the secret this once).
    CreateServiceClient {
        name: String,
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
    },
    /// Issue a new secret for a service client; the old one stops working.
    RotateServiceClientSecret { client_id: String },
    /// Time one argon2id password hash on this machine (touches no store): the
    /// cost of a login, for sizing (logins/s per core = 1000 / ms). Prints
    /// {"argon2_ms_per_hash": median, "argon2_ms_min", "argon2_ms_max", "hashes"}.
    TimeArgon2 {
        #[arg(long, default_value_t = 41)]
        hashes: u32,
    },
    /// Walk the audit log's hash chain. Prints {"ok": true, "rows"} when every link
    /// holds; otherwise {"ok": false, "rows", "broken": {"id", "position", "reason"}}
    /// for the first broken link, and exits 1.
    VerifyAuditChain,
    /// Import users of the FastAPI user_service from a JSON-lines file (DESIGN.md
    /// section 8) with their bcrypt, argon2 or pbkdf2-sha256 password hashes; emails
    /// already present are skipped. Prints {"imported", "skipped", "invalid":
    /// [{"line", "reason"}], "dry_run"}; --dry-run writes nothing.
    ImportUsers {
        file: std::path::PathBuf,
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(settings: Settings, cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::TimeArgon2 { hashes } => time_argon2(hashes),
        AdminCommand::VerifyAuditChain => verify_audit_chain(&settings).await,
        AdminCommand::ImportUsers { file, dry_run } => {
            let input = std::fs::File::open(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let db = crate::store::Db::connect_lazy(&settings)?;
            let input = std::io::BufReader::new(input);
            let report = crate::service::import_users::import_users(&db, input, dry_run)
                .await
                .map_err(|e| anyhow::anyhow!("import-users: {}", describe(e)))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        AdminCommand::ReencryptCredentials => reencrypt_credentials(&settings).await,
        AdminCommand::CreateUser {
            email,
            full_name,
            roles,
            password_stdin,
        } => create_user(&settings, &email, &full_name, &roles, password_stdin).await,
        AdminCommand::CreateServiceClient { name, scopes } => {
            let services = Services::build(&settings)?;
            let creds = services
                .service_clients
                .create(None, &name, &scopes)
                .await
                .map_err(|e| anyhow::anyhow!("create-service-client: {}", describe(e)))?;
            print_client(creds)
        }
        AdminCommand::RotateServiceClientSecret { client_id } => {
            let services = Services::build(&settings)?;
            let creds = services
                .service_clients
                .rotate_secret(None, &client_id)
                .await
                .map_err(|e| anyhow::anyhow!("rotate-service-client-secret: {}", describe(e)))?;
            print_client(creds)
        }
    }
}

/// A service error as one line for the operator, field errors included.
fn describe(e: crate::service::ServiceError) -> String {
    match e {
        crate::service::ServiceError::Validation(errs) => errs
            .iter()
            .map(|f| format!("{}: {}", f.field, f.message))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

fn print_client(creds: ClientCredentials) -> anyhow::Result<()> {
    use secrecy::ExposeSecret;
    println!(
        "{}",
        serde_json::json!({
            "client_id": creds.client_id,
            "client_secret": creds.client_secret.expose_secret(),
        })
    );
    Ok(())
}

async fn create_user(
    settings: &Settings,
    email: &str,
    full_name: &str,
    roles: &[String],
    password_stdin: bool,
) -> anyhow::Result<()> {
    if !password_stdin {
        anyhow::bail!(
            "pass --password-stdin and write the password to stdin (never on the command line)"
        );
    }
    let mut password = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut password)?;
    // One trailing newline is the terminal's, not the password's.
    if password.ends_with('\n') {
        password.pop();
        if password.ends_with('\r') {
            password.pop();
        }
    }
    let services = Services::build(settings)?;
    let user = services
        .users
        .create_by_operator(email, full_name, password, roles)
        .await
        .map_err(|e| anyhow::anyhow!("create-user: {}", describe(e)))?;
    // The gateway's wire form, so scripts read one shape.
    println!(
        "{}",
        serde_json::to_string(&crate::http::users::User::from(user))?
    );
    Ok(())
}

/// Prints `{active_key_id, candidates, reencrypted, already_current, failed,
/// totp_secrets: {candidates, reencrypted, already_current, failed}}`;
/// exits non-zero when any value could not be moved (it stays under its old key).
async fn reencrypt_credentials(settings: &Settings) -> anyhow::Result<()> {
    if settings.credentials_encryption_keys.is_none() {
        anyhow::bail!("CREDENTIALS_ENCRYPTION_KEYS is not set");
    }
    let services = Services::build(settings)?;
    let summary = services
        .accounts
        .reencrypt_credentials()
        .await
        .map_err(|e| anyhow::anyhow!("reencrypt-credentials: {e}"))?;
    // TOTP secrets are sealed with the same key ring (issue 14).
    let totp = services
        .mfa
        .reencrypt_totp_secrets()
        .await
        .map_err(|e| anyhow::anyhow!("reencrypt-credentials (TOTP secrets): {e}"))?;
    let mut out = serde_json::to_value(&summary)?;
    out["totp_secrets"] = serde_json::to_value(&totp)?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    services.close(STORE_CLOSE).await;
    if !summary.failed.is_empty() || !totp.failed.is_empty() {
        anyhow::bail!(
            "{} account(s) and {} TOTP secret(s) could not be re-encrypted",
            summary.failed.len(),
            totp.failed.len()
        );
    }
    Ok(())
}

/// Hashes on this thread, as the service's hashing pool does, with the service's
/// allocator (which decides how the 19 MiB of each hash are obtained and zeroed).
/// Prints the median time of `hashes` runs (robust to a neighbour's burst on a
/// shared machine), with the fastest and slowest.
fn time_argon2(hashes: u32) -> anyhow::Result<()> {
    use crate::crypto::password::hash_on_this_thread;
    let password = secrecy::SecretString::from("violet-tunnel-orbit-97-marsh".to_string());
    hash_on_this_thread(&password)?; // warm-up
    let mut ms = Vec::with_capacity(hashes.max(1) as usize);
    for _ in 0..hashes.max(1) {
        let start = std::time::Instant::now();
        hash_on_this_thread(&password)?;
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "argon2_ms_per_hash": ms[ms.len() / 2],
            "argon2_ms_min": ms[0],
            "argon2_ms_max": ms[ms.len() - 1],
            "hashes": ms.len(),
        })
    );
    Ok(())
}

async fn verify_audit_chain(settings: &Settings) -> anyhow::Result<()> {
    let services = Services::build(settings)?;
    let report = services
        .audit_log
        .verify_chain()
        .await
        .map_err(|e| anyhow::anyhow!("verify-audit-chain: {e}"))?;
    services.close(STORE_CLOSE).await;
    println!(
        "{}",
        serde_json::json!({
            "ok": report.broken.is_none(),
            "rows": report.rows,
            "broken": report.broken,
        })
    );
    match report.broken {
        None => Ok(()),
        Some(b) => anyhow::bail!(
            "audit chain broken at row id {} (position {}): {}",
            b.id,
            b.position,
            b.reason
        ),
    }
}
