//! `botflow bench`: the real pipeline (sockets, actors, trigger index, journal,
//! PostgreSQL) under load from clients in the same process, reporting:
//!
//! - `nomatch`: events/s routed and matched when no workflow is hit (every chatbot has
//!   keyword workflows the events' text does not contain, so each event is parsed and
//!   run through the keyword automaton);
//! - `executions`: executions/s committed (acked), each event triggering one workflow
//!   whose only step has no external effect (a delay of zero), and executions/s
//!   completed (final status and step row committed);
//! - `durable`: executions/s completed of a three-step workflow (reply, delay 0,
//!   reply), every step's outcome committed, the clients subscribed and acking every
//!   command;
//! - `scale`: events/s with no match over one chatbot and over 10,000 (each with its
//!   own supervisor, limiters and metrics), and the memory one idle supervisor takes;
//! - `latency`: ack latency p50/p99/max at a fixed offered rate of events that each
//!   create an execution;
//! - `history` (`history.rs`): the admin API's history pages and analytics over
//!   1,000,000 executions of one chatbot;
//! - `limit` (`limit.rs`): the figures above as ratios to limits measured in the same
//!   run (a parse-and-ack server, PostgreSQL's batched write), alternating, medians;
//! - `prune` (`prune.rs`): the ingest rate and ack latency at half capacity while the
//!   pruner deletes 1,000,000 expired executions, as ratios to the same without.
//!
//! The daemon runs on the actix system of the main thread with its usual threads; the
//! clients run on a separate tokio runtime. With `database.url` empty a private
//! PostgreSQL is started under a temporary directory with default durability (fsync
//! on), and removed afterwards.

mod history;
mod limit;
mod prune;

use crate::app::App;
use crate::cli::database::Database;
use crate::config::Config;
use crate::store::{accounts, workflows, Store};
use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Which measurements to run: all (nomatch, executions, durable, latency), or one of
    /// them, or scale (the cost of limits and metrics with 1 and 10,000 chatbots), or
    /// history (admin API pages and analytics over 1,000,000 executions), or limit (each
    /// figure as a ratio to a limit measured in the same run: parse-and-ack on the same
    /// socket, PostgreSQL's batched write; three alternating rounds, medians; then the
    /// ack latency at half the capacity found), or prune (ingest at half capacity while
    /// the pruner deletes --prune-executions expired executions, against without; three
    /// rounds, medians)
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// Client connections
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Chatbots the events are spread over
    #[arg(long, default_value_t = 4)]
    pub chatbots: usize,
    /// Keyword workflows per chatbot in the no-match run
    #[arg(long, default_value_t = 100)]
    pub workflows: usize,
    /// Events in the no-match run
    #[arg(long, default_value_t = 1_000_000)]
    pub nomatch_events: u64,
    /// Events (one execution each) in the executions run
    #[arg(long, default_value_t = 100_000)]
    pub execution_events: u64,
    /// Events in the durable run (three steps each: reply, delay 0, reply)
    #[arg(long, default_value_t = 30_000)]
    pub durable_events: u64,
    /// Chatbots in the scale run (compared with one)
    #[arg(long, default_value_t = 10_000)]
    pub scale_chatbots: usize,
    /// Events in each run of the scale measurement
    #[arg(long, default_value_t = 2_000_000)]
    pub scale_events: u64,
    /// Runs with and without limits and metrics, each (the median is reported)
    #[arg(long, default_value_t = 3)]
    pub scale_repeats: usize,
    /// Offered rate of the latency run, events/s
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Length of the latency run, seconds
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Use TCP instead of the Unix socket
    #[arg(long)]
    pub tcp: bool,
    /// TCP with TLS (the nomatch, executions, durable and latency runs): the listener's
    /// certificate chain (PEM; with --tls-key and --tls-ca)
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The listener's private key (PEM)
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The CA the bench's clients trust (PEM)
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Print the results as one JSON object on stdout
    #[arg(long)]
    pub json: bool,
    /// No rate limiting and no metrics (to measure what they cost)
    #[arg(long)]
    pub bare: bool,
    /// Executions of the one chatbot in the history run
    #[arg(long, default_value_t = 1_000_000)]
    pub history_executions: i64,
    /// Requests per measured query in the history run
    #[arg(long, default_value_t = 100)]
    pub history_requests: usize,
    /// Expired executions pruned in each round of the prune run
    #[arg(long, default_value_t = 1_000_000)]
    pub prune_executions: i64,
}

