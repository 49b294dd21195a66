//! Bootstrap commands against the database, without a running daemon: accounts, keys,
//! chatbots, and the database side of `workflows apply` (the command itself lives in
//! `workflows`). A running daemon hears about workflow changes through PostgreSQL
//! NOTIFY within a second. (`keys list|revoke|rotate` and `chatbots rotate-secret` go over the admin API, in
//! `lifecycle`.)

use super::database::Database;
use super::{AccountsCmd, ChatbotsCmd, KeysCmd};
use crate::config::Config;
use crate::store::{accounts, workflows, StoreError};
use crate::workflow::WorkflowSpec;
use anyhow::bail;
use uuid::Uuid;

pub(super) fn run<T>(config: &Config, f: impl AsyncFnOnce(&crate::store::Store) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let db = Database::open_shared(config)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let store = db.store(config).await?;
        f(&store).await
    })
}

pub fn accounts(config: Config, cmd: AccountsCmd) -> anyhow::Result<()> {
    match cmd {
        AccountsCmd::Create { name } => {
            let id = run(&config, async |s| Ok(accounts::create_account(s, &name).await?))?;
            eprintln!("created account {name:?}");
            println!("{id}");
        }
    }
    Ok(())
}

pub fn keys(config: Config, cmd: KeysCmd) -> anyhow::Result<()> {
    match cmd {
        KeysCmd::Create { account, role } => {
            let key = run(&config, async |s| Ok(accounts::create_key(s, account, role).await?))?;
            let article = if role == crate::store::accounts::Role::Ingest { "an" } else { "a" };
            eprintln!("created {article} {role} key for account {account}; it is shown only now");
            println!("{key}");
        }
        KeysCmd::List(a) => super::lifecycle::list(config, a)?,
        KeysCmd::Revoke(a) => super::lifecycle::revoke(config, a)?,
        KeysCmd::Rotate(a) => super::lifecycle::rotate(config, a)?,
    }
    Ok(())
}

pub fn chatbots(config: Config, cmd: ChatbotsCmd) -> anyhow::Result<()> {
    match cmd {
        ChatbotsCmd::Create { account, name } => {
            let id = run(&config, async |s| Ok(accounts::create_chatbot(s, account, &name).await?))?;
            eprintln!("created chatbot {name:?} for account {account}");
            println!("{id}");
        }
        ChatbotsCmd::Secret { chatbot } => {
            let record = run(&config, async |s| Ok(accounts::get_chatbot(s, chatbot).await?))?;
            let Some(record) = record else { bail!("chatbot {chatbot} does not exist") };
            println!("{}", record.signing().current);
        }
        ChatbotsCmd::RotateSecret(a) => super::lifecycle::rotate_secret(config, a)?,
        ChatbotsCmd::Delete(a) => super::lifecycle::delete_chatbot(config, a)?,
    }
    Ok(())
}

/// `workflows apply` without a daemon: creates or replaces the workflows by name in one
/// transaction on the configured database (the admin API's apply runs the same).
pub fn apply_workflows(config: &Config, chatbot: Uuid, specs: &[WorkflowSpec]) -> anyhow::Result<Vec<workflows::Applied>> {
    // The configuration was checked when it loaded; its listeners are those configured.
    let listeners = [&config.ingest.tcp, &config.admin.listen, &config.metrics.listen].into_iter().filter_map(|a| a.parse().ok());
    let policy = config.egress_policy().unwrap_or_default().with_own_listeners(listeners);
    for (i, spec) in specs.iter().enumerate() {
        if let Err(e) = policy.check_workflow(spec) {
            let at = if specs.len() > 1 { format!("[{i}].") } else { String::new() };
            bail!("{at}{}: {}", e.field, e.message);
        }
    }
    run(config, async |s| match workflows::apply(s, chatbot, specs).await {
        Err(StoreError::NotFound { what, id }) => bail!("{what} {id} does not exist"),
        other => Ok(other?),
    })
}

/// `prune`: deletes the history past its retention now, as the daemon's pruner does at
/// its interval; with `dry_run`, counts what would go. Prints `kind rows` lines.
pub fn prune(config: Config, dry_run: bool) -> anyhow::Result<()> {
    let defaults = (&config.retention).into();
    let progress = super::progress::spinner(if dry_run { "counting" } else { "pruning" });
    let pruned = run(&config, async |s| {
        let tick = |_: &str, n: u64| progress.inc(n);
        Ok(crate::store::retention::prune(s, defaults, (&config.retention).into(), dry_run, tick).await?)
    });
    progress.finish_and_clear();
    let pruned = pruned?;
    eprintln!("{} past their retention:", if dry_run { "would prune (nothing was deleted)" } else { "pruned" });
    println!("executions {}", pruned.executions);
    println!("dead_letters {}", pruned.dead_letters);
    println!("acked_commands {}", pruned.acked_commands);
    println!("deleted_chatbots {}", pruned.chatbots);
    Ok(())
}

