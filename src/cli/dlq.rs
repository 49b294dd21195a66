//! `botflow dlq`: dead letters (executions that used up their attempts) over the admin
//! API of a running daemon: list a chatbot's (operators: every account's), show one,
//! replay or discard one, or every open letter of a chatbot that a filter matches. The
//! API records which key replayed or discarded a letter.

use super::api::{block_on, call_and_print, cell, print_fields, print_json_lines, rfc3339, time_cell, workflow_cell, Api, ApiArgs, Table};
use super::executions::attempts_table;
use crate::config::Config;
use anyhow::bail;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Subcommand, Debug)]
pub enum DlqCmd {
    /// List dead letters, newest first: a chatbot's, or without --chatbot every
    /// account's (operator key); the next page's cursor goes to stderr
    List(ListArgs),
    /// One dead letter: its event, last error and every attempt
    Show {
        /// The dead letter's id
        #[arg(value_parser = crate::cli::id_arg)]
        id: Uuid,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Run a dead execution once more from the step that failed; prints its execution
    /// id. With --chatbot ID --matching: every open letter the filters match; prints
    /// how many
    Replay(ActArgs),
    /// Give up on a dead execution (the letter is kept, marked with the key that
    /// discarded it). With --chatbot ID --matching: every open letter the filters
    /// match; prints how many
    Discard(ActArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this chatbot's dead letters
    #[arg(long, value_parser = crate::cli::id_arg)]
    chatbot: Option<Uuid>,
    /// Only this workflow's dead letters
    #[arg(long, value_parser = crate::cli::id_arg, value_name = "WID")]
    workflow: Option<Uuid>,
    /// open, replayed, discarded or all [default: open]
    #[arg(long)]
    state: Option<String>,
    /// Died at or after (RFC 3339)
    #[arg(long, value_name = "TIME")]
    since: Option<DateTime<Utc>>,
    /// Died before (RFC 3339)
    #[arg(long, value_name = "TIME")]
    until: Option<DateTime<Utc>>,
    /// Text in the last error, case-insensitive, taken literally
    #[arg(long, value_name = "TEXT")]
    q: Option<String>,
    #[command(flatten)]
    page: super::lifecycle::PageArgs,
    /// Gone: see --state and --all-pages
    #[arg(long, hide = true)]
    all: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args, Debug)]
pub struct ActArgs {
    /// The dead letter
    #[arg(value_parser = crate::cli::id_arg, required_unless_present = "matching", conflicts_with = "matching")]
    id: Option<Uuid>,
    /// Act on every open letter of --chatbot that the filters match (none: all of them)
    #[arg(long, requires = "chatbot")]
    matching: bool,
    /// Only this chatbot's dead letters
    #[arg(long, value_parser = crate::cli::id_arg, requires = "matching")]
    chatbot: Option<Uuid>,
    /// Only this workflow's dead letters
    #[arg(long, value_parser = crate::cli::id_arg, value_name = "WID", requires = "matching")]
    workflow: Option<Uuid>,
    /// Text in the last error, case-insensitive, taken literally
    #[arg(long, value_name = "TEXT", requires = "matching")]
    q: Option<String>,
    /// Died at or after (RFC 3339)
    #[arg(long, value_name = "TIME", requires = "matching")]
    since: Option<DateTime<Utc>>,
    /// Died before (RFC 3339)
    #[arg(long, value_name = "TIME", requires = "matching")]
    until: Option<DateTime<Utc>>,
    /// Act on at most this many, 1 to 100000 [default: the API's, 10000]
    #[arg(long, value_name = "N", requires = "matching")]
    max: Option<i64>,
    /// Letters per request, 1 to 10000: progress is shown between requests
    #[arg(long, value_name = "N", requires = "matching", default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    batch: i64,
    #[command(flatten)]
    api: ApiArgs,
}

pub fn run(config: Config, cmd: DlqCmd) -> anyhow::Result<()> {
    match cmd {
        DlqCmd::List(a) => list(&config, a),
        DlqCmd::Show { id, api } => call_and_print(&config, &api, Method::GET, &format!("/v1/dead-letters/{id}"), None, |dl| {
            show(dl);
            Ok(())
        }),
        DlqCmd::Replay(a) => act(&config, a, true),
        DlqCmd::Discard(a) => act(&config, a, false),
    }
}

fn list(config: &Config, a: ListArgs) -> anyhow::Result<()> {
    if a.all {
        bail!("--all is gone: --state all lists replayed and discarded letters too, --all-pages follows every page");
    }
    let client = Api::new(config, &a.api)?;
    let path = match a.chatbot {
        Some(c) => format!("/v1/chatbots/{c}/dead-letters"),
        None => "/v1/dead-letters".to_string(),
    };
    let params = [
        ("workflow_id", a.workflow.map(|w| w.to_string())),
        ("state", a.state),
        ("since", rfc3339(a.since)),
        ("until", rfc3339(a.until)),
        ("q", a.q),
        ("limit", a.page.limit.map(|l| l.to_string())),
    ];
    let page = block_on(client.list(&path, &params, a.page.cursor.as_deref(), a.page.all_pages))?;
    let items = &page.items;
    if a.api.json {
        print_json_lines(items);
    } else {
        let mut t = Table::new(&["ID", "DIED", "STATE", "CHATBOT", "WORKFLOW", "ATTEMPTS", "LAST ERROR"]).right(&[5]);
        for dl in items {
            t.row(vec![
                cell(&dl["id"]),
                time_cell(&dl["created_at"]),
                state(dl).into(),
                cell(&dl["chatbot_id"]),
                workflow_cell(dl, false),
                cell(&dl["attempts"]),
                cell(&dl["last_error"]),
            ]);
        }
        t.print_or("no dead letters");
    }
    page.print_more();
    Ok(())
}

/// The API gives the times of a replay or discard; the state follows from them.
fn state(dl: &Value) -> &'static str {
    if !dl["replayed_at"].is_null() {
        "replayed"
    } else if !dl["discarded_at"].is_null() {
        "discarded"
    } else {
        "open"
    }
}

