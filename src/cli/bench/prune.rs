//! `botflow bench --scenario prune`: what pruning costs the traffic it runs beside.
//! Three cohorts of expired executions (`--prune-executions` each, one step row each,
//! 100, 80 and 60 days old) are written to a chatbot of their own; the capacity of the
//! executions pipeline is measured, and half of it is offered (events that each start
//! an execution) in three rounds, each first without pruning and then while the pruner
//! deletes one cohort, with the daemon's pruning code and pacing (`[retention]`
//! `batch_size`, `max_rows_per_second`). Reported: the
//! ingest rate achieved while pruning as a ratio to the rate achieved without, the ack
//! latency p99 of both, and the rows pruned per second; medians of the rounds.

use super::limit::median;
use super::{paced, run_executions, run_on, Target};
use crate::store::retention::{self, Pacing, RetentionDays};
use crate::store::{accounts, workflows, Store};
use hdrhistogram::Histogram;
use serde_json::json;
use std::time::{Duration, Instant};
use uuid::Uuid;

const ROUNDS: usize = 3;

/// How old each cohort is, in days; round `r` keeps `AGES[r] - 10` days, so it prunes
/// cohort `r` alone (the older ones went in earlier rounds).
const AGES: [i32; ROUNDS] = [100, 80, 60];

/// The ingest side of one run: events answered, over how long, and their ack latencies.
struct Offered {
    answered: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Offered {
    fn per_second(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64()
    }

    fn p99_ms(&self) -> f64 {
        self.latency.value_at_quantile(0.99) as f64 / 1000.0
    }
}

/// Offers `rate` events/s for `seconds` (ids from `base` on), or, with `until` set,
/// in runs of `seconds` until it is done.
#[allow(clippy::too_many_arguments)]
async fn offer(
    target: &Target,
    clients: &tokio::runtime::Runtime,
    conns: usize,
    rate: u64,
    seconds: u64,
    bots: &[Uuid],
    base: &mut u64,
    until: Option<&tokio::sync::watch::Receiver<bool>>,
) -> anyhow::Result<Offered> {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let start = Instant::now();
    loop {
        let (t, b, from) = (target.clone(), bots.to_vec(), *base);
        *base += rate * seconds + conns as u64;
        latency.add(run_on(clients, async move { paced(&t, conns, rate, seconds, b, from).await }).await?)?;
        if until.is_none_or(|done| *done.borrow()) {
            break;
        }
    }
    Ok(Offered { answered: latency.len(), elapsed: start.elapsed(), latency })
}

/// Writes the expired cohorts: executions with one step row each, in batches.
async fn seed(store: &Store, per_cohort: i64) -> anyhow::Result<Uuid> {
    let account = accounts::create_account(store, "bench-expired").await?;
    let bot = accounts::create_chatbot(store, account, "bench-expired").await?;
    let spec = serde_json::from_value(json!({
        "name": "answered long ago", "trigger": {"event": "message.received"},
        "steps": [{"id": "answer", "action": "reply", "text": "hello"}]
    }))?;
    let workflow = workflows::apply(store, bot, &[spec]).await?[0].id();
    let client = store.pool().get().await?;
    let started = Instant::now();
    const BATCH: i64 = 50_000;
    for (cohort, age) in AGES.iter().enumerate() {
        let mut done = 0;
        while done < per_cohort {
            let n = BATCH.min(per_cohort - done);
            let first = cohort as i64 * per_cohort + done;
            client
                .batch_execute(&format!(
                    "WITH e AS (
                       INSERT INTO executions (id, chatbot_id, workflow_id, workflow_version, event_id, event_type,
                                               conversation_id, event, status, created_at, started_at, finished_at,
                                               duration_ms, run_after)
                       SELECT gen_random_uuid(), '{bot}', '{workflow}', 1, 'old-' || i, 'message.received', 'conv-' || (i % 5000),
                              '{{\"type\": \"message.received\", \"data\": {{\"text\": \"hello\"}}}}', 'succeeded', t, t,
                              t + interval '40 ms', 40, t
                       FROM (SELECT i, now() - interval '{age} days' + (i % 86400) * interval '1 second' AS t
                             FROM generate_series({first}::int8, {last}::int8) AS i) g
                       RETURNING id, started_at, finished_at)
                     INSERT INTO execution_steps (execution_id, step_index, attempt, step_id, action, status, started_at,
                                                  finished_at, output)
                     SELECT id, 0, 1, 'answer', 'reply', 'succeeded', started_at, finished_at, '{{\"command_id\": \"c\"}}'
                     FROM e",
                    last = first + n - 1
                ))
                .await?;
            done += n;
            eprint!("\r  cohort {} ({age} days old): {done} executions written", cohort + 1);
        }
        eprintln!();
    }
    for table in ["executions", "execution_steps"] {
        client.batch_execute(&format!("VACUUM ANALYZE {table}")).await?;
    }
    eprintln!("  written in {:.0} s", started.elapsed().as_secs_f64());
    Ok(bot)
}