pub fn run(config: Config, args: BenchArgs) -> anyhow::Result<()> {
    if args.scenario == "scale" {
        return scale(&args);
    }
    run_in_process(config, args)
}

/// The cost of rate limiting and metrics, with one chatbot and with many: each case in
/// a process of its own (a metrics recorder cannot be removed once installed), with
/// and without (`--bare`) both.
fn scale(args: &BenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    eprintln!("botflow bench: scale, {} events per run over {} connections", args.scale_events, args.connections);
    for chatbots in [1, args.scale_chatbots] {
        // Alternating runs with and without, the median of each: this machine is noisy.
        let mut runs: Vec<(bool, f64, f64)> = Vec::new();
        for bare in std::iter::repeat_n([true, false], args.scale_repeats.max(1)).flatten() {
            let mut c = std::process::Command::new(&exe);
            c.args(["bench", "--scenario", "scale-run", "--json"])
                .args(["--connections", &args.connections.to_string()])
                .args(["--scale-chatbots", &chatbots.to_string()])
                .args(["--scale-events", &args.scale_events.to_string()])
                .stderr(std::process::Stdio::inherit());
            if bare {
                c.arg("--bare");
            }
            let out = c.output().context("run a scale measurement")?;
            anyhow::ensure!(out.status.success(), "a scale measurement failed");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("read a scale measurement")?;
            runs.push((bare, v["events_per_second"].as_f64().unwrap_or(0.0), v["idle_supervisor_bytes"].as_f64().unwrap_or(0.0)));
        }
        let median = |bare: bool| {
            let mut v: Vec<f64> = runs.iter().filter(|r| r.0 == bare).map(|r| r.1).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let memory = runs.iter().filter(|r| !r.0).map(|r| r.2).fold(0.0, f64::max);
        let rates = [(0.0, 0.0), (0.0, memory)];
        let (bare, full) = (median(true), median(false));
        let cost = (1.0 - full / bare) * 100.0;
        eprintln!(
            "scale:       {chatbots:>6} chatbot(s): {full:>10.0} events/s with limits and metrics, {bare:>10.0} without: they cost {cost:.1} %"
        );
        rows.push(json!({"chatbots": chatbots, "events_per_second": full.round(), "bare_events_per_second": bare.round(),
                         "limits_and_metrics_cost_percent": (cost * 10.0).round() / 10.0,
                         "idle_supervisor_bytes": rates[1].1.round()}));
    }
    if let Some(last) = rows.last() {
        eprintln!("             {:>10.0} bytes of memory per idle supervisor", last["idle_supervisor_bytes"].as_f64().unwrap_or(0.0));
    }
    if args.json {
        println!("{}", json!({ "scale": rows }));
    }
    Ok(())
}

fn run_in_process(mut config: Config, args: BenchArgs) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("botflow-bench-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&scratch)?;
    let result = (|| {
        if config.database.url.is_empty() {
            config.data_dir = scratch.clone();
        }
        config.ingest.tcp = "127.0.0.1:0".into();
        config.ingest.unix_socket = scratch.join("bench.sock").to_string_lossy().into_owned();
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            config.ingest.tls_cert_file = cert.to_string_lossy().into_owned();
            config.ingest.tls_key_file = key.to_string_lossy().into_owned();
        }
        // Metrics are recorded (as in production) and limits checked on every event,
        // set out of reach: the bench measures the pipeline, not the limiter's refusals.
        // `--bare` turns both off, to measure what they cost.
        config.metrics.listen = if args.bare { String::new() } else { "127.0.0.1:0".into() };
        config.admin.listen = if args.scenario == "history" { "127.0.0.1:0".into() } else { String::new() };
        config.limits.enabled = !args.bare;
        config.limits.events_per_second = 100_000_000;
        config.limits.burst = 100_000_000;
        config.limits.executions_per_second = 100_000_000;
        config.log.level = "warn".into();
        // The daemon's own pruner keeps everything: the prune run prunes when it measures.
        config.retention.executions_days = 0;
        config.retention.dead_letters_days = 0;
        config.retention.acked_commands_days = 0;
        crate::telemetry::init_logging(&config.log.format, &config.log.level);
        let db = Database::open_owned(&config)?;
        let system = actix_rt::System::new();
        let report = system.block_on(async {
            let app = App::start(&config, db.pg.clone()).await?;
            let report = if args.scenario == "history" {
                history::bench(&app, args.history_executions, args.history_requests).await
            } else {
                bench(&app, &config, &args).await
            };
            app.shutdown().await;
            report
        })?;
        drop(db);
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn bench(app: &crate::app::RunningApp, config: &Config, args: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let store = &app.store;
    let account = accounts::create_account(store, "bench").await?;
    let key = accounts::create_key(store, account, accounts::Role::Ingest).await?;
    let mut nomatch_bots = Vec::new();
    let mut exec_bots = Vec::new();
    let mut durable_bots = Vec::new();
    for i in 0..args.chatbots.max(args.connections) {
        let bot = accounts::create_chatbot(store, account, &format!("bench-nomatch-{i}")).await?;
        let specs: Vec<_> = (0..args.workflows)
            .map(|w| {
                serde_json::from_value(json!({
                    "name": format!("keyword {w}"),
                    "trigger": {"event": "message.received", "keywords": {"any": [format!("zebra{w}"), format!("quokka{w}")]}},
                    "steps": [{"id": "r", "action": "reply", "text": "never"}]
                }))
            })
            .collect::<Result<_, _>>()?;
        workflows::apply(store, bot, &specs).await?;
        nomatch_bots.push(bot);
        let bot = accounts::create_chatbot(store, account, &format!("bench-exec-{i}")).await?;
        // A step with no effect outside: a delay of zero.
        let spec = serde_json::from_value(json!({
            "name": "one step",
            "trigger": {"event": "x.bench"},
            "steps": [{"id": "d", "action": "delay", "duration": "0s"}]
        }))?;
        workflows::apply(store, bot, &[spec]).await?;
        exec_bots.push(bot);
        let bot = accounts::create_chatbot(store, account, &format!("bench-durable-{i}")).await?;
        let spec = serde_json::from_value(json!({
            "name": "reply, wait, reply",
            "trigger": {"event": "x.durable"},
            "steps": [
                {"id": "first", "action": "reply", "text": "got {{event.id}}"},
                {"id": "pause", "action": "delay", "duration": "0s"},
                {"id": "second", "action": "reply", "text": "done {{event.id}}"}
            ]
        }))?;
        workflows::apply(store, bot, &[spec]).await?;
        durable_bots.push(bot);
    }
    let tls = match &args.tls_ca {
        Some(ca) => Some(crate::tls::connector(Some(ca))?),
        None => None,
    };
    let tcp = args.tcp || tls.is_some();
    let target = Target {
        tcp: if tcp { app.tcp_addr } else { None },
        unix: if tcp { None } else { app.unix_path.clone() },
        tls,
        key,
        window: config.ingest.max_in_flight as u64,
    };
    let clients = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut report = serde_json::Map::new();
    let want = |s: &str| args.scenario == s || (args.scenario == "all" && s != "scale-run");
    eprintln!(
        "botflow bench: {} connections over {}, {} chatbots, {} cores",
        args.connections,
        if target.tls.is_some() {
            "TCP with TLS"
        } else if tcp {
            "TCP"
        } else {
            "the Unix socket"
        },
        args.chatbots,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );

    if args.scenario == "limit" {
        let bots = limit::Bots { nomatch: nomatch_bots[0], exec: exec_bots.clone(), durable: durable_bots.clone() };
        let report = limit::bench(store, &target, &clients, args, bots).await;
        clients.shutdown_background();
        return report;
    }

    if args.scenario == "prune" {
        let report = prune::bench(store, &target, &clients, args, exec_bots.clone(), (&config.retention).into()).await;
        clients.shutdown_background();
        return report;
    }

    if want("nomatch") {
        let (t, a) = (target.clone(), args.clone());
        let bots = nomatch_bots.clone();
        let r = run_on(&clients, async move {
            blast(&t, a.connections, a.nomatch_events, &bots, 0, move |i, bot, buf| {
                event_line(buf, i, bot, "message.received", r#"{"text":"hello there, how are you today?"}"#);
            })
            .await
        })
        .await?;
        eprintln!(
            "no match:    {:>10.0} events/s   ({} events in {:.2} s, {} nacked)",
            r.per_second(),
            r.answered,
            r.elapsed.as_secs_f64(),
            r.nacked
        );
        report.insert("nomatch_events_per_second".into(), json!(r.per_second().round()));
    }

    if want("executions") {
        let r = run_executions(store, &target, &clients, args.connections, args.execution_events, &exec_bots, 0, |i, bot, buf| {
            event_line(buf, i, bot, "x.bench", "{}");
        })
        .await?;
        eprintln!(
            "executions:  {:>10.0} committed/s (acked; {} in {:.2} s, {} nacked)",
            r.committed_per_second(),
            r.acked,
            r.acked_in.as_secs_f64(),
            r.nacked
        );
        eprintln!(
            "             {:>10.0} completed/s (final status and step row committed; {} in {:.2} s)",
            r.completed_per_second(),
            r.done,
            r.done_in.as_secs_f64()
        );
        report.insert("executions_committed_per_second".into(), json!(r.committed_per_second().round()));
        report.insert("executions_completed_per_second".into(), json!(r.completed_per_second().round()));
    }

    if want("durable") {
        let r = run_executions(store, &target, &clients, args.connections, args.durable_events, &durable_bots, 2, |i, bot, buf| {
            event_line(buf, 2_000_000_000_000 + i, bot, "x.durable", "{}");
        })
        .await?;
        eprintln!(
            "durable:     {:>10.0} executions/s completed (reply, delay 0, reply; every command acked by the client, \
             every step committed; {} in {:.2} s, {} nacked)",
            r.completed_per_second(),
            r.done,
            r.done_in.as_secs_f64(),
            r.nacked
        );
        report.insert("durable_executions_per_second".into(), json!(r.completed_per_second().round()));
    }

    if args.scenario == "scale-run" {
        // One case of `scale`: no-match events over `--scale-chatbots` chatbots, each
        // with its own supervisor (limiters, metrics), after a warm-up that starts them all.
        let bots = create_chatbots(store, account, args.scale_chatbots).await?;
        let rss_before = rss_bytes();
        let (t, a) = (target.clone(), args.clone());
        let warm = bots.clone();
        run_on(&clients, async move {
            blast(&t, a.connections, warm.len().max(a.connections) as u64 * 2, &warm, 0, move |i, bot, buf| {
                event_line(buf, 4_000_000_000_000 + i, bot, "x.scale", "{}");
            })
            .await
        })
        .await?;
        let rss_after = rss_bytes();
        let (t, a) = (target.clone(), args.clone());
        let r = run_on(&clients, async move {
            blast(&t, a.connections, a.scale_events, &bots, 0, move |i, bot, buf| {
                event_line(buf, 3_000_000_000_000 + i, bot, "x.scale", "{}");
            })
            .await
        })
        .await?;
        let per = rss_after.saturating_sub(rss_before) as f64 / args.scale_chatbots as f64;
        eprintln!(
            "scale-run:   {:>10.0} events/s over {} chatbot(s){} ({} nacked); {:.0} bytes per idle supervisor",
            r.per_second(),
            args.scale_chatbots,
            if args.bare { " without limits or metrics" } else { "" },
            r.nacked,
            per
        );
        report.insert("events_per_second".into(), json!(r.per_second().round()));
        report.insert("idle_supervisor_bytes".into(), json!(per.round()));
    }

    if want("latency") {
        let (t, a) = (target.clone(), args.clone());
        let bots = exec_bots.clone();
        let h = run_on(&clients, async move { paced(&t, a.connections, a.rate, a.seconds, bots, 1_000_000_000_000).await }).await?;
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        eprintln!(
            "ack latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms at {} events/s offered ({} events, one execution each)",
            ms(0.5),
            ms(0.99),
            h.max() as f64 / 1000.0,
            args.rate,
            h.len()
        );
        report.insert("latency_rate".into(), json!(args.rate));
        report.insert("ack_latency_p50_ms".into(), json!(ms(0.5)));
        report.insert("ack_latency_p99_ms".into(), json!(ms(0.99)));
    }
    clients.shutdown_background();
    Ok(serde_json::Value::Object(report))
}

/// A run of events that each start one execution.
struct ExecRun {
    /// Events acked: their executions are committed.
    acked: u64,
    nacked: u64,
    /// From the first event to the last answer.
    acked_in: Duration,
    /// Executions whose final status (and step rows) are committed.
    done: i64,
    /// From the first event to the last completion.
    done_in: Duration,
}

impl ExecRun {
    fn committed_per_second(&self) -> f64 {
        self.acked as f64 / self.acked_in.as_secs_f64()
    }

    fn completed_per_second(&self) -> f64 {
        self.done as f64 / self.done_in.as_secs_f64()
    }
}

/// Sends `events` events to `bots` over `conns` connections (`commands` commands back
/// per event, which the clients ack) and waits until every acked one has completed.
#[allow(clippy::too_many_arguments)]
async fn run_executions(
    store: &Store,
    target: &Target,
    clients: &tokio::runtime::Runtime,
    conns: usize,
    events: u64,
    bots: &[Uuid],
    commands: u64,
    make: impl Fn(u64, Uuid, &mut Vec<u8>) + Send + Sync + 'static,
) -> anyhow::Result<ExecRun> {
    // PostgreSQL's clock, since `created_at` is written by it.
    let since: chrono::DateTime<chrono::Utc> = store.pool().get().await?.query_one("SELECT now()", &[]).await?.get(0);
    let (t, b) = (target.clone(), bots.to_vec());
    let started = Instant::now();
    let r = run_on(clients, async move { blast(&t, conns, events, &b, commands, make).await }).await?;
    let acked = r.answered - r.nacked;
    let mut done = finished_count(store, bots, since).await?;
    while done < acked as i64 && started.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        done = finished_count(store, bots, since).await?;
    }
    Ok(ExecRun { acked, nacked: r.nacked, acked_in: r.elapsed, done, done_in: started.elapsed() })
}

/// Chatbots in bulk, with one statement.
async fn create_chatbots(store: &Store, account: Uuid, n: usize) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let c = store.pool().get().await?;
    c.execute(
        "INSERT INTO chatbots (id, account_id, name, webhook_secret)
         SELECT id, $2, 'bench-scale-' || ord, md5(id::text) FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, ord)",
        &[&ids, &account],
    )
    .await?;
    Ok(ids)
}

/// This process's resident memory.
fn rss_bytes() -> u64 {
    let pages: u64 = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse().ok()))
        .unwrap_or(0);
    pages * 4096
}

