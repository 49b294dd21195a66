//! Crashes, with the real binary: `kill -9` during a delay and with a thousand
//! executions in flight, and two daemons on one database, one of which dies.

mod common;

use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A `botflow serve` in `dir` (see `serve_socket_only`), its log thrown away.
fn serve(dir: &Path, env: &[(&str, String)]) -> Serve {
    serve_socket_only(dir, env, Stdio::null())
}

/// Runs a bootstrap command against the same database; returns its stdout.
fn cli(dir: &Path, env: &[(&str, String)], args: &[&str]) -> String {
    let mut c = botflow_cmd();
    c.args(args).current_dir(dir).env("BOTFLOW_DATA_DIR", dir.join("var"));
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "botflow {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

struct Setup {
    key: String,
    bot: Uuid,
}

fn bootstrap(dir: &Path, env: &[(&str, String)], workflow: serde_json::Value) -> Setup {
    let account = cli(dir, env, &["accounts", "create", "acme"]);
    let key = cli(dir, env, &["keys", "create", "--account", &account, "--role", "ingest"]);
    let bot: Uuid = cli(dir, env, &["chatbots", "create", "--account", &account, "bot"]).parse().unwrap();
    let file = dir.join("workflow.json");
    std::fs::write(&file, workflow.to_string()).unwrap();
    cli(dir, env, &["workflows", "apply", "--chatbot", &bot.to_string(), file.to_str().unwrap()]);
    Setup { key, bot }
}

fn postmaster_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("var/postgres/data/postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
}

async fn status_of(db: &tokio_postgres::Client, event_id: &str) -> Option<String> {
    db.query_opt("SELECT status FROM executions WHERE event_id = $1", &[&event_id]).await.ok()?.map(|r| r.get(0))
}

#[actix_rt::test]
async fn a_delay_survives_kill_9_and_completes_after_the_restart() {
    let dir = TempDir::new("kill9-delay");
    let receiver = Receiver::start().await;
    let mut daemon = serve(dir.path(), &[]);
    let s = bootstrap(
        dir.path(),
        &[],
        json!({"name": "later", "trigger": {"event": "x.go"},
               "steps": [{"id": "wait", "action": "delay", "duration": "2s"},
                         {"id": "call", "action": "webhook", "url": receiver.url("/after")}]}),
    );
    let mut c = Client::unix(&dir.path().join("botflow.sock")).await.hello(&s.key, &[]).await;
    let sent = Instant::now();
    c.send(&event("e1", s.bot, "x.go", json!({}))).await;
    assert_eq!(c.recv().await["op"], "ack");
    let db = embedded_db(dir.path()).await;
    eventually("the execution waits", || async { status_of(&db, "e1").await.as_deref() == Some("waiting") }).await;
    drop(db);

    let pg = postmaster_pid(dir.path()).unwrap();
    daemon.kill9();
    wait_until("PostgreSQL stops with its daemon", || unsafe { libc::kill(pg, 0) } != 0);
    assert_eq!(receiver.count("/after"), 0);

    let _daemon = serve(dir.path(), &[]);
    let hits = receiver.wait_for("/after", 1).await;
    assert!(hits[0].at - sent >= Duration::from_secs(2), "the delay was cut short");
    let db = embedded_db(dir.path()).await;
    eventually("the execution succeeds", || async { status_of(&db, "e1").await.as_deref() == Some("succeeded") }).await;
    assert!(receiver.stays_at("/after", 1, Duration::from_millis(500)).await, "the webhook ran once");
}

#[actix_rt::test]
async fn kill_9_with_a_thousand_executions_in_flight_loses_none() {
    let dir = TempDir::new("kill9-many");
    let receiver = Receiver::start().await;
    receiver.on("/work", Behaviour::Script(vec![Reply::new(200, "{}").after(Duration::from_millis(10))]));
    let mut daemon = serve(dir.path(), &[]);
    let s = bootstrap(
        dir.path(),
        &[],
        json!({"name": "work", "trigger": {"event": "x.go"},
               "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/work")},
                         {"id": "rest", "action": "delay", "duration": "0s"}]}),
    );
    let mut c = Client::unix(&dir.path().join("botflow.sock")).await.hello(&s.key, &[]).await;
    let mut burst = String::new();
    for i in 0..1000 {
        burst.push_str(&format!("{}\n", event(&format!("e{i}"), s.bot, "x.go", json!({}))));
    }
    c.send_raw(&burst).await;
    let (answers, _) = c.answers(1000).await;
    let acked: Vec<String> = answers.iter().filter(|(_, a)| a["op"] == "ack").map(|(id, _)| id.clone()).collect();
    assert_eq!(acked.len(), 1000);
    receiver.wait_for("/work", 100).await;
    daemon.kill9();
    let done_before = receiver.count("/work");
    assert!(done_before < 1000, "the crash came too late to test anything ({done_before} done)");

    let _daemon = serve(dir.path(), &[]);
    let db = embedded_db(dir.path()).await;
    eventually("every execution reaches a final state", || async {
        let n: i64 = db
            .query_one("SELECT count(*) FROM executions WHERE status IN ('succeeded', 'failed', 'dead')", &[])
            .await
            .unwrap()
            .get(0);
        n == 1000
    })
    .await;
    let rows = db.query("SELECT event_id, status FROM executions", &[]).await.unwrap();
    assert_eq!(rows.len(), 1000);
    let mut by_event = std::collections::HashMap::new();
    for r in &rows {
        by_event.insert(r.get::<_, String>(0), r.get::<_, String>(1));
    }
    for id in &acked {
        assert_eq!(by_event.get(id).map(String::as_str), Some("succeeded"), "acked event {id}");
    }
    // At least once: some steps that were in flight ran again, none was skipped.
    let keys: std::collections::HashSet<String> =
        receiver.received().iter().filter_map(|r| r.header("idempotency-key").map(str::to_string)).collect();
    assert_eq!(keys.len(), 1000);
}

