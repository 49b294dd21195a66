//! Bootstrap commands against the database, without a running daemon: accounts, keys,
//! chatbots and `workflows apply`. A running daemon hears about workflow changes
//! through PostgreSQL NOTIFY within a second.

use super::database::Database;
use super::{AccountsCmd, ChatbotsCmd, DlqCmd, KeysCmd, WorkflowsCmd};
use crate::config::Config;
use crate::store::{accounts, dead_letters, workflows, StoreError};
use crate::workflow::parse_workflows;
use anyhow::{bail, Context};
use std::io::Read;

fn run<T>(config: &Config, f: impl AsyncFnOnce(&crate::store::Store) -> anyhow::Result<T>) -> anyhow::Result<T> {
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
            println!("{}", record.webhook_secret);
        }
    }
    Ok(())
}

pub fn workflows(config: Config, cmd: WorkflowsCmd) -> anyhow::Result<()> {
    match cmd {
        WorkflowsCmd::Apply { chatbot, file } => {
            let bytes = if file.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::stdin().read_to_end(&mut b).context("cannot read stdin")?;
                b
            } else {
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?
            };
            let specs = parse_workflows(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let applied = run(&config, async |s| match workflows::apply(s, chatbot, &specs).await {
                Err(StoreError::NotFound { what, id }) => bail!("{what} {id} does not exist"),
                other => Ok(other?),
            })?;
            for (spec, a) in specs.iter().zip(&applied) {
                match a {
                    workflows::Applied::Created { .. } => eprintln!("created workflow {:?}", spec.name),
                    workflows::Applied::Updated { version, .. } => {
                        eprintln!("updated workflow {:?} to version {version}", spec.name)
                    }
                    workflows::Applied::Unchanged { version, .. } => {
                        eprintln!("workflow {:?} unchanged (version {version})", spec.name)
                    }
                }
                println!("{}", a.id());
            }
        }
    }
    Ok(())
}

/// Who is acting, for the records of replays and discards.
fn actor(by: Option<String>) -> String {
    by.or_else(|| std::env::var("USER").ok()).filter(|s| !s.trim().is_empty()).unwrap_or_else(|| "unknown".into())
}

pub fn dlq(config: Config, cmd: DlqCmd) -> anyhow::Result<()> {
    match cmd {
        DlqCmd::List { chatbot, all, limit, json } => {
            let letters = run(&config, async |s| Ok(dead_letters::list(s, &dead_letters::Filter { chatbot_id: chatbot, state: if all { dead_letters::State::All } else { dead_letters::State::Open }, ..Default::default() }, None, limit).await?))?;
            if json {
                for dl in &letters {
                    println!("{}", serde_json::to_string(dl)?);
                }
            } else {
                if letters.is_empty() {
                    eprintln!("no dead letters");
                }
                for dl in &letters {
                    println!(
                        "{}  {}  chatbot {}  workflow {} v{}  {} attempts  {}  {}",
                        dl.id,
                        dl.created_at.format("%Y-%m-%d %H:%M:%S"),
                        dl.chatbot_id,
                        dl.workflow_id,
                        dl.workflow_version,
                        dl.attempts,
                        dl.state(),
                        dl.last_error.as_deref().unwrap_or("")
                    );
                }
            }
        }
        DlqCmd::Replay { id, by } => {
            let by = actor(by);
            let dl = run(&config, async |s| Ok(dead_letters::replay(s, id, &by).await?))?;
            eprintln!("execution {} runs again (attempt {}), replayed by {by}", dl.execution_id, dl.attempts + 1);
            println!("{}", dl.execution_id);
        }
        DlqCmd::Discard { id, by } => {
            let by = actor(by);
            let dl = run(&config, async |s| Ok(dead_letters::discard(s, id, &by).await?))?;
            eprintln!("dead letter {} discarded by {by}", dl.id);
        }
    }
    Ok(())
}