/// Executions of these chatbots created since `since` that have finished. Read through
/// the (chatbot, status, created_at) index, so a poll costs this run's rows, not the
/// table's: a count over every execution took 0.4 s at a million rows (the limit
/// scenario's later rounds), on the same two cores, and delayed the completion seen.
async fn finished_count(store: &Store, bots: &[Uuid], since: chrono::DateTime<chrono::Utc>) -> anyhow::Result<i64> {
    let c = store.pool().get().await?;
    Ok(c.query_one(
        "SELECT count(*) FROM executions WHERE chatbot_id = ANY($1) AND status IN ('succeeded', 'failed') AND created_at >= $2",
        &[&bots, &since],
    )
    .await?
    .get(0))
}

/// Runs a client future on the client runtime and waits for it from the actix side.
async fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    rt.spawn(fut).await.context("bench client panicked")?
}

#[derive(Clone)]
struct Target {
    tcp: Option<std::net::SocketAddr>,
    unix: Option<std::path::PathBuf>,
    tls: Option<tokio_rustls::TlsConnector>,
    key: String,
    window: u64,
}

type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type Writer = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

impl Target {
    async fn connect(&self, subscribe: &[Uuid]) -> anyhow::Result<(Reader, Writer)> {
        let (r, mut w): (Reader, Writer) = if let Some(addr) = self.tcp {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            match &self.tls {
                Some(tls) => {
                    let name = crate::tls::server_name(&addr.to_string()).map_err(anyhow::Error::msg)?;
                    let (r, w) = tokio::io::split(tls.connect(name, s).await?);
                    (Box::new(r), Box::new(w))
                }
                None => {
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                }
            }
        } else {
            let s = tokio::net::UnixStream::connect(self.unix.as_ref().context("no socket")?).await?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        };
        let hello = json!({"op": "hello", "version": 1, "token": self.key, "client": "bench", "subscribe": subscribe});
        w.write_all(format!("{hello}\n").as_bytes()).await?;
        let mut r = r;
        // The welcome line.
        let mut byte = [0u8; 1];
        let mut line = Vec::new();
        loop {
            r.read_exact(&mut byte).await?;
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        anyhow::ensure!(line.starts_with(br#"{"op":"welcome""#), "not welcomed: {}", String::from_utf8_lossy(&line));
        Ok((r, w))
    }
}

fn event_line(buf: &mut Vec<u8>, seq: u64, bot: Uuid, kind: &str, data: &str) {
    use std::io::Write;
    let _ = writeln!(
        buf,
        r#"{{"op":"event","id":"e{seq}","chatbot_id":"{bot}","type":"{kind}","conversation_id":"c{}","data":{data}}}"#,
        seq % 1000
    );
}

struct Blast {
    answered: u64,
    nacked: u64,
    elapsed: Duration,
}

impl Blast {
    fn per_second(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64()
    }
}

/// Sends `total` events over `conns` connections as fast as the windows allow. Each
/// connection sends to its own share of `bots` (`make(seq, bot, buf)` writes one event)
/// and, with `commands_per_event`, subscribes to them and acks every command they
/// send back, finishing once all have arrived.
async fn blast(
    target: &Target,
    conns: usize,
    total: u64,
    bots: &[Uuid],
    commands_per_event: u64,
    make: impl Fn(u64, Uuid, &mut Vec<u8>) + Send + Sync + 'static,
) -> anyhow::Result<Blast> {
    let make = Arc::new(make);
    let per = total / conns as u64;
    let mut tasks = Vec::new();
    // A million events take a while: show them being answered (on a terminal only).
    let progress = crate::cli::progress::counter(per * conns as u64, "events answered");
    let start = Instant::now();
    for c in 0..conns {
        // Connection c owns every conns-th chatbot, so each command reaches exactly one client.
        let mine: Vec<Uuid> = bots.iter().skip(c % bots.len()).step_by(conns.max(1)).copied().collect();
        let mine = if mine.is_empty() { vec![bots[c % bots.len()]] } else { mine };
        let subscribe = if commands_per_event > 0 { mine.clone() } else { Vec::new() };
        let (mut r, mut w) = target.connect(&subscribe).await?;
        let make = make.clone();
        let window = target.window;
        let outstanding = Arc::new(AtomicU64::new(0));
        let notify = Arc::new(tokio::sync::Notify::new());
        let (o2, n2) = (outstanding.clone(), notify.clone());
        let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let base = c as u64 * per;
        let progress = progress.clone();
        let writer = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(256 * 1024);
            let mut sent = 0u64;
            loop {
                let room = window.saturating_sub(o2.load(Ordering::Acquire)).min(per - sent).min(512);
                if sent < per && room > 0 {
                    buf.clear();
                    for k in 0..room {
                        let seq = base + sent + k;
                        make(seq, mine[(seq as usize) % mine.len()], &mut buf);
                    }
                    o2.fetch_add(room, Ordering::AcqRel);
                    w.write_all(&buf).await?;
                    sent += room;
                    continue;
                }
                tokio::select! {
                    _ = n2.notified(), if sent < per => {}
                    acks = acks_rx.recv() => match acks {
                        Some(a) => w.write_all(&a).await?,
                        None => break,
                    },
                }
            }
            anyhow::Ok(w)
        });
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut carry = Vec::new();
            let (mut answered, mut nacked, mut commands) = (0u64, 0u64, 0u64);
            while answered < per || commands < per * commands_per_event {
                let n = r.read(&mut buf).await?;
                anyhow::ensure!(n > 0, "the daemon closed the connection");
                carry.extend_from_slice(&buf[..n]);
                let mut done = 0;
                let mut lines = 0u64;
                let mut acks = Vec::new();
                while let Some(i) = memchr::memchr(b'\n', &carry[done..]) {
                    let line = &carry[done..done + i];
                    if line.starts_with(br#"{"op":"ack""#) {
                        lines += 1;
                    } else if line.starts_with(br#"{"op":"nack""#) {
                        lines += 1;
                        nacked += 1;
                    } else if line.starts_with(br#"{"op":"command","command_id":""#) {
                        let rest = &line[30..];
                        if let Some(end) = memchr::memchr(b'"', rest) {
                            acks.extend_from_slice(br#"{"op":"ack","command_id":""#);
                            acks.extend_from_slice(&rest[..end]);
                            acks.extend_from_slice(b"\"}\n");
                            commands += 1;
                        }
                    }
                    done += i + 1;
                }
                carry.drain(..done);
                answered += lines;
                progress.inc(lines);
                if !acks.is_empty() {
                    let _ = acks_tx.send(acks);
                }
                outstanding.fetch_sub(lines, Ordering::AcqRel);
                notify.notify_one();
            }
            drop(acks_tx);
            anyhow::Ok((answered, nacked))
        });
        tasks.push((writer, reader));
    }
    let (mut answered, mut nacked) = (0, 0);
    for (writer, reader) in tasks {
        let (a, n) = reader.await??;
        let _w = writer.await??;
        answered += a;
        nacked += n;
    }
    progress.finish_and_clear();
    Ok(Blast { answered, nacked, elapsed: start.elapsed() })
}

