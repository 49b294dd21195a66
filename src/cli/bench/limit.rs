//! `botflow bench --scenario limit`: each figure of the daemon next to the limit it is
//! measured against, on the same machine in the same run. Absolute figures do not
//! travel between machines or days (PostgreSQL's own write rate here has varied 4×);
//! ratios to a limit measured minutes apart do.
//!
//! - **parse-and-ack**: a server that only parses each NDJSON event (a whole
//!   `serde_json::Value`) and writes its ack, on the same socket type, over one connection: the
//!   limit of the no-match path (the daemon: one connection, one chatbot with
//!   `--workflows` keyword workflows none of which matches);
//! - **batched write**: execution rows inserted 500 to a statement and then updated to
//!   their outcome, over two connections, into a copy of the `executions` table (its
//!   columns, checks and indexes) on the same PostgreSQL, fsync on: the limit of every
//!   executions figure (the daemon: executions committed and completed over
//!   `--chatbots` chatbots, over one hot chatbot, and the three-step durable workflow).
//!
//! Limit and daemon runs alternate, three rounds; each ratio is the median of its
//! three. Then the ack latency is measured at half the executions capacity just found.

use super::{blast, event_line, paced, run_executions, run_on, Target};
use crate::store::Store;
use serde_json::json;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// Rows a statement of the batched-write limit carries.
const LIMIT_BATCH: usize = 500;
/// Rounds of limit and daemon runs; each ratio is their median.
const ROUNDS: usize = 3;

/// The chatbots the limit scenario drives.
pub struct Bots {
    /// One chatbot with keyword workflows none of the events matches.
    pub nomatch: Uuid,
    /// `--chatbots` chatbots, each with a one-step workflow (a delay of zero).
    pub exec: Vec<Uuid>,
    /// `--chatbots` chatbots with the three-step durable workflow.
    pub durable: Vec<Uuid>,
}

/// One measured pair, per round.
#[derive(Default)]
struct Pair {
    limit: Vec<f64>,
    daemon: Vec<f64>,
}

