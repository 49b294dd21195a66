//! `botflow analytics`: per-workflow figures of a chatbot over a time window (count,
//! outcome counts, success rate, p50/p95 duration), from `GET
//! /v1/chatbots/{id}/analytics` of a running daemon.

use super::api::{block_on, cell, duration_cell, rfc3339, time_cell, with_query, Api, ApiArgs, Table};
use crate::config::Config;
use chrono::{DateTime, Utc};
use clap::Args;
use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

#[derive(Args, Debug)]
pub struct AnalyticsArgs {
    /// The chatbot's id
    #[arg(long, value_parser = crate::cli::id_arg)]
    chatbot: Uuid,
    /// Start of the window (RFC 3339) [default: 24 hours before --until]
    #[arg(long, value_name = "TIME")]
    since: Option<DateTime<Utc>>,
    /// End of the window, exclusive (RFC 3339) [default: now]
    #[arg(long, value_name = "TIME")]
    until: Option<DateTime<Utc>>,
    /// auto (exact percentiles for small windows, per-minute histograms for large
    /// ones), exact or rollup [default: auto]
    #[arg(long)]
    method: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

pub fn run(config: Config, a: AnalyticsArgs) -> anyhow::Result<()> {
    let client = Api::new(&config, &a.api)?;
    let path = with_query(
        &format!("/v1/chatbots/{}/analytics", a.chatbot),
        &[("since", rfc3339(a.since)), ("until", rfc3339(a.until)), ("method", a.method)],
    );
    let v = block_on(client.call(Method::GET, &path, None))?;
    if a.api.json {
        println!("{v}");
        return Ok(());
    }
    eprintln!(
        "executions created from {} to {} (UTC); percentiles {}",
        time_cell(&v["since"]),
        time_cell(&v["until"]),
        if v["exact"] == true { "exact" } else { "from per-minute histograms (within 9%)" }
    );
    table(v["workflows"].as_array().map(Vec::as_slice).unwrap_or_default())
        .print_or("no executions in the window");
    Ok(())
}

/// OTHER counts executions not finished yet or cancelled, so the outcome columns add
/// up to COUNT.
fn table(workflows: &[Value]) -> Table {
    let mut t = Table::new(&["WORKFLOW", "COUNT", "SUCCEEDED", "FAILED", "DEAD", "OTHER", "SUCCESS", "P50", "P95"])
        .right(&[1, 2, 3, 4, 5, 6, 7, 8]);
    for w in workflows {
        // A deleted workflow has no name any more: show its id.
        let name = if w["workflow_name"].is_string() { cell(&w["workflow_name"]) } else { cell(&w["workflow_id"]) };
        t.row(vec![
            name,
            cell(&w["count"]),
            cell(&w["succeeded"]),
            cell(&w["failed"]),
            cell(&w["dead"]),
            cell(&w["other"]),
            w["success_rate"].as_f64().map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
            duration_cell(w["p50_seconds"].as_f64()),
            duration_cell(w["p95_seconds"].as_f64()),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_row_per_workflow_with_rates_in_percent() {
        let t = table(&[
            json!({"workflow_id": "w1", "workflow_name": "refunds", "count": 4, "succeeded": 3, "failed": 0, "dead": 1,
                   "other": 0, "success_rate": 0.75, "p50_seconds": 0.012, "p95_seconds": 2.5}),
            json!({"workflow_id": "0190-gone", "workflow_name": null, "count": 1, "succeeded": 0, "failed": 0, "dead": 0,
                   "other": 1, "success_rate": null, "p50_seconds": null, "p95_seconds": null}),
        ]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("refunds") && lines[1].contains("75.0%") && lines[1].ends_with("12ms  2.50s"), "{text}");
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(cells, ["0190-gone", "1", "0", "0", "0", "1", "-", "-", "-"], "{text}");
    }
}