/// Offers `rate` events/s for `seconds` and records each ack's latency (µs).
async fn paced(target: &Target, conns: usize, rate: u64, seconds: u64, bots: Vec<Uuid>, first_id: u64) -> anyhow::Result<Histogram<u64>> {
    let total = rate * seconds;
    let per = total / conns as u64;
    let tick = Duration::from_millis(1);
    let per_tick = (rate as f64 / conns as f64 / 1000.0).max(0.001);
    let mut tasks = Vec::new();
    let epoch = Instant::now();
    for c in 0..conns as u64 {
        let (mut r, mut w) = target.connect(&[]).await?;
        let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..per).map(|_| AtomicU64::new(0)).collect());
        let s2 = sent_at.clone();
        let bots = bots.clone();
        // Ids distinct from every other run's (the caller's `first_id` on), so no event
        // is a duplicate.
        let base = first_id + c * per;
        let writer = tokio::spawn(async move {
            let mut buf = Vec::new();
            let start = Instant::now();
            let mut sent = 0u64;
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while sent < per {
                interval.tick().await;
                let due = ((start.elapsed().as_secs_f64() * 1000.0 * per_tick) as u64).min(per);
                if due <= sent {
                    continue;
                }
                buf.clear();
                let now = epoch.elapsed().as_micros() as u64;
                for k in sent..due {
                    s2[k as usize].store(now, Ordering::Relaxed);
                    let bot = bots[(k as usize) % bots.len()];
                    event_line(&mut buf, base + k, bot, "x.bench", "{}");
                }
                w.write_all(&buf).await?;
                sent = due;
            }
            anyhow::Ok(w)
        });
        let reader = tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut carry = Vec::new();
            let mut answered = 0u64;
            while answered < per {
                let n = r.read(&mut buf).await?;
                anyhow::ensure!(n > 0, "the daemon closed the connection");
                let now = epoch.elapsed().as_micros() as u64;
                carry.extend_from_slice(&buf[..n]);
                let mut done = 0;
                while let Some(i) = carry[done..].iter().position(|&b| b == b'\n') {
                    let line = &carry[done..done + i];
                    done += i + 1;
                    if !(line.starts_with(br#"{"op":"ack""#) || line.starts_with(br#"{"op":"nack""#)) {
                        continue;
                    }
                    // `"id":"e<seq>"` follows the op.
                    let Some(p) = line.windows(7).position(|w| w == br#""id":"e"#) else { continue };
                    let digits = &line[p + 7..];
                    let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
                    let seq: u64 = std::str::from_utf8(&digits[..end]).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                    if let Some(t) = sent_at.get(seq.wrapping_sub(base) as usize) {
                        h.record(now.saturating_sub(t.load(Ordering::Relaxed)).max(1))?;
                    }
                    answered += 1;
                }
                carry.drain(..done);
            }
            anyhow::Ok(h)
        });
        tasks.push((writer, reader));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for (writer, reader) in tasks {
        let _w = writer.await??;
        all.add(reader.await??)?;
    }
    Ok(all)
}
