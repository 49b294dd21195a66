//! `botflow executions list|show`: a chatbot's execution history, filtered and paged
//! (`GET /v1/chatbots/{id}/executions`), and one execution with every step attempt
//! (`GET /v1/executions/{eid}`), over the admin API of a running daemon. The table of
//! attempts is shared with `dlq show`, whose history has the same shape.

use super::api::{
    block_on, call_and_print, cell, duration_cell, print_fields, print_json_lines, rfc3339, seconds_between, time_cell, workflow_cell, Api, ApiArgs,
    Table,
};
use crate::config::Config;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

#[derive(Subcommand, Debug)]
pub enum ExecutionsCmd {
    /// A page of a chatbot's executions, newest first; the next page's cursor goes to
    /// stderr (--all follows every page)
    List(ListArgs),
    /// One execution with every attempt of every step
    Show {
        /// The execution's id
        #[arg(value_parser = crate::cli::id_arg, value_name = "EID")]
        execution: Uuid,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// The chatbot's id
    #[arg(long, value_parser = crate::cli::id_arg)]
    chatbot: Uuid,
    /// Only this workflow's
    #[arg(long, value_parser = crate::cli::id_arg, value_name = "WID")]
    workflow: Option<Uuid>,
    /// queued, running, retrying, waiting, succeeded, failed, dead or cancelled
    #[arg(long)]
    status: Option<String>,
    /// Only this conversation's
    #[arg(long, value_name = "ID")]
    conversation: Option<String>,
    /// Created at or after (RFC 3339, e.g. 2026-11-25T10:00:00Z)
    #[arg(long, value_name = "TIME")]
    since: Option<DateTime<Utc>>,
    /// Created before (RFC 3339)
    #[arg(long, value_name = "TIME")]
    until: Option<DateTime<Utc>>,
    /// Text in the error message, case-insensitive, taken literally
    #[arg(long, value_name = "TEXT")]
    q: Option<String>,
    /// Executions per page, 1 to 500 [default: the API's, 50]
    #[arg(long, value_name = "N")]
    limit: Option<i64>,
    /// Start after the page that printed this cursor
    #[arg(long, conflicts_with = "all")]
    cursor: Option<String>,
    /// Follow every page (the filters still apply)
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    api: ApiArgs,
}

pub fn run(config: Config, cmd: ExecutionsCmd) -> anyhow::Result<()> {
    match cmd {
        ExecutionsCmd::List(a) => list(&config, a),
        ExecutionsCmd::Show { execution, api } => {
            call_and_print(&config, &api, Method::GET, &format!("/v1/executions/{execution}"), None, |e| {
                show(e);
                Ok(())
            })
        }
    }
}

fn list(config: &Config, a: ListArgs) -> anyhow::Result<()> {
    let client = Api::new(config, &a.api)?;
    let path = format!("/v1/chatbots/{}/executions", a.chatbot);
    let params = [
        ("workflow_id", a.workflow.map(|w| w.to_string())),
        ("status", a.status),
        ("conversation_id", a.conversation),
        ("since", rfc3339(a.since)),
        ("until", rfc3339(a.until)),
        ("q", a.q),
        ("limit", a.limit.map(|l| l.to_string())),
    ];
    let page = block_on(client.list(&path, &params, a.cursor.as_deref(), a.all))?;
    let items = &page.items;
    if a.api.json {
        print_json_lines(items);
    } else {
        let mut t = Table::new(&["ID", "CREATED", "STATUS", "ATTEMPT", "DURATION", "WORKFLOW", "EVENT", "CONVERSATION", "ERROR"])
            .right(&[3, 4]);
        for e in items {
            t.row(vec![
                cell(&e["id"]),
                time_cell(&e["created_at"]),
                cell(&e["status"]),
                cell(&e["attempt"]),
                duration_cell(e["duration_ms"].as_f64().map(|ms| ms / 1000.0)),
                workflow_cell(e, false),
                cell(&e["event_id"]),
                cell(&e["conversation_id"]),
                cell(&e["error"]),
            ]);
        }
        t.print_or("no executions");
    }
    page.print_more();
    Ok(())
}

fn show(e: &Value) {
    print_fields(&[
        ("execution", cell(&e["id"])),
        ("status", format!("{} (attempt {})", cell(&e["status"]), cell(&e["attempt"]))),
        ("chatbot", cell(&e["chatbot_id"])),
        ("workflow", workflow_cell(e, true)),
        ("event", format!("{} ({}), conversation {}", cell(&e["event_id"]), cell(&e["event_type"]), cell(&e["conversation_id"]))),
        ("created", time_cell(&e["created_at"])),
        ("started", time_cell(&e["started_at"])),
        ("finished", time_cell(&e["finished_at"])),
        ("duration", duration_cell(e["duration_ms"].as_f64().map(|ms| ms / 1000.0))),
        ("error", cell(&e["error"])),
        ("dead letter", cell(&e["dead_letter_id"])),
        ("data", cell(&e["event"]["data"])),
    ]);
    let steps = e["steps"].as_array().map(Vec::as_slice).unwrap_or_default();
    println!();
    attempts_table(steps).print_or("no step has run yet");
}

/// One line per attempt of a step: the steps of an execution, the history of a dead letter.
pub(super) fn attempts_table(attempts: &[Value]) -> Table {
    let mut t = Table::new(&["STEP", "ACTION", "ATTEMPT", "STATUS", "STARTED", "DURATION", "ERROR"]).right(&[2, 5]);
    for s in attempts {
        t.row(vec![
            format!("{} {}", cell(&s["step_index"]), cell(&s["step_id"])),
            cell(&s["action"]),
            cell(&s["attempt"]),
            cell(&s["status"]),
            time_cell(&s["started_at"]),
            duration_cell(seconds_between(&s["started_at"], &s["finished_at"])),
            cell(&s["error"]),
        ]);
    }
    t
}
