//! A fault matrix in the manner of Jepsen: several chat-service clients stream events
//! to two chatbots (a webhook, a reply and a second webhook per execution) while one
//! fault at a time hits the daemon or its database: kill -9, SIGTERM, a daemon paused
//! past its lease beside a second one, PostgreSQL restarted, PostgreSQL paused past the
//! journal's write timeout, the connection to PostgreSQL cut or blackholed mid-write, a
//! client cut mid-frame, every event resent after a restart, and a rate limit changed
//! under load. Clients reconnect and resend what was not answered, as a chat service
//! would. Every ack, nack, command and command ack is recorded with its time, the
//! webhook receiver records every call with its headers, and after the load drains a
//! checker reads that history against the database and names every broken promise of
//! docs/design.md (delivery guarantee, leases, outbox). Each scenario writes a JSON
//! report under `target/fault-matrix/` (or `$BOTFLOW_FAULT_MATRIX_OUT`).
//!
//! The normal run is short; `BOTFLOW_FAULT_MATRIX=long` sends more events and injects
//! each fault several times (docs/reliability.md).

mod common;

use botflow::postgres::{EmbeddedOptions, EmbeddedPostgres};
use common::*;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use uuid::Uuid;

// ---------------------------------------------------------------------------------
// How much load

/// `BOTFLOW_FAULT_MATRIX=long`: more clients and events, and each fault several times.
fn long_run() -> bool {
    std::env::var("BOTFLOW_FAULT_MATRIX").is_ok_and(|v| v == "long")
}

#[derive(Clone, Copy, Debug)]
struct Plan {
    clients: usize,
    events_per_client: usize,
    /// How many times the scenario's fault is injected during the load.
    rounds: usize,
}

fn plan() -> Plan {
    if long_run() {
        Plan { clients: 4, events_per_client: 400, rounds: 5 }
    } else {
        Plan { clients: 3, events_per_client: 50, rounds: 1 }
    }
}

/// Each client sends one event per tick while it has some left.
const TICK: Duration = Duration::from_millis(50);
/// A client that got no answer for this long drops the connection and tries the next
/// endpoint, as a chat service whose daemon stopped answering would.
const STALL: Duration = Duration::from_secs(4);
/// The journal's own bound on one write (src/store/journal/sql.rs `WRITE_TIMEOUT`).
const JOURNAL_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the drain after the faults may take: answers, then executions.
const DRAIN: Duration = Duration::from_secs(60);
/// The webhook steps of the workflows, and the reply step (its command id is
/// `<execution id>:say`).
const WEBHOOK_STEPS: [&str; 2] = ["call", "log"];
const REPLY_STEP: &str = "say";

// ---------------------------------------------------------------------------------
// The history

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Connect { endpoint: usize },
    Disconnect { why: String },
    Send { event: String, resend: bool },
    /// Half of the event's line, then the connection closed; `resent` when the client
    /// sends it whole later (a torn event that is never resent must leave no trace).
    Torn { event: String, resent: bool },
    Ack { event: String, duplicate: bool, executions: Vec<Uuid> },
    Nack { event: String, code: String, retry_after_ms: Option<u64> },
    /// The client stopped resending a nacked event (a chat service dropping it).
    GaveUp { event: String },
    Command { command: String, execution: Option<Uuid> },
    CommandAck { command: String },
    Fault { name: String, detail: String },
}

#[derive(Clone, Debug)]
struct Entry {
    /// Wall clock, ms since the Unix epoch: comparable with PostgreSQL's timestamps.
    t_ms: f64,
    client: Option<usize>,
    op: Op,
}

struct History {
    base: Instant,
    base_ms: f64,
    entries: Mutex<Vec<Entry>>,
}

impl History {
    fn new() -> Arc<History> {
        let base_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0;
        Arc::new(History { base: Instant::now(), base_ms, entries: Mutex::default() })
    }

    fn wall(&self, at: Instant) -> f64 {
        if at >= self.base {
            self.base_ms + (at - self.base).as_secs_f64() * 1000.0
        } else {
            self.base_ms - (self.base - at).as_secs_f64() * 1000.0
        }
    }

    fn record(&self, client: Option<usize>, op: Op) {
        let t_ms = self.wall(Instant::now());
        self.entries.lock().unwrap().push(Entry { t_ms, client, op });
    }

    fn fault(&self, name: &str, detail: impl Into<String>) {
        self.record(None, Op::Fault { name: name.into(), detail: detail.into() });
    }

