//! Operator subcommands (`user-service admin …`). Each prints JSON on stdout.

use clap::Subcommand;

use crate::config::Settings;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Re-encrypt every broker credential under the active key (safe to re-run).
    ReencryptCredentials,
}

pub async fn run(_settings: Settings, cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::ReencryptCredentials => {
            anyhow::bail!("reencrypt-credentials is not available yet")
        }
    }
}