pub async fn bench(
    store: &Store,
    target: &Target,
    clients: &tokio::runtime::Runtime,
    args: &super::BenchArgs,
    exec_bots: Vec<Uuid>,
    pacing: Pacing,
) -> anyhow::Result<serde_json::Value> {
    eprintln!(
        "prune: writing {} cohorts of {} expired executions; pruning {} rows a statement, at most {} rows/s (0: no limit)",
        ROUNDS, args.prune_executions, pacing.batch, pacing.max_rows_per_second
    );
    seed(store, args.prune_executions).await?;
    let capacity = run_executions(store, target, clients, args.connections, args.execution_events, &exec_bots, 0, |i, bot, buf| {
        super::event_line(buf, 6_000_000_000_000 + i, bot, "x.bench", "{}")
    })
    .await?
    .completed_per_second();
    let rate = ((capacity / 2.0) as u64).max(100);
    eprintln!("  capacity {capacity:.0} executions/s completed; offering half, {rate} events/s (one execution each)");
    let mut base = 7_000_000_000_000u64;
    let (mut ratios, mut p99_without, mut p99_with, mut rows_per_second) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (round, age) in AGES.iter().enumerate() {
        let without = offer(target, clients, args.connections, rate, args.seconds, &exec_bots, &mut base, None).await?;
        // The daemon's own pruning pass, on the daemon's runtime, as its pruner task runs it.
        let days = RetentionDays { executions: age - 10, dead_letters: 0, acked_commands: 0 };
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let (s, started) = (store.clone(), Instant::now());
        let pruning = actix_rt::spawn(async move {
            let r = retention::prune(&s, days, pacing, false, |_, _| {}).await;
            let _ = done_tx.send(true);
            r.map(|p| (p, started.elapsed()))
        });
        let with = offer(target, clients, args.connections, rate, 5, &exec_bots, &mut base, Some(&done_rx)).await?;
        let (pruned, took) = pruning.await??;
        let per_second = pruned.executions as f64 / took.as_secs_f64();
        eprintln!(
            "  round {}: without pruning {:.0} events/s acked, p99 {:.1} ms; while pruning {} executions in {:.1} s \
             ({per_second:.0}/s): {:.0} events/s, p99 {:.1} ms",
            round + 1,
            without.per_second(),
            without.p99_ms(),
            pruned.executions,
            took.as_secs_f64(),
            with.per_second(),
            with.p99_ms()
        );
        ratios.push(with.per_second() / without.per_second());
        p99_without.push(without.p99_ms());
        p99_with.push(with.p99_ms());
        rows_per_second.push(per_second);
    }
    let (ratio, p99w, p99p, rps) = (median(ratios.clone()), median(p99_without), median(p99_with), median(rows_per_second));
    eprintln!();
    eprintln!(
        "prune: ingest at {rate} events/s (half capacity) keeps {:.1} % of its rate while {} executions are pruned \
         ({rps:.0} rows/s); ack p99 {p99p:.1} ms while pruning, {p99w:.1} ms without (goals: ≥ 90 %, p99 ≤ 50 ms); \
         ratios of the rounds {:?}",
        ratio * 100.0,
        args.prune_executions,
        ratios.iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>()
    );
    Ok(json!({
        "prune": {
            "offered_events_per_second": rate,
            "capacity_executions_per_second": capacity.round(),
            "ingest_ratio_while_pruning": (ratio * 1000.0).round() / 1000.0,
            "ack_p99_ms_while_pruning": p99p,
            "ack_p99_ms_without": p99w,
            "pruned_executions_per_second": rps.round(),
            "executions_per_round": args.prune_executions,
            "batch_size": pacing.batch,
            "max_rows_per_second": pacing.max_rows_per_second,
        }
    }))
}