    fn snapshot(&self) -> Vec<Entry> {
        self.entries.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------
// Clients

#[derive(Clone, Debug)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

type Halves = (Box<dyn AsyncRead + Unpin + Send>, Box<dyn AsyncWrite + Unpin + Send>);

async fn connect(ep: &Endpoint) -> std::io::Result<Halves> {
    Ok(match ep {
        Endpoint::Unix(p) => {
            let (r, w) = tokio::net::UnixStream::connect(p).await?.into_split();
            (Box::new(r), Box::new(w))
        }
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
    })
}

/// What the test tells its clients while they run.
struct Control {
    endpoints: Mutex<Vec<Endpoint>>,
    /// No new events past each client's minimum (the ones not answered yet are still resent).
    stop_sending: AtomicBool,
    quit: AtomicBool,
    /// Cuts still to make: a client takes one, writes half of its next event's line and
    /// closes the connection.
    tears: AtomicUsize,
    /// Bumped to make every client send again every event it had acked.
    resend_all: AtomicU64,
    /// Per client: told to stop, sent its minimum, nothing left to resend or wait for.
    settled: Vec<AtomicBool>,
}

struct ClientSpec {
    id: usize,
    key: String,
    bots: Vec<Uuid>,
    prefix: String,
    events: usize,
    history: Arc<History>,
    control: Arc<Control>,
}

fn event_line(id: &str, bot: Uuid, n: usize) -> String {
    let v = json!({
        "op": "event", "id": id, "chatbot_id": bot, "type": "message.received",
        "conversation_id": format!("conv-{}", n % 5), "occurred_at": "2026-11-25T10:00:00Z",
        "data": {"text": format!("hello number {n}, padded so a line can be cut in its middle")},
    });
    format!("{v}\n")
}

/// The event's number, from its id (`<prefix>-c<client>-<n>`).
fn event_number(id: &str) -> usize {
    id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// A quarter of the events are dropped by their client at their first nack; the rest
/// are resent until acked.
fn gives_up(id: &str) -> bool {
    event_number(id) % 4 == 3
}

/// One chat service connection: sends its events, acks every command, survives the
/// daemon going away (reconnects, resends what was not answered, same ids).
async fn run_client(spec: ClientSpec) {
    let ClientSpec { id: me, key, bots, prefix, events, history, control } = spec;
    let name = |n: usize| format!("{prefix}-c{me}-{n}");
    let bot_of = |ev: &str| bots[event_number(ev) % bots.len()];
    // Events are numbered on: the load goes on until the test stops it, and at least
    // `events` are sent.
    let mut next = 0usize;
    let mut pending: HashMap<String, Instant> = HashMap::new();
    let mut resend: VecDeque<String> = VecDeque::new();
    let mut retries: Vec<(Instant, String)> = Vec::new();
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut seen_resend_all = control.resend_all.load(Ordering::SeqCst);
    let mut endpoint = me;
    while !control.quit.load(Ordering::SeqCst) {
        let eps = control.endpoints.lock().unwrap().clone();
        let ep_index = endpoint % eps.len();
        let (r, mut w) = match tokio::time::timeout(Duration::from_secs(1), connect(&eps[ep_index])).await {
            Ok(Ok(halves)) => halves,
            _ => {
                endpoint += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Lines are read by a task of their own: a read cut off by select! would lose
        // half a line.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
        let reader = tokio::spawn(async move {
            let mut r = BufReader::new(r);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if let Ok(v) = serde_json::from_str::<Value>(&line) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let hello = json!({"op": "hello", "version": 1, "token": key, "client": format!("fm-{me}"), "subscribe": bots});
        let welcomed = w.write_all(format!("{hello}\n").as_bytes()).await.is_ok()
            && matches!(tokio::time::timeout(Duration::from_secs(3), rx.recv()).await, Ok(Some(v)) if v["op"] == "welcome");
        if !welcomed {
            reader.abort();
            endpoint += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        history.record(Some(me), Op::Connect { endpoint: ep_index });
        // What was in flight on the last connection goes again, ids unchanged.
        let mut again: Vec<String> = pending.drain().map(|(k, _)| k).collect();
        again.sort();
        for ev in again {
            if !resend.contains(&ev) {
                resend.push_back(ev);
            }
        }
        let mut tick = tokio::time::interval(TICK);
        let why: String = loop {
            tokio::select! {
                line = rx.recv() => {
                    let Some(v) = line else { break "closed by the daemon".into() };
                    match v["op"].as_str() {
                        Some("ack") => {
                            let ev = v["id"].as_str().unwrap_or_default().to_string();
                            pending.remove(&ev);
                            let executions = v["executions"].as_array().map(|a| a.iter().filter_map(|e| e["execution_id"].as_str()?.parse().ok()).collect()).unwrap_or_default();
                            history.record(Some(me), Op::Ack { event: ev.clone(), duplicate: v["duplicate"] == true, executions });
                            retries.retain(|(_, e)| *e != ev);
                            acked.insert(ev);
                        }
                        Some("nack") => {
                            let ev = v["id"].as_str().unwrap_or_default().to_string();
                            pending.remove(&ev);
                            let code = v["error"]["code"].as_str().unwrap_or_default().to_string();
                            let retry_after_ms = v["error"]["retry_after_ms"].as_u64();
                            history.record(Some(me), Op::Nack { event: ev.clone(), code: code.clone(), retry_after_ms });
                            let retryable = matches!(code.as_str(), "unavailable" | "rate_limited" | "overloaded" | "internal");
                            if acked.contains(&ev) {
                                // A resent duplicate nacked: the first ack stands.
                            } else if !retryable || gives_up(&ev) {
                                history.record(Some(me), Op::GaveUp { event: ev });
                            } else {
                                let wait = Duration::from_millis(retry_after_ms.unwrap_or(500).max(50));
                                retries.push((Instant::now() + wait, ev));
                            }
                        }
                        Some("command") => {
                            let command = v["command_id"].as_str().unwrap_or_default().to_string();
                            let execution = v["execution_id"].as_str().and_then(|e| e.parse().ok());
                            history.record(Some(me), Op::Command { command: command.clone(), execution });
                            let ack = json!({"op": "ack", "command_id": command});
                            if w.write_all(format!("{ack}\n").as_bytes()).await.is_err() {
                                break "write failed".into();
                            }
                            history.record(Some(me), Op::CommandAck { command });
                        }
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    if control.quit.load(Ordering::SeqCst) {
                        reader.abort();
                        return;
                    }
                    let gen = control.resend_all.load(Ordering::SeqCst);
                    if gen != seen_resend_all {
                        seen_resend_all = gen;
                        for ev in &acked {
                            if !resend.contains(ev) {
                                resend.push_back(ev.clone());
                            }
                        }
                    }
                    let now = Instant::now();
                    let (due, later): (Vec<_>, Vec<_>) = retries.drain(..).partition(|(t, _)| *t <= now);
                    retries = later;
                    resend.extend(due.into_iter().map(|(_, e)| e));
                    let sending = !control.stop_sending.load(Ordering::SeqCst) || next < events;
                    let tear = sending && resend.is_empty() && control.tears.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| t.checked_sub(1)).is_ok();
                    if tear {
                        let n = next;
                        next += 1;
                        let ev = name(n);
                        let line = event_line(&ev, bot_of(&ev), n);
                        let _ = w.write_all(&line.as_bytes()[..line.len() / 2]).await;
                        let _ = w.flush().await;
                        history.record(Some(me), Op::Torn { event: ev.clone(), resent: true });
                        resend.push_back(ev);
                        break "cut mid-frame by the client".into();
                    }
                    let mut batch = String::new();
                    let mut sent = Vec::new();
                    while let Some(ev) = resend.pop_front() {
                        batch.push_str(&event_line(&ev, bot_of(&ev), event_number(&ev)));
                        sent.push((ev, true));
                    }
                    if sending && pending.len() < 64 {
                        let n = next;
                        next += 1;
                        let ev = name(n);
                        batch.push_str(&event_line(&ev, bot_of(&ev), n));
                        sent.push((ev, false));
                    }
                    if !batch.is_empty() {
                        for (ev, again) in &sent {
                            history.record(Some(me), Op::Send { event: ev.clone(), resend: *again });
                            pending.insert(ev.clone(), now);
                        }
                        if w.write_all(batch.as_bytes()).await.is_err() {
                            break "write failed".into();
                        }
                    }
                    if pending.values().min().is_some_and(|t| t.elapsed() > STALL) {
                        break "no answer (stalled)".into();
                    }
                    let settled = !sending && pending.is_empty() && resend.is_empty() && retries.is_empty();
                    control.settled[me].store(settled, Ordering::SeqCst);
                }
            }
        };
        reader.abort();
        control.settled[me].store(false, Ordering::SeqCst);
        history.record(Some(me), Op::Disconnect { why });
        // The next connection goes to the next endpoint: of two daemons, this one may be
        // the one that went away.
        endpoint += 1;
    }
}

/// A connection that writes half of an event's line and closes, never to send it again.
async fn torn_only(ep: Endpoint, key: String, bot: Uuid, id: String, history: Arc<History>) {
    let Ok((r, mut w)) = connect(&ep).await else { return };
    let mut r = BufReader::new(r);
    let hello = json!({"op": "hello", "version": 1, "token": key, "client": "fm-torn"});
    if w.write_all(format!("{hello}\n").as_bytes()).await.is_err() {
        return;
    }
    let mut line = String::new();
    if !matches!(tokio::time::timeout(Duration::from_secs(3), r.read_line(&mut line)).await, Ok(Ok(n)) if n > 0) {
        return;
    }
    let ev = event_line(&id, bot, 0);
    let _ = w.write_all(&ev.as_bytes()[..ev.len() / 2]).await;
    let _ = w.flush().await;
    history.record(None, Op::Torn { event: id, resent: false });
    drop(w);
    // The daemon answers the torn line with `incomplete_frame` and closes.
    let mut rest = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), r.read_to_string(&mut rest)).await;
}

// ---------------------------------------------------------------------------------
// The webhook receiver

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
struct Hit {
    path: String,
    headers: Vec<(String, String)>,
    at: Instant,
    /// When the answer was written, or when the daemon closed the connection before
    /// it (killed, or it gave up on the request): the end of the call for the daemon.
    end: Arc<Mutex<Option<Instant>>>,
}

impl Hit {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A webhook receiver that answers 200 after a delay (per path prefix) and notices a
/// caller that hangs up while it waits; the harness receiver only learns that when it
/// writes its answer, which would make a call the daemon abandoned look like one still
/// running.
#[derive(Clone)]
struct Hooks {
    addr: std::net::SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    /// Delay of calls to `/hook/call/`, and of the others.
    slow_call_ms: Arc<AtomicU64>,
}

const HOOK_DELAY_MS: u64 = 20;

impl Hooks {
    /// On a thread of its own, so it answers whatever the test's runtime is doing.
    fn start() -> Hooks {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let hooks = Hooks { addr: listener.local_addr().unwrap(), hits: Arc::default(), slow_call_ms: Arc::new(AtomicU64::new(HOOK_DELAY_MS)) };
        let me = hooks.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((s, _)) = listener.accept().await else { return };
                    let me = me.clone();
                    tokio::spawn(async move { me.serve(s).await });
                }
            });
        });
        hooks
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    async fn serve(&self, s: tokio::net::TcpStream) {
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        loop {
            let Some((path, headers, _body)) = read_http_request(&mut r).await else { return };
            let end = Arc::new(Mutex::new(None));
            let delay = if path.starts_with("/hook/call/") { self.slow_call_ms.load(Ordering::SeqCst) } else { HOOK_DELAY_MS };
            self.hits.lock().unwrap().push(Hit { path, headers, at: Instant::now(), end: end.clone() });
            // The caller sends nothing more until answered: a read that ends means it hung up.
            let mut probe = [0u8; 1];
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                _ = r.read(&mut probe) => {
                    *end.lock().unwrap() = Some(Instant::now());
                    return;
                }
            }
            let resp = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
            let written = w.write_all(resp.as_bytes()).await;
            *end.lock().unwrap() = Some(Instant::now());
            if written.is_err() {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Checker

#[derive(Clone, Debug)]
struct ExecRow {
    id: Uuid,
    event_id: String,
    status: String,
    attempt: i32,
    /// Where it stands (resume point, lease, due time), for the report of one that
    /// did not finish.
    state: String,
}

#[derive(Clone, Debug)]
struct StepRow {
    execution: Uuid,
    step_index: i32,
    attempt: i32,
    start_ms: f64,
    end_ms: f64,
}

#[derive(Clone, Debug)]
struct OutboxRow {
    command_id: String,
    status: String,
    acked_ms: Option<f64>,
}

/// One webhook call as the receiver saw it.
#[derive(Clone, Debug)]
struct Call {
    at_ms: f64,
    done_ms: Option<f64>,
    step: String,
    key: String,
    execution: String,
    /// `X-Botflow-Attempt` (the execution's attempt) and `X-Botflow-Lease-Epoch`.
    attempt: String,
    epoch: String,
}

#[derive(Clone, Debug, Default)]
struct Observed {
    history: Vec<Entry>,
    calls: Vec<Call>,
    executions: Vec<ExecRow>,
    steps: Vec<StepRow>,
    outbox: Vec<OutboxRow>,
}

#[derive(Clone, Debug, PartialEq)]
struct Violation {
    rule: &'static str,
    detail: String,
}

/// A command delivered this long after its ack's commit counts as delivered again
/// after the ack (the margin covers a delivery read from the outbox as the ack's
/// transaction commits: `acked_at` is the transaction's start).
const ACK_MARGIN_MS: f64 = 1000.0;
const FINAL: [&str; 4] = ["succeeded", "failed", "dead", "waiting"];

fn check(o: &Observed) -> (Vec<Violation>, BTreeMap<String, u64>) {
    let mut v = Vec::new();
    let mut bad = |rule: &'static str, detail: String| v.push(Violation { rule, detail });
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut count = |k: &str, n: u64| *counts.entry(k.to_string()).or_default() += n;

    let mut sends: HashMap<&str, u64> = HashMap::new();
    let mut nacks: HashMap<&str, u64> = HashMap::new();
    let mut acks: HashMap<&str, Vec<BTreeSet<Uuid>>> = HashMap::new();
    let mut gave_up: HashSet<&str> = HashSet::new();
    let mut torn_only: HashSet<&str> = HashSet::new();
    let mut deliveries: HashMap<&str, Vec<f64>> = HashMap::new();
    count("operations", o.history.len() as u64);
    for e in &o.history {
        match &e.op {
            Op::Connect { .. } => count("connects", 1),
            Op::Disconnect { .. } => count("disconnects", 1),
            Op::Send { event, resend } => {
                *sends.entry(event).or_default() += 1;
                count("sends", 1);
                if *resend {
                    count("resends", 1);
                }
            }
            Op::Torn { event, resent } => {
                count("torn_frames", 1);
                if !resent {
                    torn_only.insert(event);
                }
            }
            Op::Ack { event, duplicate, executions } => {
                acks.entry(event).or_default().push(executions.iter().copied().collect());
                count("ack_lines", 1);
                if *duplicate {
                    count("duplicate_acks", 1);
                }
            }
            Op::Nack { event, code, retry_after_ms } => {
                *nacks.entry(event).or_default() += 1;
                count("nack_lines", 1);
                count(&format!("nacks_{code}"), 1);
                if code == "rate_limited" && retry_after_ms.is_none() {
                    bad("rate_limited_without_retry_after", format!("{event} was nacked rate_limited with no retry_after_ms"));
                }
            }
            Op::GaveUp { event } => {
                gave_up.insert(event);
            }
            Op::Command { command, .. } => {
                deliveries.entry(command).or_default().push(e.t_ms);
                count("command_deliveries", 1);
            }
            Op::CommandAck { .. } => count("command_acks", 1),
            Op::Fault { .. } => count("faults_injected", 1),
        }
    }
    count("events_sent", sends.len() as u64);
    count("events_acked", acks.len() as u64);
    count("events_given_up", gave_up.iter().filter(|e| !acks.contains_key(*e)).count() as u64);

    let by_id: HashMap<Uuid, &ExecRow> = o.executions.iter().map(|e| (e.id, e)).collect();
    let mut by_event: HashMap<&str, Vec<&ExecRow>> = HashMap::new();
    for e in &o.executions {
        by_event.entry(&e.event_id).or_default().push(e);
        count("executions", 1);
        count(&format!("executions_{}", e.status), 1);
        if e.attempt > 1 {
            count("executions_retried", 1);
        }
    }

    // Acked events: their executions exist and finished; a resend started nothing new.
    let mut acked_events: Vec<&&str> = acks.keys().collect();
    acked_events.sort();
    for ev in acked_events {
        let sets = &acks[*ev];
        let distinct: BTreeSet<&BTreeSet<Uuid>> = sets.iter().collect();
        if distinct.len() > 1 {
            bad("duplicate_started_new_execution", format!("{ev} was acked with different executions: {distinct:?}"));
        }
        for set in distinct {
            if set.is_empty() {
                bad("acked_without_execution", format!("{ev} was acked with no execution, though every event matches a workflow"));
            }
            for id in set {
                match by_id.get(id) {
                    None => bad("acked_event_lost", format!("{ev} was acked with execution {id}, which is not in the database")),
                    Some(x) if !FINAL.contains(&x.status.as_str()) => {
                        bad("execution_not_final", format!("{ev}: execution {id} is {} (attempt {}, {}) after the drain", x.status, x.attempt, x.state))
                    }
                    Some(_) => {}
                }
            }
        }
    }
    // An event every send of which was nacked was never committed.
    let mut sent_events: Vec<&&str> = sends.keys().collect();
    sent_events.sort();
    for ev in sent_events {
        if acks.contains_key(*ev) {
            continue;
        }
        let (s, n) = (sends[*ev], nacks.get(*ev).copied().unwrap_or(0));
        if n >= s && by_event.contains_key(*ev) {
            bad("nacked_event_ran", format!("{ev}: all {s} sends were nacked, yet it has an execution"));
        }
        if !gave_up.contains(*ev) {
            bad("event_unanswered", format!("{ev} was sent {s} times and neither acked nor given up after a nack"));
        }
    }
    for ev in &torn_only {
        if by_event.contains_key(ev) {
            bad("torn_event_recorded", format!("{ev} was only ever sent as half a line, yet it has an execution"));
        }
    }

    // No two attempts of one execution overlap: the database's step rows...
    let mut steps_of: HashMap<Uuid, Vec<&StepRow>> = HashMap::new();
    for s in &o.steps {
        steps_of.entry(s.execution).or_default().push(s);
    }
    count("step_rows", o.steps.len() as u64);
    for (id, rows) in &steps_of {
        for a in rows {
            for b in rows {
                if a.attempt < b.attempt && a.start_ms < b.end_ms && b.start_ms < a.end_ms {
                    bad(
                        "attempts_overlap",
                        format!("execution {id}: step {} of attempt {} and step {} of attempt {} ran at the same time", a.step_index, a.attempt, b.step_index, b.attempt),
                    );
                }
            }
        }
    }
    // ...and the receiver's calls: a call under a newer lease starts after the older
    // one was answered or abandoned (its caller hung up, or died).
    let mut by_key: HashMap<&str, Vec<&Call>> = HashMap::new();
    for c in &o.calls {
        by_key.entry(&c.key).or_default().push(c);
    }
    count("webhook_calls", o.calls.len() as u64);
    count("webhook_steps_called", by_key.len() as u64);
    count("webhook_steps_called_more_than_once", by_key.values().filter(|c| c.len() > 1).count() as u64);
    for (key, calls) in &by_key {
        let mut calls = calls.clone();
        calls.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
        for (i, old) in calls.iter().enumerate() {
            for new in &calls[i + 1..] {
                // One lease's one attempt may try a step again (after a stall) only
                // once the earlier try was given up; attempts and leases are what
                // must never overlap.
                if (&old.epoch, &old.attempt) == (&new.epoch, &new.attempt) {
                    continue;
                }
                let Some(done) = old.done_ms else { continue };
                if new.at_ms < done {
                    let base = o.history.first().map_or(0.0, |e| e.t_ms);
                    let s = |t: f64| (t - base) / 1000.0;
                    bad(
                        "attempts_overlap",
                        format!(
                            "{key}: epoch {} attempt {} called at {:.3} s while epoch {} attempt {} (called at {:.3} s) ended only at {:.3} s",
                            new.epoch, new.attempt, s(new.at_ms), old.epoch, old.attempt, s(old.at_ms), s(done)
                        ),
                    );
                }
            }
        }
    }
    // Every call of one execution's step carries that step's one key.
    let mut keys_of: HashMap<(&str, &str), BTreeSet<&str>> = HashMap::new();
    for c in &o.calls {
        keys_of.entry((&c.execution, &c.step)).or_default().insert(&c.key);
    }
    for ((execution, step), keys) in &keys_of {
        let expected = format!("{execution}:{step}");
        if keys.len() > 1 || keys.iter().any(|k| *k != expected) {
            bad("idempotency_key_mismatch", format!("execution {execution} step {step} was called with keys {keys:?}, expected {expected}"));
        }
    }
    // A succeeded execution's effects happened: each webhook called, the reply delivered.
    for e in o.executions.iter().filter(|e| e.status == "succeeded") {
        let id = e.id.to_string();
        for step in WEBHOOK_STEPS {
            if !keys_of.contains_key(&(id.as_str(), step)) {
                bad("succeeded_without_effect", format!("execution {id} succeeded without calling its {step} webhook"));
            }
        }
        if !deliveries.contains_key(format!("{id}:{REPLY_STEP}").as_str()) {
            bad("succeeded_without_effect", format!("execution {id} succeeded without its reply reaching a client"));
        }
    }
    // A command whose ack committed is not delivered again.
    count("commands_delivered", deliveries.len() as u64);
    count("commands_delivered_more_than_once", deliveries.values().filter(|d| d.len() > 1).count() as u64);
    // Every subscribed connection gets each command; more than once to one client is
    // a redelivery (after a reconnect, say).
    let mut per_client: HashMap<(&str, Option<usize>), u64> = HashMap::new();
    for e in &o.history {
        if let Op::Command { command, .. } = &e.op {
            *per_client.entry((command, e.client)).or_default() += 1;
        }
    }
    count("commands_redelivered_to_one_client", per_client.values().filter(|n| **n > 1).count() as u64);
    for row in &o.outbox {
        count(&format!("outbox_{}", row.status), 1);
        let (Some(acked), Some(times)) = (row.acked_ms, deliveries.get(row.command_id.as_str())) else { continue };
        if let Some(late) = times.iter().find(|t| **t > acked + ACK_MARGIN_MS) {
            bad("command_redelivered_after_ack", format!("{} was delivered {:.0} ms after its ack committed", row.command_id, late - acked));
        }
    }
    v.sort_by(|a, b| (a.rule, &a.detail).cmp(&(b.rule, &b.detail)));
    (v, counts)
}

/// Everything the checker reads: the history, the receiver's calls and the rows of the
/// scenario's chatbots.
async fn observe(history: &History, hooks: &Hooks, db: &tokio_postgres::Client, bots: &[Uuid]) -> Observed {
    let calls = hooks
        .hits()
        .iter()
        .filter(|r| r.path.starts_with("/hook/"))
        .map(|r| Call {
            at_ms: history.wall(r.at),
            done_ms: r.end.lock().unwrap().map(|d| history.wall(d)),
            step: r.path.trim_start_matches("/hook/").split(['/', '?']).next().unwrap_or_default().to_string(),
            key: r.header("idempotency-key").unwrap_or_default().to_string(),
            execution: r.header("x-botflow-execution").unwrap_or_default().to_string(),
            attempt: r.header("x-botflow-attempt").unwrap_or_default().to_string(),
            epoch: r.header("x-botflow-lease-epoch").unwrap_or_default().to_string(),
        })
        .collect();
    let bots = bots.to_vec();
    let executions = db
        .query(
            "SELECT id, event_id, status, attempt,
                    format('step_index %s, lease_owner %s, lease_epoch %s, run_after in %s s, created %s s ago',
                           step_index, lease_owner, lease_epoch,
                           round(extract(epoch FROM run_after - now())::numeric, 1),
                           round(extract(epoch FROM now() - created_at)::numeric, 1))
             FROM executions WHERE chatbot_id = ANY($1)",
            &[&bots],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| ExecRow { id: r.get(0), event_id: r.get(1), status: r.get(2), attempt: r.get(3), state: r.get(4) })
        .collect();
    let steps = db
        .query(
            "SELECT s.execution_id, s.step_index, s.attempt,
                    (extract(epoch FROM s.started_at) * 1000)::float8, (extract(epoch FROM s.finished_at) * 1000)::float8
             FROM execution_steps s JOIN executions e ON e.id = s.execution_id WHERE e.chatbot_id = ANY($1)",
            &[&bots],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| StepRow { execution: r.get(0), step_index: r.get(1), attempt: r.get(2), start_ms: r.get(3), end_ms: r.get(4) })
        .collect();
    let outbox = db
        .query(
            "SELECT command_id, status, (extract(epoch FROM acked_at) * 1000)::float8 FROM outbox WHERE chatbot_id = ANY($1)",
            &[&bots],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| OutboxRow { command_id: r.get(0), status: r.get(1), acked_ms: r.get(2) })
        .collect();
    Observed { history: history.snapshot(), calls, executions, steps, outbox }
}

// ---------------------------------------------------------------------------------
// One scenario: load, fault, recovery, drain, check, report

/// Polls `cond` every 50 ms until it holds; panics at `limit`.
async fn until<F, Fut>(what: &str, limit: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(holds_within(limit, cond).await, "timed out after {limit:?} waiting for: {what}");
}

/// Polls `cond` every 50 ms; whether it held within `limit`.
async fn holds_within<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

struct Matrix {
    name: &'static str,
    history: Arc<History>,
    control: Arc<Control>,
    clients: Vec<tokio::task::JoinHandle<()>>,
    receiver: Hooks,
    bots: Vec<Uuid>,
    started: Instant,
}

impl Matrix {
    /// Starts the clients; the load runs until `finish`.
    fn start(name: &'static str, receiver: &Hooks, key: &str, bots: &[Uuid], endpoints: Vec<Endpoint>) -> Matrix {
        let plan = plan();
        let history = History::new();
        let control = Arc::new(Control {
            endpoints: Mutex::new(endpoints),
            stop_sending: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            tears: AtomicUsize::new(0),
            resend_all: AtomicU64::new(0),
            settled: (0..plan.clients).map(|_| AtomicBool::new(false)).collect(),
        });
        let prefix = format!("{name}-{}", &Uuid::new_v4().simple().to_string()[..6]);
        let clients = (0..plan.clients)
            .map(|id| {
                tokio::spawn(run_client(ClientSpec {
                    id,
                    key: key.to_string(),
                    bots: bots.to_vec(),
                    prefix: prefix.clone(),
                    events: plan.events_per_client,
                    history: history.clone(),
                    control: control.clone(),
                }))
            })
            .collect();
        Matrix { name, history, control, clients, receiver: receiver.clone(), bots: bots.to_vec(), started: Instant::now() }
    }

    fn fault(&self, name: &str, detail: impl Into<String>) {
        self.history.fault(name, detail);
    }

    /// Lets the load run for a random while before the next fault.
    async fn load_for(&self, min_ms: u64, max_ms: u64) {
        let ms = rand::thread_rng().gen_range(min_ms..=max_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Waits for the clients to have sent everything, then for every answer and every
    /// execution to finish; checks; writes and prints the report; panics on violations.
    async fn finish(self, db: &tokio_postgres::Client) -> Value {
        let c = self.control.clone();
        c.stop_sending.store(true, Ordering::SeqCst);
        // A drain that does not finish is reported by the checker (unanswered events,
        // executions not final) with the rest of the history, not cut short here.
        let answered = holds_within(DRAIN, || {
            let c = c.clone();
            async move { c.settled.iter().all(|s| s.load(Ordering::SeqCst)) }
        })
        .await;
        let loaded = self.started.elapsed();
        let bots = self.bots.clone();
        let finished = holds_within(DRAIN, || async {
            let n: i64 = db
                .query_one("SELECT count(*) FROM executions WHERE chatbot_id = ANY($1) AND status <> ALL($2)", &[&bots, &FINAL.to_vec()])
                .await
                .map(|r| r.get(0))
                .unwrap_or(1);
            n == 0
        })
        .await;
        if !(answered && finished) {
            self.history.fault("drain-timed-out", format!("answered: {answered}, executions finished: {finished}"));
        }
        // Late deliveries of a command that was acked are what one rule looks for.
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.quit.store(true, Ordering::SeqCst);
        for h in self.clients {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        let observed = observe(&self.history, &self.receiver, db, &self.bots).await;
        let (violations, counts) = check(&observed);
        let faults: Vec<Value> = observed
            .history
            .iter()
            .filter_map(|e| match &e.op {
                Op::Fault { name, detail } => Some(json!({"at_s": (e.t_ms - self.history.base_ms) / 1000.0, "fault": name, "detail": detail})),
                _ => None,
            })
            .collect();
        let report = json!({
            "scenario": self.name,
            "mode": if long_run() { "long" } else { "short" },
            "plan": format!("{:?}", plan()),
            "load_seconds": loaded.as_secs_f64(),
            "seconds": self.started.elapsed().as_secs_f64(),
            "operations": observed.history.len(),
            "faults": faults,
            "counts": counts,
            "violations": violations.iter().map(|v| json!({"rule": v.rule, "detail": v.detail})).collect::<Vec<_>>(),
        });
        let dir = report_dir();
        let _ = std::fs::create_dir_all(&dir);
        let text = serde_json::to_string_pretty(&report).unwrap();
        let _ = std::fs::write(dir.join(format!("{}.json", self.name)), &text);
        // The whole history beside it, one operation a line, for reading a failure.
        let lines: String = observed
            .history
            .iter()
            .map(|e| format!("{}\n", json!({"t_ms": e.t_ms, "client": e.client, "op": format!("{:?}", e.op)})))
            .collect();
        let _ = std::fs::write(dir.join(format!("{}.history.ndjson", self.name)), lines);
        println!("fault matrix report {}:\n{text}", self.name);
        if !violations.is_empty() {
            // What the daemons in this process logged (warnings and errors), to read
            // a failure by.
            let logs = logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            let _ = std::fs::write(dir.join(format!("{}.daemon.log", self.name)), &logs);
            eprintln!("{}: last daemon log lines, newest first:\n{}", self.name, tail.join("\n"));
        }
        assert!(violations.is_empty(), "{}: {} violations, first: {:?}", self.name, violations.len(), &violations[..violations.len().min(10)]);
        report
    }
}

fn report_dir() -> PathBuf {
    if let Ok(d) = std::env::var("BOTFLOW_FAULT_MATRIX_OUT") {
        return PathBuf::from(d);
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("fault-matrix")
}

/// Two chatbots, each with a workflow of a webhook, a reply and a second webhook.
async fn workflows(store: &botflow::store::Store, bots: &[Uuid], receiver: &Hooks) {
    for bot in bots {
        apply(
            store,
            *bot,
            json!({"name": "fm", "trigger": {"event": "message.received"},
                   "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/hook/call/{{event.id}}"), "timeout_ms": 3000},
                             {"id": "say", "action": "reply", "text": "re {{event.id}}"},
                             {"id": "log", "action": "webhook", "url": receiver.url("/hook/log/{{event.id}}"), "timeout_ms": 3000}],
                   "retry": {"max_attempts": 20, "initial_backoff_ms": 100, "max_backoff_ms": 1000}}),
        )
        .await;
    }
}

/// The receiver answers after a short while, so kills land during steps too.
async fn receiver() -> Hooks {
    Hooks::start()
}

async fn connect_db(cfg: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Settings every daemon of the matrix shares: short waits so faults heal quickly.
fn tweak(c: &mut botflow::config::Config) {
    c.database.unavailable_after_ms = 500;
    c.database.connect_timeout_ms = 1000;
    c.outbox.ack_timeout_ms = 5000;
    c.lease.ttl_ms = 1500;
    c.scheduler.scan_interval_ms = 200;
}

// ---------------------------------------------------------------------------------
// `botflow serve` processes

fn serve_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("BOTFLOW_DATABASE__URL", url.to_string()),
        ("BOTFLOW_DATABASE__UNAVAILABLE_AFTER_MS", "500".into()),
        ("BOTFLOW_DATABASE__CONNECT_TIMEOUT_MS", "1000".into()),
        ("BOTFLOW_OUTBOX__ACK_TIMEOUT_MS", "5000".into()),
        ("BOTFLOW_LEASE__TTL_MS", "1500".into()),
        ("BOTFLOW_SHUTDOWN_TIMEOUT_SECONDS", "10".into()),
    ]
}

/// A `botflow serve` in `dir`, listening on `dir/botflow.sock` only.
fn serve(dir: &Path, env: &[(&str, String)]) -> Serve {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("serve.log")).unwrap();
    serve_socket_only(dir, env, Stdio::from(log))
}

/// Starts `serve` off the async thread (it polls for the socket), so the clients keep running.
async fn serve_async(dir: PathBuf, env: Vec<(&'static str, String)>) -> Serve {
    tokio::task::spawn_blocking(move || serve(&dir, &env)).await.unwrap()
}

async fn terminate_async(mut daemon: Serve) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || daemon.terminate()).await.unwrap()
}

async fn kill9_async(mut daemon: Serve) {
    tokio::task::spawn_blocking(move || daemon.kill9()).await.unwrap()
}

/// A store of our own on the daemons' database, for the bootstrap rows.
fn store_for(pg: &tokio_postgres::Config) -> botflow::store::Store {
    botflow::store::Store::new(pg.clone(), 2, Duration::from_secs(5), None).unwrap()
}

/// A fresh database with one `serve` on it, a tenant with two chatbots and their workflows.
async fn serve_setup(dir: &Path, receiver: &Hooks) -> (tokio_postgres::Config, Vec<(&'static str, String)>, Serve, Tenant) {
    let pg = fresh_database().await;
    let env = serve_env(&pg_url(&pg));
    let daemon = serve_async(dir.to_path_buf(), env.clone()).await;
    let store = store_for(&pg);
    let t = tenant(&store, "fm", 2).await;
    workflows(&store, &t.chatbots, receiver).await;
    (pg, env, daemon, t)
}

fn sock(dir: &Path) -> Endpoint {
    Endpoint::Unix(dir.join("botflow.sock"))
}

// ---------------------------------------------------------------------------------
// PostgreSQL: a proxy that cuts or blackholes connections, and pausing a server

const FORWARD: u8 = 0;
/// Requests still reach the server, its replies are swallowed: a COMMIT that happened
/// is never answered.
const SWALLOW_REPLIES: u8 = 1;
/// Nothing is forwarded either way; the sockets stay open.
const BLACKHOLE: u8 = 2;

#[derive(Clone)]
struct PgProxy {
    port: u16,
    mode: Arc<AtomicU8>,
    cut: Arc<tokio::sync::watch::Sender<u64>>,
}

enum Upstream {
    Unix(PathBuf),
    Tcp(String),
}

impl PgProxy {
    /// Listens on 127.0.0.1 and forwards to the server of `pg`, on a thread of its own.
    fn start(pg: &tokio_postgres::Config) -> PgProxy {
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let upstream = match &pg.get_hosts()[0] {
            tokio_postgres::config::Host::Unix(dir) => Upstream::Unix(dir.join(format!(".s.PGSQL.{port}"))),
            tokio_postgres::config::Host::Tcp(h) => Upstream::Tcp(format!("{h}:{port}")),
        };
        let upstream = Arc::new(upstream);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let proxy = PgProxy { port: listener.local_addr().unwrap().port(), mode: Arc::default(), cut: Arc::new(cut) };
        let me = proxy.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else { return };
                    let (me, upstream) = (me.clone(), upstream.clone());
                    tokio::spawn(async move { me.relay(client, &upstream).await });
                }
            });
        });
        proxy
    }

