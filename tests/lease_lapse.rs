//! A node whose heartbeat lapses because PostgreSQL stalled (every server process
//! stopped past the lease TTL, then continued), or fails for longer than two thirds of
//! the TTL: it stops or abandons what it ran, runs it again, and the workflow's retry
//! attempts are not used up by the stall. In a test binary of their own, one at a
//! time, since they stall the test server (or this node's row) for everyone.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

/// The test server's postmaster and every process it started.
fn server_processes(backend: i32) -> Vec<i32> {
    let ppid = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may hold spaces: read after it.
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
    };
    let postmaster = ppid(backend).expect("the backend's parent");
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
            if ppid(pid) == Some(postmaster) {
                pids.push(pid);
            }
        }
    }
    pids
}

fn signal(pids: &[i32], sig: libc::c_int) {
    for pid in pids {
        // SAFETY: a plain system call on processes of the test's own server.
        unsafe { libc::kill(*pid, sig) };
    }
}

/// The tests stall the server the whole process shares: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A daemon with lease TTL `ttl_ms` and a chatbot whose workflow sends one reply (and
/// waits for a client's ack).
async fn reply_daemon(ttl_ms: u64) -> (TestDaemon, Tenant, tokio_postgres::Client) {
    let daemon = TestDaemon::start_with(DaemonOptions {
        tweak: Box::new(move |c| {
            c.lease.ttl_ms = ttl_ms;
            c.outbox.ack_timeout_ms = 120_000;
            c.scheduler.scan_interval_ms = 200;
        }),
        ..Default::default()
    })
    .await;
    let t = tenant(&daemon.store, "acme", 1).await;
    apply(&daemon.store, t.chatbots[0], json!([{"name": "answer", "trigger": {"event": "x.ask"},
        "steps": [{"id": "say", "action": "reply", "text": "hello {{event.id}}"}],
        "retry": {"max_attempts": 2, "initial_backoff_ms": 100, "jitter": false}}]))
    .await;
    let db = daemon.db().await;
    (daemon, t, db)
}

/// A daemon with a short lease TTL, a chatbot whose workflow sends one reply (and
/// waits for a client's ack), and an event of it acked and running.
async fn running_reply() -> (TestDaemon, Tenant, tokio_postgres::Client) {
    let (daemon, t, db) = reply_daemon(1_500).await;
    let bot = t.chatbots[0];
    let mut sender = Client::unix(&daemon.unix()).await.hello(&t.key, &[]).await;
    sender.send(&event("e1", bot, "x.ask", json!({}))).await;
    let (a, _) = sender.recv_until(|v| v["id"] == "e1").await;
    assert_eq!(a["op"], "ack", "{a}");
    // The step waits for a client's ack (none is subscribed yet).
    eventually("the execution runs", || async {
        let s: String = db.query_one("SELECT status FROM executions WHERE event_id = 'e1'", &[]).await.unwrap().get(0);
        s == "running"
    })
    .await;
    (daemon, t, db)
}

/// A chat service subscribes and acks what it is sent; the execution succeeds, and
/// the stall used none of its attempts.
async fn acked_and_succeeded_on_attempt_1(daemon: &TestDaemon, t: &Tenant, db: &tokio_postgres::Client) {
    let bot = t.chatbots[0];
    let mut chat = Client::unix(&daemon.unix()).await.hello(&t.key, &[bot]).await;
    let (cmd, _) = chat.recv_until(|v| v["op"] == "command").await;
    assert_eq!(cmd["payload"]["text"], "hello e1");
    chat.send(&json!({"op": "ack", "command_id": cmd["command_id"]})).await;
    eventually("the execution succeeds", || async {
        let s: String = db.query_one("SELECT status FROM executions WHERE event_id = 'e1'", &[]).await.unwrap().get(0);
        s == "succeeded"
    })
    .await;
    let r = db.query_one("SELECT attempt, error FROM executions WHERE event_id = 'e1'", &[]).await.unwrap();
    assert_eq!(r.get::<_, i32>(0), 1, "the stall used no attempt ({:?})", r.get::<_, Option<String>>(1));
}