fn show(dl: &Value) {
    let state = match state(dl) {
        "replayed" => format!("replayed {} by {}", time_cell(&dl["replayed_at"]), cell(&dl["replayed_by"])),
        "discarded" => format!("discarded {} by {}", time_cell(&dl["discarded_at"]), cell(&dl["discarded_by"])),
        open => open.to_string(),
    };
    print_fields(&[
        ("dead letter", cell(&dl["id"])),
        ("state", state),
        ("execution", cell(&dl["execution_id"])),
        ("chatbot", cell(&dl["chatbot_id"])),
        ("workflow", workflow_cell(dl, true)),
        ("died", format!("{} after attempt {}", time_cell(&dl["created_at"]), cell(&dl["attempts"]))),
        ("last error", cell(&dl["last_error"])),
        ("event", cell(&dl["event"])),
    ]);
    println!();
    attempts_table(dl["history"].as_array().map(Vec::as_slice).unwrap_or_default()).print_or("no attempts recorded");
}

fn act(config: &Config, a: ActArgs, replaying: bool) -> anyhow::Result<()> {
    let client = Api::new(config, &a.api)?;
    let (verb, done) = if replaying { ("replay", "replayed") } else { ("discard", "discarded") };
    match (a.id, a.chatbot) {
        (Some(id), _) => {
            let dl = if replaying {
                block_on(client.call(Method::POST, &format!("/v1/dead-letters/{id}/replay"), None))?
            } else {
                block_on(client.call(Method::DELETE, &format!("/v1/dead-letters/{id}"), None))?
            };
            if replaying {
                let attempt = dl["attempts"].as_i64().map_or("-".into(), |n| (n + 1).to_string());
                eprintln!("execution {} runs again (attempt {attempt})", cell(&dl["execution_id"]));
            } else {
                eprintln!("dead letter {id} discarded");
            }
            if a.api.json {
                println!("{dl}");
            } else if replaying {
                println!("{}", cell(&dl["execution_id"]));
            }
        }
        (None, Some(chatbot)) => {
            // In batches, so a long run shows its progress. Only letters that died before
            // the command started: a replayed execution that dies again meanwhile is a
            // new letter, not one to replay again in the same run.
            let until = a.until.map_or(Utc::now(), |u| u.min(Utc::now()));
            let mut body = json!({ "until": rfc3339(Some(until)) });
            for (k, v) in [
                ("workflow_id", a.workflow.map(|w| json!(w))),
                ("q", a.q.map(|q| json!(q))),
                ("since", rfc3339(a.since).map(|t| json!(t))),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            let max = a.max.unwrap_or(10_000);
            if !(1..=100_000).contains(&max) {
                bail!("--max must be 1 to 100000");
            }
            let path = format!("/v1/chatbots/{chatbot}/dead-letters/{verb}");
            let progress = super::progress::counter(max as u64, done);
            let mut count = 0;
            while count < max {
                let take = a.batch.min(max - count);
                body["max"] = json!(take);
                let v = block_on(client.call(Method::POST, &path, Some(&body)))?;
                let n = v["count"].as_i64().unwrap_or(0);
                count += n;
                progress.set_position(count as u64);
                if n < take {
                    break;
                }
            }
            progress.finish_and_clear();
            let letters = if count == 1 { "dead letter" } else { "dead letters" };
            eprintln!("{done} {count} {letters} of chatbot {chatbot}");
            if a.api.json {
                println!("{}", json!({ "count": count }));
            } else {
                println!("{count}");
            }
        }
        // clap requires an id or --matching, and --matching requires --chatbot.
        (None, None) => bail!("give a dead letter id, or --chatbot ID --matching"),
    }
    Ok(())
}