    async fn relay(&self, client: tokio::net::TcpStream, upstream: &Upstream) {
        // Subscribed before anything else, so a cut while this connection is being set
        // up closes it too (one left open would come back out of step after a blackhole).
        let cut = self.cut.subscribe();
        let server: Halves = match upstream {
            Upstream::Unix(p) => match tokio::net::UnixStream::connect(p).await {
                Ok(s) => {
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                }
                Err(_) => return,
            },
            Upstream::Tcp(a) => match tokio::net::TcpStream::connect(a).await {
                Ok(s) => {
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                }
                Err(_) => return,
            },
        };
        let (cr, cw) = client.into_split();
        let (sr, sw) = server;
        if cut.has_changed().unwrap_or(true) {
            return;
        }
        tokio::select! {
            _ = pump(Box::new(cr), sw, true, self.mode.clone()) => {}
            _ = pump(sr, Box::new(cw), false, self.mode.clone()) => {}
            _ = wait_cut(cut) => {}
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// Closes every connection open now.
    fn cut_all(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    fn config(&self, pg: &tokio_postgres::Config) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1").port(self.port).user(pg.get_user().unwrap_or("postgres")).dbname(pg.get_dbname().unwrap_or("postgres"));
        c
    }
}

async fn wait_cut(mut cut: tokio::sync::watch::Receiver<u64>) {
    let _ = cut.changed().await;
}

async fn pump(mut r: Box<dyn AsyncRead + Unpin + Send>, mut w: Box<dyn AsyncWrite + Unpin + Send>, to_server: bool, mode: Arc<AtomicU8>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let m = mode.load(Ordering::SeqCst);
        let pass = if to_server { m != BLACKHOLE } else { m == FORWARD };
        if pass && w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The postmaster and its children (backends and auxiliary processes).
fn pg_processes(postmaster: i32) -> Vec<i32> {
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces, so read after its ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        if ppid == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

fn signal_all(pids: &[i32], sig: libc::c_int) {
    for pid in pids {
        // SAFETY: a plain system call on processes this test started.
        unsafe { libc::kill(*pid, sig) };
    }
}

async fn start_embedded(dir: PathBuf) -> EmbeddedPostgres {
    tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir, &EmbeddedOptions { fast_unsafe: true, ..Default::default() }).unwrap())
        .await
        .unwrap()
}

/// A dedicated PostgreSQL (this scenario stops or pauses it), an in-process daemon on it,
/// a tenant with two chatbots and their workflows.
async fn dedicated_setup(dir: &TempDir, receiver: &Hooks) -> (EmbeddedPostgres, TestDaemon, Tenant) {
    let pg = start_embedded(dir.path().to_path_buf()).await;
    pg.ensure_database("botflow").await.unwrap();
    let daemon = TestDaemon::start_with(DaemonOptions { pg: Some(pg.config("botflow")), tweak: Box::new(tweak) }).await;
    let t = tenant(&daemon.store, "fm", 2).await;
    workflows(&daemon.store, &t.chatbots, receiver).await;
    (pg, daemon, t)
}

fn endpoints_of(daemon: &TestDaemon) -> Vec<Endpoint> {
    vec![Endpoint::Unix(daemon.unix()), Endpoint::Tcp(daemon.tcp())]
}

// ---------------------------------------------------------------------------------
// The faults

/// Where in an event's life a kill -9 lands.
#[derive(Clone, Copy, Debug)]
enum KillPoint {
    /// Events sent, their write held on its way to PostgreSQL: nothing committed.
    BeforeCommit,
    /// The write reached PostgreSQL and committed, its answer was lost: committed, not acked.
    BetweenCommitAndAck,
    /// Webhook calls in flight.
    DuringSteps,
    /// Wherever the load happens to be.
    Random,
}

#[actix_rt::test]
async fn kill_9_under_load() {
    let dir = TempDir::new("fm-kill9");
    let receiver = receiver().await;
    // The daemon reaches PostgreSQL through the proxy, which holds its writes or loses
    // their answers on demand: that is how a kill lands before or after a commit.
    let pg = fresh_database().await;
    let proxy = PgProxy::start(&pg);
    let env = serve_env(&pg_url(&proxy.config(&pg)));
    let mut daemon = serve_async(dir.path().to_path_buf(), env.clone()).await;
    let store = store_for(&pg);
    let t = tenant(&store, "fm", 2).await;
    workflows(&store, &t.chatbots, &receiver).await;
    let m = Matrix::start("kill-9", &receiver, &t.key, &t.chatbots, vec![sock(dir.path())]);
    let points = [KillPoint::BeforeCommit, KillPoint::BetweenCommitAndAck, KillPoint::DuringSteps, KillPoint::Random];
    let rounds = if long_run() { plan().rounds * points.len() } else { 3 };
    for round in 0..rounds {
        let point = points[round % points.len()];
        m.load_for(200, 800).await;
        let since = m.history.wall(Instant::now());
        match point {
            KillPoint::BeforeCommit => proxy.set(BLACKHOLE),
            KillPoint::BetweenCommitAndAck => proxy.set(SWALLOW_REPLIES),
            KillPoint::DuringSteps => receiver.slow_call_ms.store(1500, Ordering::SeqCst),
            KillPoint::Random => {}
        }
        match point {
            KillPoint::BeforeCommit | KillPoint::BetweenCommitAndAck => {
                // Events sent while the writes are held or their answers lost.
                let h = m.history.clone();
                until("events sent into the held database", Duration::from_secs(10), || {
                    let h = h.clone();
                    async move {
                        h.snapshot().iter().filter(|e| e.t_ms > since + 200.0 && matches!(e.op, Op::Send { .. })).count() >= 2
                    }
                })
                .await;
            }
            KillPoint::DuringSteps => {
                let r = receiver.clone();
                until("webhook calls in flight", Duration::from_secs(10), || {
                    let r = r.clone();
                    async move { r.hits().iter().any(|c| c.path.starts_with("/hook/call/") && c.end.lock().unwrap().is_none()) }
                })
                .await;
            }
            KillPoint::Random => {}
        }
        m.fault("kill-9", format!("round {round}: {point:?}"));
        kill9_async(daemon).await;
        proxy.cut_all();
        proxy.set(FORWARD);
        receiver.slow_call_ms.store(HOOK_DELAY_MS, Ordering::SeqCst);
        daemon = serve_async(dir.path().to_path_buf(), env.clone()).await;
        m.fault("restarted", format!("round {round}"));
    }
    // Events committed but not acked are acked as duplicates when resent
    // (`duplicate_acks`); whether a lane was writing events, rather than step records,
    // when the answers were lost is up to the moment.
    m.finish(&connect_db(&pg).await).await;
    drop(daemon);
}

#[actix_rt::test]
async fn sigterm_drains_under_load() {
    let dir = TempDir::new("fm-term");
    let receiver = receiver().await;
    let (pg, env, mut daemon, t) = serve_setup(dir.path(), &receiver).await;
    let m = Matrix::start("sigterm", &receiver, &t.key, &t.chatbots, vec![sock(dir.path())]);
    for round in 0..plan().rounds {
        m.load_for(300, 1500).await;
        m.fault("sigterm", format!("round {round}"));
        let status = terminate_async(daemon).await;
        assert!(status.success(), "a drained daemon exits 0: {status}");
        daemon = serve_async(dir.path().to_path_buf(), env.clone()).await;
        m.fault("restarted", format!("round {round}"));
    }
    m.finish(&connect_db(&pg).await).await;
    drop(daemon);
}

#[actix_rt::test]
async fn a_daemon_paused_past_its_lease_beside_another() {
    let (dir_a, dir_b) = (TempDir::new("fm-stop-a"), TempDir::new("fm-stop-b"));
    let receiver = receiver().await;
    let (pg, env, a, t) = serve_setup(dir_a.path(), &receiver).await;
    let _b = serve_async(dir_b.path().to_path_buf(), env.clone()).await;
    let m = Matrix::start("sigstop", &receiver, &t.key, &t.chatbots, vec![sock(dir_a.path()), sock(dir_b.path())]);
    let pid = a.child.id() as i32;
    for round in 0..plan().rounds {
        m.load_for(300, 1200).await;
        m.fault("sigstop", format!("round {round}: daemon A for 3 lease TTLs"));
        // SAFETY: signals to the daemon this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        tokio::time::sleep(Duration::from_millis(4500)).await;
        unsafe { libc::kill(pid, libc::SIGCONT) };
        m.fault("sigcont", format!("round {round}"));
    }
    m.finish(&connect_db(&pg).await).await;
    drop(a);
}

#[actix_rt::test]
async fn postgres_restarted_under_load() {
    let dir = TempDir::new("fm-pgrestart");
    let receiver = receiver().await;
    let (mut pg, daemon, t) = dedicated_setup(&dir, &receiver).await;
    let m = Matrix::start("postgres-restart", &receiver, &t.key, &t.chatbots, endpoints_of(&daemon));
    for round in 0..plan().rounds {
        m.load_for(300, 1200).await;
        m.fault("postgres-stop", format!("round {round}"));
        pg = tokio::task::spawn_blocking(move || {
            pg.stop().unwrap();
            pg
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(pg);
        pg = start_embedded(dir.path().to_path_buf()).await;
        m.fault("postgres-start", format!("round {round}"));
    }
    m.finish(&connect_db(&pg.config("botflow")).await).await;
    drop(daemon);
}

#[actix_rt::test]
async fn postgres_paused_past_the_write_timeout() {
    let dir = TempDir::new("fm-pgpause");
    let receiver = receiver().await;
    let (pg, daemon, t) = dedicated_setup(&dir, &receiver).await;
    let m = Matrix::start("postgres-pause", &receiver, &t.key, &t.chatbots, endpoints_of(&daemon));
    let postmaster = pg.pid().expect("the server runs") as i32;
    // One pause even in the long run: each costs the journal's whole write timeout.
    let rounds = if long_run() { 2 } else { 1 };
    for round in 0..rounds {
        m.load_for(300, 1200).await;
        let pids = pg_processes(postmaster);
        m.fault("postgres-sigstop", format!("round {round}: {} processes", pids.len()));
        signal_all(&pids, libc::SIGSTOP);
        tokio::time::sleep(JOURNAL_WRITE_TIMEOUT + Duration::from_secs(2)).await;
        signal_all(&pids, libc::SIGCONT);
        m.fault("postgres-sigcont", format!("round {round}"));
    }
    m.finish(&connect_db(&pg.config("botflow")).await).await;
    drop(daemon);
}

#[actix_rt::test]
async fn postgres_connections_cut_and_blackholed_mid_write() {
    let pg = fresh_database().await;
    let proxy = PgProxy::start(&pg);
    let receiver = receiver().await;
    let daemon = TestDaemon::start_with(DaemonOptions { pg: Some(proxy.config(&pg)), tweak: Box::new(tweak) }).await;
    let t = tenant(&daemon.store, "fm", 2).await;
    workflows(&daemon.store, &t.chatbots, &receiver).await;
    let m = Matrix::start("postgres-cut", &receiver, &t.key, &t.chatbots, endpoints_of(&daemon));
    for round in 0..plan().rounds {
        m.load_for(200, 800).await;
        m.fault("pg-cut", format!("round {round}: every connection closed"));
        proxy.cut_all();
        m.load_for(200, 800).await;
        // Requests (a COMMIT among them) reach the server, their answers are lost.
        m.fault("pg-swallow-replies", format!("round {round}: 1 s, then cut"));
        proxy.set(SWALLOW_REPLIES);
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.cut_all();
        proxy.set(FORWARD);
        m.load_for(200, 800).await;
        m.fault("pg-blackhole", format!("round {round}: 1.5 s, then cut"));
        proxy.set(BLACKHOLE);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.cut_all();
        proxy.set(FORWARD);
        m.fault("pg-healed", format!("round {round}"));
    }
    m.finish(&connect_db(&pg).await).await;
    drop(daemon);
}

#[actix_rt::test]
async fn clients_cut_mid_frame() {
    let receiver = receiver().await;
    let daemon = TestDaemon::start_with(DaemonOptions { tweak: Box::new(tweak), ..Default::default() }).await;
    let t = tenant(&daemon.store, "fm", 2).await;
    workflows(&daemon.store, &t.chatbots, &receiver).await;
    let m = Matrix::start("client-cut-mid-frame", &receiver, &t.key, &t.chatbots, endpoints_of(&daemon));
    for round in 0..plan().rounds {
        m.load_for(200, 800).await;
        // Each client tears one event's line and sends it whole after reconnecting...
        m.fault("client-cut-mid-frame", format!("round {round}: {} clients", plan().clients));
        m.control.tears.fetch_add(plan().clients, Ordering::SeqCst);
        // ...and a few connections tear one and never come back.
        for k in 0..3 {
            let id = format!("torn-{round}-{k}-{}", Uuid::new_v4().simple());
            torn_only(Endpoint::Tcp(daemon.tcp()), t.key.clone(), t.chatbots[k % 2], id, m.history.clone()).await;
        }
    }
    let c = m.control.clone();
    until("every requested tear made", Duration::from_secs(30), || {
        let c = c.clone();
        async move { c.tears.load(Ordering::SeqCst) == 0 }
    })
    .await;
    let report = m.finish(&daemon.db().await).await;
    assert!(report["counts"]["torn_frames"].as_u64() >= Some(3 + plan().clients as u64), "{report}");
}

#[actix_rt::test]
async fn every_event_resent_after_a_restart() {
    let dir = TempDir::new("fm-dups");
    let receiver = receiver().await;
    let (pg, env, mut daemon, t) = serve_setup(dir.path(), &receiver).await;
    let m = Matrix::start("duplicates-after-restart", &receiver, &t.key, &t.chatbots, vec![sock(dir.path())]);
    for round in 0..plan().rounds {
        m.load_for(500, 1500).await;
        m.fault("kill-9", format!("round {round}"));
        kill9_async(daemon).await;
        daemon = serve_async(dir.path().to_path_buf(), env.clone()).await;
        // A chat service that lost track sends everything again, acked or not.
        m.fault("resend-everything", format!("round {round}"));
        m.control.resend_all.fetch_add(1, Ordering::SeqCst);
    }
    let report = m.finish(&connect_db(&pg).await).await;
    assert!(report["counts"]["duplicate_acks"].as_u64() > Some(0), "resent events were acked as duplicates: {report}");
    drop(daemon);
}

#[actix_rt::test]
async fn a_rate_limit_changed_under_load() {
    let receiver = receiver().await;
    let daemon = TestDaemon::start_with(DaemonOptions { tweak: Box::new(tweak), ..Default::default() }).await;
    let t = tenant(&daemon.store, "fm", 2).await;
    workflows(&daemon.store, &t.chatbots, &receiver).await;
    let operator = botflow::store::accounts::create_key(&daemon.store, t.account, botflow::store::accounts::Role::Operator).await.unwrap();
    let http = reqwest::Client::new();
    let put = |bot: Uuid, body: Value| {
        let req = http.put(format!("{}/v1/chatbots/{bot}/limits", daemon.admin())).bearer_auth(&operator).json(&body);
        async move {
            let r = req.send().await.unwrap();
            assert!(r.status().is_success(), "PUT limits: {}", r.status());
        }
    };
    let m = Matrix::start("rate-limit-change", &receiver, &t.key, &t.chatbots, endpoints_of(&daemon));
    for round in 0..plan().rounds {
        m.load_for(300, 800).await;
        m.fault("limits-lowered", format!("round {round}: chatbot 0 to 5 events/s, burst 2"));
        put(t.chatbots[0], json!({"events_per_second": 5, "burst": 2, "executions_per_second": 5})).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        m.fault("limits-raised", format!("round {round}"));
        put(t.chatbots[0], json!({"events_per_second": 100000, "burst": 100000, "executions_per_second": 100000})).await;
    }
    let report = m.finish(&daemon.db().await).await;
    assert!(report["counts"]["nacks_rate_limited"].as_u64() > Some(0), "the lowered limit nacked some events: {report}");
}

// ---------------------------------------------------------------------------------
// The checker can fail

fn at(t_ms: f64, client: Option<usize>, op: Op) -> Entry {
    Entry { t_ms, client, op }
}

/// One event acked, run and finished cleanly: the checker's baseline.
fn clean() -> (Observed, Uuid) {
    let e = Uuid::from_u128(7);
    let command = format!("{e}:{REPLY_STEP}");
    let call = |step: &str, at_ms: f64| Call {
        at_ms,
        done_ms: Some(at_ms + 20.0),
        step: step.into(),
        key: format!("{e}:{step}"),
        execution: e.to_string(),
        attempt: "1".into(),
        epoch: "1".into(),
    };
    let o = Observed {
        history: vec![
            at(0.0, Some(0), Op::Send { event: "ev-0".into(), resend: false }),
            at(10.0, Some(0), Op::Ack { event: "ev-0".into(), duplicate: false, executions: vec![e] }),
            at(60.0, Some(0), Op::Command { command: command.clone(), execution: Some(e) }),
            at(61.0, Some(0), Op::CommandAck { command: command.clone() }),
        ],
        calls: vec![call("call", 20.0), call("log", 80.0)],
        executions: vec![ExecRow { id: e, event_id: "ev-0".into(), status: "succeeded".into(), attempt: 1, state: String::new() }],
        steps: vec![
            StepRow { execution: e, step_index: 0, attempt: 1, start_ms: 20.0, end_ms: 40.0 },
            StepRow { execution: e, step_index: 1, attempt: 1, start_ms: 50.0, end_ms: 70.0 },
            StepRow { execution: e, step_index: 2, attempt: 1, start_ms: 80.0, end_ms: 100.0 },
        ],
        outbox: vec![OutboxRow { command_id: command, status: "acked".into(), acked_ms: Some(65.0) }],
    };
    (o, e)
}

fn rules(o: &Observed) -> BTreeSet<&'static str> {
    check(o).0.iter().map(|v| v.rule).collect()
}

#[test]
fn the_checker_passes_a_clean_history_and_counts_it() {
    let (o, _) = clean();
    let (violations, counts) = check(&o);
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(counts["events_acked"], 1);
    assert_eq!(counts["webhook_calls"], 2);
    assert_eq!(counts["commands_delivered"], 1);
}

#[test]
fn the_checker_names_every_kind_of_violation() {
    let expect = |o: &Observed, rule: &str| {
        let found = rules(o);
        assert!(found.contains(rule), "expected {rule}, got {found:?}");
    };
    // The acked execution is missing from the database.
    let (mut o, _) = clean();
    o.executions.clear();
    expect(&o, "acked_event_lost");
    // It never finished.
    let (mut o, _) = clean();
    o.executions[0].status = "running".into();
    expect(&o, "execution_not_final");
    // Acked without executions.
    let (mut o, _) = clean();
    o.history.push(at(5.0, Some(1), Op::Send { event: "ev-1".into(), resend: false }));
    o.history.push(at(6.0, Some(1), Op::Ack { event: "ev-1".into(), duplicate: false, executions: vec![] }));
    expect(&o, "acked_without_execution");
    // A resend was acked with another execution.
    let (mut o, _) = clean();
    o.history.push(at(90.0, Some(0), Op::Ack { event: "ev-0".into(), duplicate: true, executions: vec![Uuid::from_u128(8)] }));
    expect(&o, "duplicate_started_new_execution");
    // Every send was nacked, yet the event ran.
    let (mut o, e) = clean();
    o.history.retain(|x| !matches!(x.op, Op::Ack { .. }));
    o.history.push(at(10.0, Some(0), Op::Nack { event: "ev-0".into(), code: "unavailable".into(), retry_after_ms: None }));
    o.history.push(at(10.0, Some(0), Op::GaveUp { event: "ev-0".into() }));
    assert_eq!(o.executions[0].id, e);
    expect(&o, "nacked_event_ran");
    // Sent and never answered.
    let (mut o, _) = clean();
    o.history.push(at(5.0, Some(1), Op::Send { event: "ev-9".into(), resend: false }));
    expect(&o, "event_unanswered");
    // Half a line left an execution behind.
    let (mut o, _) = clean();
    o.history.push(at(5.0, None, Op::Torn { event: "ev-0".into(), resent: false }));
    expect(&o, "torn_event_recorded");
    // Two attempts' step rows overlap.
    let (mut o, e) = clean();
    o.steps.push(StepRow { execution: e, step_index: 0, attempt: 2, start_ms: 30.0, end_ms: 45.0 });
    expect(&o, "attempts_overlap");
    // Two leases' calls overlap at the receiver...
    let (mut o, _) = clean();
    let mut again = o.calls[0].clone();
    again.epoch = "2".into();
    again.at_ms += 5.0;
    o.calls.push(again.clone());
    expect(&o, "attempts_overlap");
    // ...which is fine once the first one was abandoned.
    o.calls[0].done_ms = Some(again.at_ms - 1.0);
    assert!(!rules(&o).contains("attempts_overlap"), "{:?}", check(&o).0);
    // A step called with another key.
    let (mut o, _) = clean();
    o.calls[1].key = "something-else".into();
    expect(&o, "idempotency_key_mismatch");
    // Succeeded without its effects.
    let (mut o, _) = clean();
    o.calls.pop();
    expect(&o, "succeeded_without_effect");
    let (mut o, _) = clean();
    o.history.retain(|x| !matches!(x.op, Op::Command { .. }));
    expect(&o, "succeeded_without_effect");
    // A command delivered again well after its ack committed.
    let (mut o, e) = clean();
    o.history.push(at(5000.0, Some(2), Op::Command { command: format!("{e}:{REPLY_STEP}"), execution: Some(e) }));
    expect(&o, "command_redelivered_after_ack");
    // A rate-limited nack with no hint when to retry.
    let (mut o, _) = clean();
    o.history.push(at(1.0, Some(0), Op::Nack { event: "ev-0".into(), code: "rate_limited".into(), retry_after_ms: None }));
    expect(&o, "rate_limited_without_retry_after");
}