#[actix_rt::test]
async fn two_daemons_share_a_database_without_running_an_execution_twice_at_once() {
    let pg = fresh_database().await;
    let url = pg_url(&pg);
    let receiver = Receiver::start().await;
    receiver.on("/work", Behaviour::Script(vec![Reply::new(200, "{}").after(Duration::from_millis(100))]));
    let ttl_ms = 1500u64;
    let env = vec![
        ("BOTFLOW_DATABASE__URL", url.clone()),
        ("BOTFLOW_LEASE__TTL_MS", ttl_ms.to_string()),
        ("BOTFLOW_EXECUTOR__CONCURRENCY_PER_CHATBOT", "4".to_string()),
    ];
    let (dir_a, dir_b) = (TempDir::new("node-a"), TempDir::new("node-b"));
    let mut a = serve(dir_a.path(), &env);
    let _b = serve(dir_b.path(), &env);
    let s = bootstrap(
        dir_a.path(),
        &env,
        json!({"name": "work", "trigger": {"event": "x.go"},
               "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/work")}]}),
    );
    let sock = |d: &TempDir| -> PathBuf { d.path().join("botflow.sock") };
    let mut ca = Client::unix(&sock(&dir_a)).await.hello(&s.key, &[]).await;
    let mut cb = Client::unix(&sock(&dir_b)).await.hello(&s.key, &[]).await;

    // The same 40 events to both: each runs once, on whichever recorded it first.
    let mut burst = String::new();
    for i in 0..40 {
        burst.push_str(&format!("{}\n", event(&format!("both{i}"), s.bot, "x.go", json!({}))));
    }
    ca.send_raw(&burst).await;
    cb.send_raw(&burst).await;
    let _ = ca.answers(40).await;
    let _ = cb.answers(40).await;
    // Then 80 to A only, which it is running when it dies.
    let mut burst = String::new();
    for i in 0..80 {
        burst.push_str(&format!("{}\n", event(&format!("a{i}"), s.bot, "x.go", json!({}))));
    }
    ca.send_raw(&burst).await;
    let _ = ca.answers(80).await;
    receiver.wait_for("/work", 50).await;
    a.kill9();
    let killed = Instant::now();

    let (db, conn) = pg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    eventually("the surviving daemon finishes everything", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
        n == 120
    })
    .await;

    // A's unfinished work went to B within the threshold: the TTL plus a scan.
    let hits = receiver.received();
    let takeover = hits
        .iter()
        .filter(|h| h.at > killed && h.header("x-botflow-lease-epoch").is_some_and(|e| e != "1"))
        .map(|h| h.at - killed)
        .min()
        .expect("some execution was taken over");
    assert!(takeover < Duration::from_millis(ttl_ms) + Duration::from_secs(3), "takeover took {takeover:?}");

    // Never two leases on one execution at once: for each idempotency key, a request
    // under a newer epoch starts after the older one ended (or after its node died).
    let mut by_key: std::collections::HashMap<String, Vec<&Received>> = std::collections::HashMap::new();
    for h in &hits {
        by_key.entry(h.header("idempotency-key").unwrap().to_string()).or_default().push(h);
    }
    assert_eq!(by_key.len(), 120, "every execution called the receiver");
    for (key, mut reqs) in by_key {
        reqs.sort_by_key(|r| r.at);
        for pair in reqs.windows(2) {
            let (old, new) = (pair[0], pair[1]);
            let old_epoch = old.header("x-botflow-lease-epoch").unwrap();
            let new_epoch = new.header("x-botflow-lease-epoch").unwrap();
            assert_ne!(old_epoch, new_epoch, "{key}: one lease sent the same step twice");
            let old_end = old.done.lock().unwrap().expect("the receiver answered every request");
            assert!(new.at >= old_end, "{key}: epoch {new_epoch} started while epoch {old_epoch} ran");
        }
    }
}

