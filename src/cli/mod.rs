//! The `botflow` command line: the daemon (`serve`), database and configuration
//! chores, the bootstrap commands that work without a running daemon, the commands
//! over the admin API of a running daemon (workflows, executions, analytics, dead
//! letters, limits, the lifecycle of keys and chatbots, the audit log; `api` is their
//! client), `send`, and `bench`. Commands that create
//! something print only the new id or key on stdout; everything for people goes to
//! stderr.

pub mod analytics;
pub mod api;
pub mod bench;
pub mod bootstrap;
pub mod database;
pub mod dlq;
pub mod executions;
pub mod lifecycle;
pub mod limits;
pub mod progress;
pub mod send;
pub mod serve;
pub mod systemd;
pub mod workflows;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "botflow", version, about = "Runs chatbot automation workflows")]
pub struct Cli {
    /// Configuration file [default: config/botflow.toml, if it exists]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon
    Serve,
    /// Apply pending database migrations and exit
    Migrate,
    /// Validate the configuration and print the effective values (secrets hidden)
    CheckConfig,
    /// Accounts (owners of chatbots)
    #[command(subcommand)]
    Accounts(AccountsCmd),
    /// API keys
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Chatbots
    #[command(subcommand)]
    Chatbots(ChatbotsCmd),
    /// Workflows (`apply` also works without a daemon)
    #[command(subcommand)]
    Workflows(workflows::WorkflowsCmd),
    /// Execution history (over the admin API of a running daemon)
    #[command(subcommand)]
    Executions(executions::ExecutionsCmd),
    /// Per-workflow figures of a chatbot over a time window
    Analytics(analytics::AnalyticsArgs),
    /// Dead letters: executions that used up their attempts
    #[command(subcommand)]
    Dlq(dlq::DlqCmd),
    /// Per-chatbot rate limits (over the admin API of a running daemon)
    #[command(subcommand)]
    Limits(limits::LimitsCmd),
    /// Who revoked or rotated keys and rotated webhook secrets, when (over the admin API)
    Audit(lifecycle::ListArgs),
    /// Stream NDJSON events to the daemon and print every line it answers
    Send(send::SendArgs),
    /// Measure the daemon's throughput and latency against a real PostgreSQL
    Bench(bench::BenchArgs),
    /// Print the admin API's OpenAPI document (the one served at /v1/openapi.json)
    Openapi,
    /// Delete history past its retention now (a running daemon does it every retention.interval_seconds)
    Prune {
        /// Count what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a shell completion script (e.g. `botflow completions bash > /etc/bash_completion.d/botflow`)
    Completions {
        /// The shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page, roff (e.g. `botflow man > /usr/local/share/man/man1/botflow.1`)
    Man,
}

#[derive(Subcommand, Debug)]
pub enum AccountsCmd {
    /// Create an account; prints its id
    Create {
        /// The account's name (a company, a team)
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create an API key; prints the key (shown only this once)
    Create {
        /// The account's id
        #[arg(long, value_parser = crate::cli::id_arg)]
        account: uuid::Uuid,
        /// ingest (send events), admin (manage the account's workflows) or operator (everything)
        #[arg(long)]
        role: crate::store::accounts::Role,
    },
    /// List API keys: prefix, role, account, created, last used, revoked or expiring
    /// (over the admin API; never the keys themselves)
    List(lifecycle::ListArgs),
    /// Revoke a key now: refused by the API at once, its socket connections closed
    /// within a second (over the admin API)
    Revoke(lifecycle::RevokeArgs),
    /// Make a new key in place of one; the old one works for --grace more. Prints the
    /// new key, shown only this once (over the admin API)
    Rotate(lifecycle::RotateArgs),
}

#[derive(Subcommand, Debug)]
pub enum ChatbotsCmd {
    /// Create a chatbot; prints its id
    Create {
        /// The account's id
        #[arg(long, value_parser = crate::cli::id_arg)]
        account: uuid::Uuid,
        /// The chatbot's name
        name: String,
    },
    /// Print the secret that signs the chatbot's webhook requests
    Secret {
        /// The chatbot's id
        #[arg(value_parser = crate::cli::id_arg)]
        chatbot: uuid::Uuid,
    },
    /// Give the chatbot a new webhook secret and print it; webhooks carry the old
    /// secret's signature too for --grace (over the admin API)
    RotateSecret(lifecycle::RotateArgs),
    /// Delete a chatbot: ingest and the API refuse it at once, every daemon stops its
    /// supervisor; refused while executions are unfinished unless --force (over the
    /// admin API)
    Delete(lifecycle::DeleteArgs),
}

/// Reads an id argument (a chatbot, workflow, account, execution or dead letter id),
/// saying what is expected instead of the UUID parser's character position.
pub fn id_arg(s: &str) -> Result<uuid::Uuid, String> {
    uuid::Uuid::parse_str(s).map_err(|_| "expected an id, a UUID such as 0195f0c4-8a1e-7cc2-9a4b-1f2e3d4c5b6a".to_string())
}

#[cfg(test)]
mod help_tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every subcommand and every flag or argument says what it is for in `--help`.
    #[test]
    fn every_command_and_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{path} (the command)"));
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "botflow", &mut missing);
        assert!(missing.is_empty(), "no help text for:\n{}", missing.join("\n"));
    }
}
