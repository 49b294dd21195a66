//! `botflow bench --scenario history`: the admin API's read side at scale. One
//! chatbot with ten workflows gets 1,000,000 finished executions spread over the last
//! 24 hours, 20 per conversation (written straight into PostgreSQL, with the per-minute rollups the journal
//! would have kept), then the API is asked over HTTP, as a dashboard would:
//!
//! - a page of history under each filter (none, workflow, status, conversation, a
//!   one-hour window, text in errors) and a deep page reached through cursors;
//! - analytics over the 24 hours (method auto, which reads the rollups), and once with
//!   `method=exact` (a scan of every execution) for comparison.
//!
//! Each figure is the p50/p95 of many requests, measured at the client.

use crate::app::RunningApp;
use crate::store::{accounts, workflows};
use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

const WORKFLOWS: usize = 10;
/// Executions per conversation.
const PER_CONVERSATION: i64 = 20;
const CHUNK: i64 = 100_000;

pub async fn bench(app: &RunningApp, executions: i64, requests: usize) -> anyhow::Result<Value> {
    let conversations = (executions / PER_CONVERSATION).max(1);
    let store = &app.store;
    let admin = app.admin_addr.context("the admin API is not listening")?;
    let base = format!("http://{admin}");
    let account = accounts::create_account(store, "bench-history").await?;
    let key = accounts::create_key(store, account, accounts::Role::Admin).await?;
    let bot = accounts::create_chatbot(store, account, "history").await?;
    // Workflows that never match anything the bench sends (it sends nothing).
    let specs: Vec<_> = (0..WORKFLOWS)
        .map(|w| {
            serde_json::from_value(json!({
                "name": format!("workflow {w}"),
                "trigger": {"event": "x.never"},
                "steps": [{"id": "d", "action": "delay", "duration": "0s"}]
            }))
        })
        .collect::<Result<_, _>>()?;
    let wfs: Vec<Uuid> = workflows::apply(store, bot, &specs).await?.iter().map(|a| a.id()).collect();

    eprintln!("history: writing {executions} executions of one chatbot over 24 hours ...");
    let started = Instant::now();
    // Every execution is created in [end − 24 h, end): the analytics window.
    let end = chrono::Utc::now();
    let client = store.pool().get().await?;
    let mut done = 0i64;
    while done < executions {
        let n = CHUNK.min(executions - done);
        // Outcomes: 92% succeeded, 5% failed, 3% dead; durations log-uniform over
        // 1 ms .. 3 s; 20 executions per conversation; errors name the failing hook.
        client
            .execute(
                "INSERT INTO executions (id, chatbot_id, workflow_id, workflow_version, event_id, event_type,
                                         conversation_id, event, status, attempt, created_at, started_at,
                                         finished_at, duration_ms, error, run_after)
                 SELECT gen_random_uuid(), $1, ($2::uuid[])[1 + i % $3], 1, 'evt-' || i, 'message.received',
                        'conv-' || (i % $4), '{\"type\": \"message.received\", \"data\": {\"text\": \"hello\"}}',
                        s, CASE WHEN s = 'succeeded' THEN 1 ELSE 5 END, t, t, t + d * interval '1 ms', d,
                        CASE WHEN s <> 'succeeded' THEN 'webhook https://hooks.example/' || ((i / 100) % 50)
                                                        || ' answered 500 Internal Server Error' END,
                        t
                 FROM (SELECT i,
                              CASE WHEN i % 100 < 92 THEN 'succeeded' WHEN i % 100 < 97 THEN 'failed' ELSE 'dead' END AS s,
                              $7::timestamptz - interval '24 hours' + random() * interval '24 hours' AS t,
                              exp(random() * ln(3000.0)) AS d
                       FROM generate_series($5::int8, $6::int8) AS i) g",
                &[&bot, &wfs, &(WORKFLOWS as i64), &conversations, &done, &(done + n - 1), &end],
            )
            .await?;
        done += n;
        eprint!("\r  {done} written");
    }
    eprintln!();
    // The rollups, as the journal keeps them for executions it writes.
    client
        .batch_execute(&format!(
            "INSERT INTO execution_stats (chatbot_id, workflow_id, minute, created, succeeded, failed, dead)
             SELECT chatbot_id, workflow_id, date_trunc('minute', created_at), count(*),
                    count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'),
                    count(*) FILTER (WHERE status = 'dead')
             FROM executions WHERE chatbot_id = '{bot}' GROUP BY 1, 2, 3;
             INSERT INTO execution_durations (chatbot_id, workflow_id, minute, bucket, count)
             SELECT chatbot_id, workflow_id, date_trunc('minute', created_at),
                    CASE WHEN duration_ms < 1 THEN 0
                         ELSE least(191, floor(8 * log(duration_ms) / log(2.0::float8))::int + 1) END, count(*)
             FROM executions WHERE chatbot_id = '{bot}' GROUP BY 1, 2, 3, 4;"
        ))
        .await?;
    // One statement each: VACUUM cannot run inside the implicit transaction of a batch.
    for table in ["executions", "execution_stats", "execution_durations"] {
        client.batch_execute(&format!("VACUUM ANALYZE {table}")).await?;
    }
    drop(client);
    eprintln!("  written with rollups in {:.0} s", started.elapsed().as_secs_f64());

    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{base}{path}");
        let key = key.clone();
        async move {
            let t = Instant::now();
            let resp = http.get(&url).bearer_auth(&key).send().await?;
            let status = resp.status();
            let body: Value = resp.json().await?;
            anyhow::ensure!(status.is_success(), "{url}: {status} {body}");
            Ok::<_, anyhow::Error>((t.elapsed(), body))
        }
    };
    let pages = format!("/v1/chatbots/{bot}/executions");
    let hour = |i: usize| {
        let until = chrono::Utc::now() - chrono::TimeDelta::minutes(30 + (i as i64 * 37) % 1380);
        let since = until - chrono::TimeDelta::hours(1);
        format!("since={}&until={}", since.format("%Y-%m-%dT%H:%M:%SZ"), until.format("%Y-%m-%dT%H:%M:%SZ"))
    };
    type Query<'a> = Box<dyn Fn(usize) -> String + 'a>;
    let filters: Vec<(&str, Query)> = vec![
        ("none", Box::new(|_| String::new())),
        ("workflow", Box::new(|i| format!("workflow_id={}", wfs[i % wfs.len()]))),
        ("status", Box::new(|i| format!("status={}", ["failed", "dead", "succeeded"][i % 3]))),
        ("conversation", Box::new(|i| format!("conversation_id=conv-{}", (i as i64 * 7919) % conversations))),
        ("one hour", Box::new(hour)),
        ("error text", Box::new(|i| format!("q=hooks.example/{}%20answered", i % 50))),
    ];
    let mut report = serde_json::Map::new();
    let mut all = Histogram::<u64>::new(3)?;
    // Warm the caches the way a running daemon's would be.
    for (_, f) in &filters {
        get(format!("{pages}?limit=50&{}", f(0))).await?;
    }
    for (name, f) in &filters {
        let mut h = Histogram::<u64>::new(3)?;
        for i in 0..requests {
            let (took, body) = get(format!("{pages}?limit=50&{}", f(i + 1))).await?;
            anyhow::ensure!(!body["items"].as_array().map(Vec::is_empty).unwrap_or(true), "{name}: an empty page");
            h.record(took.as_micros() as u64)?;
            all.record(took.as_micros() as u64)?;
        }
        report_line(&mut report, &format!("page, filter {name}"), &h);
    }
    // Deep pages: ten cursor hops under a filter, each hop one request.
    let mut h = Histogram::<u64>::new(3)?;
    for i in 0..(requests / 10).max(1) {
        let mut cursor: Option<String> = None;
        for _ in 0..10 {
            let mut path = format!("{pages}?limit=50&workflow_id={}", wfs[i % wfs.len()]);
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (took, body) = get(path).await?;
            h.record(took.as_micros() as u64)?;
            all.record(took.as_micros() as u64)?;
            cursor = body["next_cursor"].as_str().map(str::to_string);
        }
    }
    report_line(&mut report, "page through cursors", &h);
    report_line(&mut report, "every filtered page", &all);

    // The 24 hours that hold every execution (not "the last 24 hours", which slide
    // past the oldest ones while the bench runs).
    let since = end - chrono::TimeDelta::hours(24);
    let window = format!(
        "since={}&until={}",
        since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true).replace('+', "%2B"),
        end.to_rfc3339_opts(chrono::SecondsFormat::Micros, true).replace('+', "%2B")
    );
    let analytics = format!("/v1/chatbots/{bot}/analytics?{window}");
    let mut h = Histogram::<u64>::new(3)?;
    let (_, body) = get(analytics.clone()).await?;
    let total: i64 = body["workflows"].as_array().map(|w| w.iter().filter_map(|x| x["count"].as_i64()).sum()).unwrap_or(0);
    anyhow::ensure!(total == executions, "analytics counted {total} executions, expected {executions}");
    for _ in 0..requests {
        let (took, _) = get(analytics.clone()).await?;
        h.record(took.as_micros() as u64)?;
    }
    report_line(&mut report, "analytics, 24 hours (rollups)", &h);
    let mut h = Histogram::<u64>::new(3)?;
    for _ in 0..3 {
        let (took, _) = get(format!("{analytics}&method=exact")).await?;
        h.record(took.as_micros() as u64)?;
    }
    report_line(&mut report, "analytics, 24 hours (exact scan)", &h);
    Ok(json!({ "history": report, "executions": executions }))
}

fn report_line(report: &mut serde_json::Map<String, Value>, name: &str, h: &Histogram<u64>) {
    let ms = |q: f64| Duration::from_micros(h.value_at_quantile(q)).as_secs_f64() * 1000.0;
    eprintln!("  {name:<36} p50 {:>7.1} ms   p95 {:>7.1} ms   ({} requests)", ms(0.5), ms(0.95), h.len());
    report.insert(
        name.to_string(),
        json!({"p50_ms": (ms(0.5) * 10.0).round() / 10.0, "p95_ms": (ms(0.95) * 10.0).round() / 10.0, "requests": h.len()}),
    );
}
