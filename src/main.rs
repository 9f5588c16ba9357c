//! The `user-service` command: serve | migrate | check-config | admin …

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use user_service::app::App;
use user_service::config::{ConfigError, Environment, Settings};
use user_service::{shutdown, store, telemetry};

/// mimalloc instead of glibc malloc: a request allocates and frees dozens of small
/// buffers (headers, frames, messages), and glibc's free/consolidate path was
/// about a tenth of the service's CPU under load (scripts/bench, perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for this process. mimalloc asks for them on its
/// arenas (madvise), and a 2 MiB page is resident whole however little of it is
/// in use: with 100,000 cached keys and tokens the service held 151 MiB with
/// them and 124 MiB without (27 MiB of half-used huge pages, scripts/bench's
/// fill), for no measurable difference in an argon2 hash or a verification.
/// The flag also overrides a system-wide `always`, and children inherit it.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[derive(Parser)]
#[command(name = "user-service", version, about = "StocksBlitz identity service")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC and the JSON gateway on USER_SERVICE_HOST:USER_SERVICE_PORT (default).
    Serve,
    /// Apply migrations/ (idempotent).
    Migrate,
    /// Print the effective settings, secrets masked; exit 1 on a problem.
    CheckConfig,
    /// Operator tasks.
    #[command(subcommand)]
    Admin(user_service::admin::AdminCommand),
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::CheckConfig = command {
        return check_config();
    }
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e @ ConfigError::Insecure(_)) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = settings.validate() {
        eprintln!("{e}");
        return ExitCode::from(1);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Serve => serve(settings).await,
            Command::Migrate => migrate(settings).await,
            Command::Admin(cmd) => user_service::admin::run(settings, cmd).await,
            Command::CheckConfig => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Every problem in one pass: what loading found (unset `${VAR}`s, bad values,
/// placeholders) and what validation finds in the rest.
fn check_config() -> ExitCode {
    let vars: std::collections::HashMap<String, String> = std::env::vars().collect();
    let loaded = std::env::current_dir()
        .map_err(|e| e.to_string())
        .and_then(|dir| Settings::inspect_from(&vars, &dir).map_err(|e| e.to_string()));
    let (settings, mut problems) = match loaded {
        Ok(l) => l,
        Err(e) => {
            println!("error: {e}");
            return ExitCode::from(1);
        }
    };
    for (k, v) in settings.effective() {
        println!("{k}={v}");
    }
    problems.extend(settings.problems());
    // deploy: the service's database role, checked against the database itself.
    if settings.app_env != Environment::Development {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(audit_role_problem(&settings)))
        {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(problem))) => problems.push(problem),
            Ok(Err(unchecked)) => println!("warning: {unchecked}"),
            Err(e) => println!("warning: cannot start a runtime to check the database role: {e}"),
        }
    }
    for p in &problems {
        println!("error: {p}");
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let _sentry = telemetry::init_sentry(&settings);
    telemetry::init_tracing(&settings);
    let result = run(settings).await;
    // Logged through tracing (not only printed) so Sentry and the JSON log see why
    // the service stopped; the Sentry guard flushes the event when it drops.
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "user-service stopped on an error");
    }
    result
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    if settings.app_env != Environment::Development {
        match audit_role_problem(&settings).await {
            Ok(None) => {}
            Ok(Some(problem)) => anyhow::bail!(problem),
            // The service starts while the database is down (NOT_SERVING until it
            // is back), so a check that cannot run now does not stop it.
            Err(unchecked) => tracing::warn!("{unchecked}"),
        }
    }
    let app = App::build(settings).await?;
    let stop = app.shutdown();
    tokio::spawn(async move {
        shutdown::os_signal().await;
        stop.trigger();
    });
    app.run_until_stopped().await
}

/// Staging and production: whether DATABASE_URL's role could switch the audit
/// log's triggers off (service::audit_log::append_only_problem), with one short-lived
/// connection.
async fn audit_role_problem(settings: &Settings) -> Result<Option<String>, String> {
    let db = store::Db::connect_lazy(settings).map_err(|e| e.to_string())?;
    let checked =
        user_service::service::audit_log::append_only_problem(&db, settings.app_env.as_str()).await;
    db.close().await;
    checked
}

async fn migrate(settings: Settings) -> anyhow::Result<()> {
    telemetry::init_tracing(&settings);
    let db = store::Db::connect_migrator(&settings)?;
    db.migrate().await?;
    println!("migrations applied");
    Ok(())
}