impl Pair {
    fn ratios(&self) -> Vec<f64> {
        self.daemon.iter().zip(&self.limit).map(|(d, l)| if *l > 0.0 { d / l } else { 0.0 }).collect()
    }
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub async fn bench(
    store: &Store,
    target: &Target,
    clients: &tokio::runtime::Runtime,
    args: &super::BenchArgs,
    bots: Bots,
) -> anyhow::Result<serde_json::Value> {
    // The parse-and-ack server has a thread of its own, as the daemon has its workers.
    let echo_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let scratch = std::env::temp_dir().join(format!("botflow-bench-echo-{}", std::process::id()));
    let result = measure(store, target, clients, args, bots, &echo_rt, &scratch).await;
    // A runtime may not be dropped inside another: let it go in the background.
    echo_rt.shutdown_background();
    let _ = std::fs::remove_file(&scratch);
    result
}

async fn measure(
    store: &Store,
    target: &Target,
    clients: &tokio::runtime::Runtime,
    args: &super::BenchArgs,
    bots: Bots,
    echo_rt: &tokio::runtime::Runtime,
    scratch: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let echo = start_echo(echo_rt, target, scratch).await?;
    let (mut nomatch, mut committed, mut completed, mut hot, mut durable) =
        (Pair::default(), Pair::default(), Pair::default(), Pair::default(), Pair::default());
    eprintln!("limit: {ROUNDS} rounds, each a limit run then the daemon's, alternating");
    for round in 0..ROUNDS {
        // Event ids never repeat across rounds: a repeated id would be a duplicate.
        let offset = 5_000_000_000_000 + round as u64 * 100_000_000_000;

        // The same events, over one connection, to the limit server and to the daemon.
        let no_match = |to: &Target| {
            let (t, n, bot) = (to.clone(), args.nomatch_events, bots.nomatch);
            run_on(clients, async move {
                blast(&t, 1, n, &[bot], 0, move |i, bot, buf| {
                    event_line(buf, offset + i, bot, "message.received", r#"{"text":"hello there, how are you today?"}"#);
                })
                .await
            })
        };
        nomatch.limit.push(no_match(&echo).await?.per_second());
        nomatch.daemon.push(no_match(target).await?.per_second());

        let write_limit = batched_write(store, args.execution_events).await?;
        for pair in [&mut committed, &mut completed, &mut hot, &mut durable] {
            pair.limit.push(write_limit);
        }
        // Events of `kind` with this round's ids, to `bots`, `commands` commands back each.
        let run = |events: u64, bots: Vec<Uuid>, offset: u64, kind: &'static str, commands: u64| {
            let conns = args.connections;
            async move {
                run_executions(store, target, clients, conns, events, &bots, commands, move |i, bot, buf| {
                    event_line(buf, offset + i, bot, kind, "{}")
                })
                .await
            }
        };
        let r = run(args.execution_events, bots.exec.clone(), offset, "x.bench", 0).await?;
        committed.daemon.push(r.committed_per_second());
        completed.daemon.push(r.completed_per_second());
        let one = vec![bots.exec[round % bots.exec.len()]];
        hot.daemon.push(run(args.execution_events, one, offset + 50_000_000_000, "x.bench", 0).await?.completed_per_second());
        durable.daemon.push(run(args.durable_events, bots.durable.clone(), offset, "x.durable", 2).await?.completed_per_second());
        eprintln!(
            "  round {}: parse-and-ack {:.0}/s, daemon no-match {:.0}/s; batched write {:.0} rows/s, daemon {:.0} committed/s, \
             {:.0} completed/s, hot chatbot {:.0}/s, durable {:.0}/s",
            round + 1,
            nomatch.limit[round],
            nomatch.daemon[round],
            write_limit,
            committed.daemon[round],
            completed.daemon[round],
            hot.daemon[round],
            durable.daemon[round]
        );
    }
    // The latency run offers half of the capacity just measured.
    let capacity = median(completed.daemon.clone());
    let rate = ((capacity / 2.0) as u64).max(100);
    let (t, c, seconds) = (target.clone(), args.connections, args.seconds);
    let exec = bots.exec.clone();
    let h = run_on(clients, async move { paced(&t, c, rate, seconds, exec, 1_000_000_000_000).await }).await?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;

    let rows = [
        ("no-match events/s, 1 connection", "parse-and-ack", &nomatch, 0.6),
        ("executions committed/s", "batched write", &committed, 0.6),
        ("executions completed/s", "batched write", &completed, 0.6),
        ("one hot chatbot, completed/s", "batched write", &hot, 0.5),
        ("durable 3-step executions/s", "batched write", &durable, 0.25),
    ];
    eprintln!();
    eprintln!("{:<34} {:>14} {:>14} {:>8} {:>6}  ratios of the rounds", "measurement", "limit", "daemon", "ratio", "goal");
    let mut report = serde_json::Map::new();
    for (name, limit_name, pair, goal) in rows {
        let ratio = median(pair.ratios());
        eprintln!(
            "{:<34} {:>14} {:>14.0} {:>8.2} {:>6.2}  {}",
            name,
            format!("{:.0} ({limit_name})", median(pair.limit.clone())),
            median(pair.daemon.clone()),
            ratio,
            goal,
            pair.ratios().iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" · ")
        );
        report.insert(
            name.to_string(),
            json!({"limit": median(pair.limit.clone()).round(), "daemon": median(pair.daemon.clone()).round(), "ratio": ratio, "goal": goal}),
        );
    }
    eprintln!(
        "ack latency at {rate} events/s (half the capacity measured): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (goal: p50 ≤ 3 ms, p99 ≤ 10 ms)",
        ms(0.5),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
    report.insert("latency".into(), json!({"rate": rate, "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": h.max() as f64 / 1000.0}));
    Ok(serde_json::Value::Object(report))
}

/// PostgreSQL's own rate for what the journal does per execution: an insert at accept
/// and an update at completion, `LIMIT_BATCH` rows a statement, over two connections,
/// into a copy of `executions`. Answers rows (executions) per second.
async fn batched_write(store: &Store, rows: u64) -> anyhow::Result<f64> {
    let setup = store.pool().get().await?;
    setup
        .batch_execute("DROP TABLE IF EXISTS bench_limit; CREATE TABLE bench_limit (LIKE executions INCLUDING ALL)")
        .await?;
    let (chatbot, workflow) = (Uuid::now_v7(), Uuid::now_v7());
    let per = rows / 2;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for half in 0..2u64 {
        let client = store.dedicated().await?;
        tasks.push(tokio::spawn(async move {
            let insert = client
                .prepare(
                    "INSERT INTO bench_limit (id, chatbot_id, workflow_id, workflow_version, event_id, event_type,
                                              conversation_id, event, status, lease_owner, lease_epoch)
                     SELECT u.id, $2, $3, 1, u.event_id, 'x.bench', 'c-1', $5::jsonb, 'queued', $4, 1
                     FROM unnest($1::uuid[], $6::text[]) AS u(id, event_id)",
                )
                .await?;
            let update = client
                .prepare(
                    "UPDATE bench_limit SET status = 'succeeded', started_at = now(), finished_at = now(), duration_ms = 1,
                                            step_index = 1, lease_owner = NULL
                     WHERE id = ANY($1)",
                )
                .await?;
            let doc = json!({"id": "e1", "type": "x.bench", "conversation_id": "c-1", "data": {}});
            let mut done = 0u64;
            while done < per {
                let n = (per - done).min(LIMIT_BATCH as u64);
                let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
                let events: Vec<String> = (0..n).map(|k| format!("e{half}-{}", done + k)).collect();
                client.execute(&insert, &[&ids, &chatbot, &workflow, &Uuid::nil(), &doc, &events]).await?;
                client.execute(&update, &[&ids]).await?;
                done += n;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = (per * 2) as f64 / started.elapsed().as_secs_f64();
    setup.batch_execute("DROP TABLE bench_limit").await?;
    Ok(rate)
}

/// The parse-and-ack server on the daemon's socket type (a Unix socket beside it, or
/// TCP on loopback): a hello gets a welcome, each event line is parsed and acked.
async fn start_echo(rt: &tokio::runtime::Runtime, daemon: &Target, unix_path: &std::path::Path) -> anyhow::Result<Target> {
    let mut target = daemon.clone();
    target.tls = None;
    if daemon.tcp.is_some() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        target.tcp = Some(listener.local_addr()?);
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            loop {
                let (s, _) = listener.accept().await?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                tokio::spawn(echo(r, w));
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        });
    } else {
        let _ = std::fs::remove_file(unix_path);
        let listener = std::os::unix::net::UnixListener::bind(unix_path)?;
        listener.set_nonblocking(true)?;
        target.unix = Some(unix_path.to_path_buf());
        rt.spawn(async move {
            let listener = tokio::net::UnixListener::from_std(listener)?;
            loop {
                let (s, _) = listener.accept().await?;
                let (r, w) = s.into_split();
                tokio::spawn(echo(r, w));
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        });
    }
    Ok(target)
}

async fn echo(mut r: impl tokio::io::AsyncRead + Unpin, mut w: impl tokio::io::AsyncWrite + Unpin) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    let mut out = Vec::with_capacity(256 * 1024);
    let mut welcomed = false;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        carry.extend_from_slice(&buf[..n]);
        let mut done = 0;
        while let Some(i) = memchr::memchr(b'\n', &carry[done..]) {
            let line = &carry[done..done + i];
            done += i + 1;
            if !welcomed {
                welcomed = true;
                out.extend_from_slice(b"{\"op\":\"welcome\",\"version\":1,\"max_in_flight\":1024,\"max_frame_bytes\":1048576}\n");
                continue;
            }
            // A whole parse of the event, as any server of the protocol makes.
            if let Ok(event) = serde_json::from_slice::<serde_json::Value>(line) {
                if let Some(id) = event.get("id").and_then(serde_json::Value::as_str) {
                    out.extend_from_slice(br#"{"op":"ack","id":"#);
                    serde_json::to_writer(&mut out, id)?;
                    out.extend_from_slice(b",\"executions\":[],\"duplicate\":false}\n");
                }
            }
        }
        carry.drain(..done);
        if !out.is_empty() {
            w.write_all(&out).await?;
            out.clear();
        }
    }
}
