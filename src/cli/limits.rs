//! `botflow limits get|set`: a chatbot's rate limits, over the admin API (changing
//! them takes an operator key; the running daemons apply a change within a second).

use super::api::{block_on, Api, ApiArgs};
use crate::config::Config;
use clap::Subcommand;
use serde_json::{json, Value};

#[derive(Subcommand, Debug)]
pub enum LimitsCmd {
    /// The limits in force, the chatbot's own values, current usage and recent changes
    Get {
        /// The chatbot's id
        #[arg(long, value_parser = crate::cli::id_arg)]
        chatbot: uuid::Uuid,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Set the chatbot's own values; the others keep theirs (use --reset for defaults)
    Set {
        /// The chatbot's id
        #[arg(long, value_parser = crate::cli::id_arg)]
        chatbot: uuid::Uuid,
        /// Events accepted per second, on average
        #[arg(long)]
        events_per_second: Option<u32>,
        /// Events accepted at once above that rate
        #[arg(long)]
        burst: Option<u32>,
        /// Executions started per second
        #[arg(long)]
        executions_per_second: Option<u32>,
        /// Executions running at once
        #[arg(long)]
        max_concurrent: Option<u32>,
        /// Start from the daemon's defaults instead of the chatbot's current values
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub fn run(config: Config, cmd: LimitsCmd) -> anyhow::Result<()> {
    match cmd {
        LimitsCmd::Get { chatbot, api } => {
            let client = Api::new(&config, &api)?;
            let v = block_on(client.call(reqwest::Method::GET, &format!("/v1/chatbots/{chatbot}/limits"), None))?;
            print(&v, api.json);
        }
        LimitsCmd::Set { chatbot, events_per_second, burst, executions_per_second, max_concurrent, reset, api } => {
            let client = Api::new(&config, &api)?;
            let path = format!("/v1/chatbots/{chatbot}/limits");
            let v = block_on(async {
                let mut overrides =
                    if reset { json!({}) } else { client.call(reqwest::Method::GET, &path, None).await?["overrides"].clone() };
                for (k, v) in [
                    ("events_per_second", events_per_second),
                    ("burst", burst),
                    ("executions_per_second", executions_per_second),
                    ("max_concurrent", max_concurrent),
                ] {
                    if let Some(v) = v {
                        overrides[k] = json!(v);
                    }
                }
                client.call(reqwest::Method::PUT, &path, Some(&overrides)).await
            })?;
            eprintln!("limits of chatbot {chatbot} changed");
            print(&v, api.json);
        }
    }
    Ok(())
}

fn print(v: &Value, as_json: bool) {
    if as_json {
        println!("{v}");
        return;
    }
    let l = &v["limits"];
    let o = &v["overrides"];
    let own = |k: &str| if o[k].is_null() { "(default)" } else { "(own)" };
    println!("limits of chatbot {}", v["chatbot_id"].as_str().unwrap_or(""));
    for k in ["events_per_second", "burst", "executions_per_second", "max_concurrent"] {
        println!("  {k:<22} {:>8} {}", l[k], own(k));
    }
    match v["usage"].as_object() {
        Some(u) => {
            println!("usage now");
            for (k, val) in u {
                println!("  {k:<22} {val:>8}");
            }
        }
        None => println!("usage now: idle (no supervisor running)"),
    }
    if let Some(changes) = v["changes"].as_array().filter(|c| !c.is_empty()) {
        println!("recent changes");
        for c in changes {
            println!("  {} by {}: {} -> {}", c["changed_at"].as_str().unwrap_or(""), c["changed_by"].as_str().unwrap_or(""), c["old"], c["new"]);
        }
    }
}