#[actix_rt::test]
async fn a_paused_daemon_loses_its_executions_and_does_not_run_them_when_it_wakes() {
    let pg = fresh_database().await;
    let url = pg_url(&pg);
    let receiver = Receiver::start().await;
    receiver.on("/work", Behaviour::Script(vec![Reply::new(200, "{}").after(Duration::from_millis(150))]));
    let ttl_ms = 1200u64;
    let env = vec![
        ("BOTFLOW_DATABASE__URL", url.clone()),
        ("BOTFLOW_LEASE__TTL_MS", ttl_ms.to_string()),
        ("BOTFLOW_EXECUTOR__CONCURRENCY_PER_CHATBOT", "4".to_string()),
    ];
    let (dir_a, dir_b) = (TempDir::new("pause-a"), TempDir::new("pause-b"));
    let a = serve(dir_a.path(), &env);
    let _b = serve(dir_b.path(), &env);
    let s = bootstrap(
        dir_a.path(),
        &env,
        json!({"name": "work", "trigger": {"event": "x.go"},
               "steps": [{"id": "one", "action": "webhook", "url": receiver.url("/work")},
                         {"id": "two", "action": "webhook", "url": receiver.url("/work")}]}),
    );
    let mut ca = Client::unix(&dir_a.path().join("botflow.sock")).await.hello(&s.key, &[]).await;
    let mut burst = String::new();
    for i in 0..40 {
        burst.push_str(&format!("{}\n", event(&format!("p{i}"), s.bot, "x.go", json!({}))));
    }
    ca.send_raw(&burst).await;
    let _ = ca.answers(40).await;
    receiver.wait_for("/work", 6).await;

    // A stops in the middle of its steps, long enough to be declared dead.
    let pid = a.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let paused = Instant::now();
    tokio::time::sleep(Duration::from_millis(ttl_ms * 3)).await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let resumed = Instant::now();

    let (db, conn) = pg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    eventually("every execution succeeds", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
        n == 40
    })
    .await;
    // Let A's woken tasks do whatever they would do.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let hits = receiver.received();
    assert!(
        hits.iter().any(|h| h.at > paused && h.at < resumed && h.header("x-botflow-lease-epoch") != Some("1")),
        "the other node took over while A was paused"
    );
    // For each step of each execution: no two leases sent it at the same time, and
    // after A woke it sent nothing under a lease it had lost.
    let mut by_step: std::collections::HashMap<(String, String), Vec<&Received>> = std::collections::HashMap::new();
    for h in &hits {
        let key = h.header("idempotency-key").unwrap().to_string();
        let epoch = h.header("x-botflow-lease-epoch").unwrap().to_string();
        by_step.entry((key, epoch)).or_default().push(h);
    }
    let mut by_key: std::collections::HashMap<String, Vec<&Received>> = std::collections::HashMap::new();
    for h in &hits {
        by_key.entry(h.header("idempotency-key").unwrap().to_string()).or_default().push(h);
    }
    for (key, mut reqs) in by_key {
        reqs.sort_by_key(|r| r.at);
        for pair in reqs.windows(2) {
            let (old, new) = (pair[0], pair[1]);
            if old.header("x-botflow-lease-epoch") == new.header("x-botflow-lease-epoch") {
                continue;
            }
            let old_end = old.done.lock().unwrap().expect("answered");
            assert!(new.at >= old_end, "{key}: two leases ran this step at once");
            assert!(
                !(new.at > resumed && new.header("x-botflow-lease-epoch") == Some("1")),
                "{key}: the woken node ran a step it no longer held"
            );
        }
    }
}