#[actix_rt::test]
#[allow(clippy::await_holding_lock)] // held on purpose: the tests take turns
async fn a_stall_past_the_lease_ttl_uses_no_retry_attempt_and_the_execution_succeeds_after_it() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (daemon, t, db) = running_reply().await;
    let lapses = logs().matches("heartbeat lapsed").count();
    let backend: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let pids = server_processes(backend);
    signal(&pids, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(3_500)).await; // more than twice the TTL
    signal(&pids, libc::SIGCONT);

    eventually("the node saw its heartbeat lapse", || async { logs().matches("heartbeat lapsed").count() > lapses }).await;
    assert!(logs().contains("query_ms"), "the lapse says how long the heartbeat query took");
    acked_and_succeeded_on_attempt_1(&daemon, &t, &db).await;
}

/// Holds the node rows locked, so this node's heartbeats wait (and fail on their
/// statement timeout), until the running step of `e1` is stopped to be tried again;
/// committing the returned transaction lets them through.
async fn hold_heartbeats_until_retrying<'a>(locker: &'a mut tokio_postgres::Client, db: &tokio_postgres::Client) -> tokio_postgres::Transaction<'a> {
    let tx = locker.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM nodes FOR UPDATE", &[]).await.unwrap();
    eventually("the step is stopped, to be tried again", || async {
        let s: String = db.query_one("SELECT status FROM executions WHERE event_id = 'e1'", &[]).await.unwrap().get(0);
        s == "retrying"
    })
    .await;
    tx
}

#[actix_rt::test]
#[allow(clippy::await_holding_lock)] // held on purpose: the tests take turns
async fn a_heartbeat_failing_past_two_thirds_of_the_ttl_stops_the_step_but_uses_no_attempt() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (daemon, t, db) = running_reply().await;
    // This node's row held locked: its heartbeats wait, then fail on their statement
    // timeout (5 s), long after two thirds of the TTL.
    let mut locker = daemon.db().await;
    let tx = hold_heartbeats_until_retrying(&mut locker, &db).await;
    tx.commit().await.unwrap();
    acked_and_succeeded_on_attempt_1(&daemon, &t, &db).await;
}

#[actix_rt::test]
#[allow(clippy::await_holding_lock)] // held on purpose: the tests take turns
async fn a_reply_acked_while_its_step_was_interrupted_is_not_sent_again_when_the_step_runs_again() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // A TTL long enough that the heartbeat is found late (when its query gives up on
    // the locked row: 5 s after a beat sent a third of a TTL after the last) well
    // before it lapses: the step is interrupted and run again under the same lease
    // and attempt.
    let (daemon, t, db) = reply_daemon(12_000).await;
    let bot = t.chatbots[0];
    let mut chat = Client::unix(&daemon.unix()).await.hello(&t.key, &[bot]).await;
    chat.send(&event("e1", bot, "x.ask", json!({}))).await;
    let (cmd, _) = chat.recv_until(|v| v["op"] == "command").await;
    let command_id = cmd["command_id"].as_str().unwrap().to_string();

    // This node's heartbeats wait on its locked row until the step is stopped.
    let mut locker = daemon.db().await;
    let tx = hold_heartbeats_until_retrying(&mut locker, &db).await;
    // The client acks the command it was sent while the step is stopped.
    chat.send(&json!({"op": "ack", "command_id": command_id})).await;
    eventually("the ack is committed", || async {
        let s: String = db.query_one("SELECT status FROM outbox WHERE command_id = $1", &[&command_id]).await.unwrap().get(0);
        s == "acked"
    })
    .await;
    tx.commit().await.unwrap();

    eventually("the execution succeeds", || async {
        let s: String = db.query_one("SELECT status FROM executions WHERE event_id = 'e1'", &[]).await.unwrap().get(0);
        s == "succeeded"
    })
    .await;
    let r = db.query_one("SELECT attempt, lease_epoch FROM executions WHERE event_id = 'e1'", &[]).await.unwrap();
    assert_eq!((r.get::<_, i32>(0), r.get::<_, i64>(1)), (1, 1), "run again under the same attempt and lease");
    while let Some(line) = chat.try_recv(Duration::from_millis(1_500)).await {
        assert_ne!(line["op"], "command", "a command acked before the step ran again was sent again: {line}");
    }
}
