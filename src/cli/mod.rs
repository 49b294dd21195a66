//! The `botflow` command line: the daemon (`serve`), database and configuration
//! chores, the bootstrap commands that work without a running daemon, `send`, and
//! `bench`. Commands that create something print only the new id or key on stdout;
//! everything for people goes to stderr.

pub mod api;
pub mod bench;
pub mod bootstrap;
pub mod database;
pub mod limits;
pub mod send;
pub mod serve;

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
    /// Workflows
    #[command(subcommand)]
    Workflows(WorkflowsCmd),
    /// Dead letters: executions that used up their attempts
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// Per-chatbot rate limits (over the admin API of a running daemon)
    #[command(subcommand)]
    Limits(limits::LimitsCmd),
    /// Stream NDJSON events to the daemon and print every line it answers
    Send(send::SendArgs),
    /// Measure the daemon's throughput and latency against a real PostgreSQL
    Bench(bench::BenchArgs),
    /// Print the admin API's OpenAPI document (the one served at /v1/openapi.json)
    Openapi,
}

#[derive(Subcommand, Debug)]
pub enum AccountsCmd {
    /// Create an account; prints its id
    Create { name: String },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create an API key; prints the key (shown only this once)
    Create {
        #[arg(long)]
        account: uuid::Uuid,
        /// ingest (send events), admin (manage the account's workflows) or operator (everything)
        #[arg(long)]
        role: crate::store::accounts::Role,
    },
}

#[derive(Subcommand, Debug)]
pub enum ChatbotsCmd {
    /// Create a chatbot; prints its id
    Create {
        #[arg(long)]
        account: uuid::Uuid,
        name: String,
    },
    /// Print the secret that signs the chatbot's webhook requests
    Secret { chatbot: uuid::Uuid },
}

#[derive(Subcommand, Debug)]
pub enum DlqCmd {
    /// List dead letters, newest first (open ones unless --all)
    List {
        #[arg(long)]
        chatbot: Option<uuid::Uuid>,
        /// Include replayed and discarded ones
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// One JSON object per line, with the event and the attempt history
        #[arg(long)]
        json: bool,
    },
    /// Run the dead execution once more, from the step that failed
    Replay {
        id: uuid::Uuid,
        /// Who replays it [default: $USER]
        #[arg(long)]
        by: Option<String>,
    },
    /// Give up on a dead execution, recording who did
    Discard {
        id: uuid::Uuid,
        /// Who discards it [default: $USER]
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum WorkflowsCmd {
    /// Create or replace workflows by name from a JSON or YAML file (one or a list); prints their ids
    Apply {
        #[arg(long)]
        chatbot: uuid::Uuid,
        /// The file, or - for stdin
        file: PathBuf,
    },
}
