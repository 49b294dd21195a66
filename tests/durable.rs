//! Durable execution in one daemon: retries with backoff, Retry-After, dead letters and
//! their replay, notifications, the outbox's redelivery, durable delays, versions,
//! timeouts, bounded memory, and a database restarted under load.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// (execution id, status, attempt, error) of an event's only execution.
async fn execution(db: &tokio_postgres::Client, event_id: &str) -> (Uuid, String, i32, Option<String>) {
    let r = db
        .query_one("SELECT id, status, attempt, error FROM executions WHERE event_id = $1", &[&event_id])
        .await
        .unwrap_or_else(|e| panic!("no single execution for {event_id}: {e}"));
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// Waits until the event's execution has one of `statuses`.
async fn wait_status(db: &tokio_postgres::Client, event_id: &str, statuses: &[&str]) -> (Uuid, String, i32, Option<String>) {
    let start = Instant::now();
    loop {
        if let Ok(Some(r)) = db.query_opt("SELECT id, status, attempt, error FROM executions WHERE event_id = $1", &[&event_id]).await {
            let status: String = r.get(1);
            if statuses.contains(&status.as_str()) {
                return (r.get(0), status, r.get(2), r.get(3));
            }
        }
        assert!(start.elapsed() < DEADLINE, "{event_id} did not reach {statuses:?}: {:?}", execution(db, event_id).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (step_id, attempt, status, error) of an execution's step rows in order.
async fn steps(db: &tokio_postgres::Client, execution: Uuid) -> Vec<(String, i32, String, Option<String>)> {
    db.query(
        "SELECT step_id, attempt, status, error FROM execution_steps WHERE execution_id = $1 ORDER BY attempt, step_index",
        &[&execution],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

fn hook_workflow(receiver: &Receiver, retry: Value) -> Value {
    json!({
        "name": "hook",
        "trigger": {"event": "x.go"},
        "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/hook"), "timeout_ms": 2000}],
        "retry": retry,
    })
}

async fn setup(tweak: impl FnOnce(&mut botflow::config::Config) + 'static, workflow: Value) -> (TestDaemon, Tenant, Client, tokio_postgres::Client) {
    let daemon = TestDaemon::start_with(DaemonOptions { tweak: Box::new(tweak), ..Default::default() }).await;
    let t = tenant(&daemon.store, "acme", 1).await;
    apply(&daemon.store, t.chatbots[0], workflow).await;
    let c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[t.chatbots[0]]).await;
    let db = daemon.db().await;
    (daemon, t, c, db)
}

async fn send(c: &mut Client, id: &str, bot: Uuid) {
    c.send(&event(id, bot, "x.go", json!({}))).await;
    let (a, _) = c.recv_until(|v| v["id"] == id).await;
    assert_eq!(a["op"], "ack", "{a}");
}

#[actix_rt::test]
async fn event_data_in_a_webhook_url_fills_one_segment_or_query_value_and_cannot_move_the_request() {
    let receiver = Receiver::start().await;
    let url = receiver.url("/tpl/{{event.data.p}}?q={{event.data.p}}");
    let workflow = json!({
        "name": "tpl",
        "trigger": {"event": "x.go"},
        "steps": [{"id": "call", "action": "webhook", "url": url, "timeout_ms": 2000}],
        "retry": {"max_attempts": 3, "initial_backoff_ms": 50, "jitter": false},
    });
    let (_daemon, t, mut c, db) = setup(|_| {}, workflow).await;
    let bot = t.chatbots[0];
    // What a chat's end user may type: path traversal, a query, a fragment, an encoded
    // slash, spaces and non-ASCII.
    c.send(&event("e1", bot, "x.go", json!({"p": "../../v1/chatbots?x=#frag %2F é"}))).await;
    let (a, _) = c.recv_until(|v| v["id"] == "e1").await;
    assert_eq!(a["op"], "ack", "{a}");
    wait_status(&db, "e1", &["succeeded"]).await;
    let encoded = "..%2F..%2Fv1%2Fchatbots%3Fx%3D%23frag%20%252F%20%C3%A9";
    let got = receiver.received();
    assert_eq!(got.len(), 1, "one request: {got:?}");
    assert_eq!(got[0].path, format!("/tpl/{encoded}?q={encoded}"));

    // A value that is a whole `..` segment would move the request up the path: the step
    // fails at once (no retry helps), naming the template, and nothing is sent.
    c.send(&event("e2", bot, "x.go", json!({"p": ".."}))).await;
    let (a, _) = c.recv_until(|v| v["id"] == "e2").await;
    assert_eq!(a["op"], "ack", "{a}");
    let (_, _, attempt, error) = wait_status(&db, "e2", &["failed"]).await;
    assert_eq!(attempt, 1);
    let error = error.unwrap_or_default();
    assert!(error.contains("{{event.data.p}}") && error.contains("path segment \"..\""), "{error}");
    assert_eq!(receiver.received().len(), 1, "no request for e2");
}

#[actix_rt::test]
async fn a_request_body_rendered_over_the_limit_fails_the_step_at_once_and_sends_nothing() {
    let receiver = Receiver::start().await;
    // A body that repeats one event field ten times: 10 KiB of data becomes 100 KiB.
    let body: serde_json::Map<String, Value> = (0..10).map(|i| (format!("f{i}"), json!("{{event.data.big}}"))).collect();
    let workflow = json!({
        "name": "echo",
        "trigger": {"event": "x.go"},
        "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/echo"), "body": body, "timeout_ms": 2000}],
        "retry": {"max_attempts": 3, "initial_backoff_ms": 50, "jitter": false},
    });
    let (_daemon, t, mut c, db) = setup(|c| c.executor.max_request_body_bytes = 64 * 1024, workflow).await;
    let bot = t.chatbots[0];
    c.send(&event("small", bot, "x.go", json!({"big": "x".repeat(1024)}))).await;
    c.send(&event("large", bot, "x.go", json!({"big": "x".repeat(10 * 1024)}))).await;
    let (_, _, attempt, error) = wait_status(&db, "large", &["failed"]).await;
    assert_eq!(attempt, 1, "no retry helps");
    let error = error.unwrap_or_default();
    assert!(error.contains("executor.max_request_body_bytes (65536)") && error.contains("nothing was sent"), "{error}");
    wait_status(&db, "small", &["succeeded"]).await;
    let got = receiver.received();
    assert_eq!(got.len(), 1, "only the small event's request: {got:?}");
    assert!(got[0].body.len() > 10 * 1024, "the small one carried its ten copies");
}

#[actix_rt::test]
async fn replies_nobody_acks_hold_no_executor_slot_so_the_chatbots_other_workflows_run() {
    let receiver = Receiver::start().await;
    let workflows = json!([
        {"name": "answer", "trigger": {"event": "x.ask"}, "steps": [{"id": "say", "action": "reply", "text": "hi {{event.id}}"}]},
        {"name": "hook", "trigger": {"event": "x.go"},
         "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/hook"), "timeout_ms": 2000}]},
    ]);
    let daemon = TestDaemon::start_with(DaemonOptions {
        tweak: Box::new(|c| c.outbox.ack_timeout_ms = 120_000),
        ..Default::default()
    })
    .await;
    let t = tenant(&daemon.store, "acme", 1).await;
    let bot = t.chatbots[0];
    apply(&daemon.store, bot, workflows).await;
    let db = daemon.db().await;
    let mut c = Client::unix(&daemon.unix()).await.hello(&t.key, &[]).await;
    // Many more replies than the chatbot's executor slots (8), with no client to ack them.
    const REPLIES: usize = 200;
    for i in 0..REPLIES {
        c.send(&event(&format!("r{i}"), bot, "x.ask", json!({}))).await;
    }
    let waiting = || async {
        db.query_one("SELECT count(*) FROM executions WHERE event_type = 'x.ask' AND status = 'running'", &[]).await.unwrap().get::<_, i64>(0)
    };
    eventually("every reply runs, waiting for an ack", || async { waiting().await == REPLIES as i64 }).await;
    let sent = Instant::now();
    c.send(&event("hook", bot, "x.go", json!({}))).await;
    wait_status(&db, "hook", &["succeeded"]).await;
    eprintln!("the webhook behind {REPLIES} unacked replies succeeded {:?} after its event", sent.elapsed());
    assert_eq!(receiver.count("/hook"), 1);
    assert_eq!(waiting().await, REPLIES as i64, "the replies still wait (their ack timeout is two minutes)");
    // A client comes and acks them all: each goes on as slots free, and succeeds.
    let mut chat = Client::unix(&daemon.unix()).await.hello(&t.key, &[bot]).await;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < REPLIES {
        let (cmd, _) = chat.recv_until(|v| v["op"] == "command").await;
        chat.send(&json!({"op": "ack", "command_id": cmd["command_id"]})).await;
        seen.insert(cmd["command_id"].as_str().unwrap().to_string());
    }
    eventually("every reply succeeds", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE event_type = 'x.ask' AND status = 'succeeded' AND attempt = 1", &[]).await.unwrap().get(0);
        n == REPLIES as i64
    })
    .await;
}

#[actix_rt::test]
async fn a_long_webhook_response_is_kept_cut_in_the_history_and_seen_whole_by_the_next_step() {
    let receiver = Receiver::start().await;
    // 200 KiB of JSON whose last field the next step uses.
    let big = json!({"rows": vec!["x".repeat(1000); 200], "tail": "found-at-the-end"}).to_string();
    receiver.on("/big", Behaviour::Status(200, big.clone()));
    let workflow = json!({
        "name": "long",
        "trigger": {"event": "x.go"},
        "steps": [
            {"id": "fetch", "action": "webhook", "url": receiver.url("/big"), "timeout_ms": 5000},
            {"id": "use", "action": "webhook", "url": receiver.url("/use"), "body": {"tail": "{{steps.fetch.response.tail}}"}, "timeout_ms": 5000},
        ],
    });
    let (_daemon, t, mut c, db) = setup(|_| {}, workflow).await;
    send(&mut c, "e1", t.chatbots[0]).await;
    let (id, _, _, _) = wait_status(&db, "e1", &["succeeded"]).await;
    let used = receiver.wait_for("/use", 1).await;
    assert_eq!(used[0].json()["tail"], "found-at-the-end", "the next step saw the whole response");
    let output: Value = db
        .query_one("SELECT output FROM execution_steps WHERE execution_id = $1 AND step_id = 'fetch'", &[&id])
        .await
        .unwrap()
        .get(0);
    let kept = output["response"].as_str().expect("the kept response is its text, cut");
    assert_eq!(kept.len(), 64 * 1024);
    assert!(big.starts_with(kept));
    assert_eq!(output["response_cut"], json!({"bytes": big.len(), "kept": 64 * 1024}));
    let row_bytes: i32 = db.query_one("SELECT pg_column_size(outputs) FROM executions WHERE id = $1", &[&id]).await.unwrap().get(0);
    assert!(row_bytes < 100 * 1024, "the execution's outputs hold the excerpt too ({row_bytes} bytes)");
}

#[actix_rt::test]
async fn a_webhook_answering_500_500_200_succeeds_on_attempt_3_after_the_policy_waits() {
    let receiver = Receiver::start().await;
    receiver.on("/hook", Behaviour::Script(vec![Reply::new(500, "{}"), Reply::new(500, "{}"), Reply::new(200, r#"{"ok":1}"#)]));
    let retry = json!({"max_attempts": 5, "initial_backoff_ms": 300, "max_backoff_ms": 10000, "jitter": false});
    let (_d, t, mut c, db) = setup(|_| {}, hook_workflow(&receiver, retry)).await;
    send(&mut c, "e1", t.chatbots[0]).await;
    let (id, status, attempt, _) = wait_status(&db, "e1", &["succeeded", "dead", "failed"]).await;
    assert_eq!((status.as_str(), attempt), ("succeeded", 3));
    let hits = receiver.received();
    assert_eq!(hits.len(), 3);
    // One idempotency key for every attempt, and the attempt number on each.
    let keys: Vec<&str> = hits.iter().map(|h| h.header("idempotency-key").unwrap()).collect();
    assert!(keys.iter().all(|k| *k == format!("{id}:call")), "{keys:?}");
    let attempts: Vec<&str> = hits.iter().map(|h| h.header("x-botflow-attempt").unwrap()).collect();
    assert_eq!(attempts, vec!["1", "2", "3"]);
    // Exponential without jitter: 300 ms, then 600 ms.
    let gap1 = hits[1].at - hits[0].at;
    let gap2 = hits[2].at - hits[1].at;
    assert!(gap1 >= Duration::from_millis(300) && gap1 < Duration::from_millis(3000), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(600) && gap2 < Duration::from_millis(3600), "{gap2:?}");
    let s = steps(&db, id).await;
    let summary: Vec<(i32, &str)> = s.iter().map(|(_, a, st, _)| (*a, st.as_str())).collect();
    assert_eq!(summary, vec![(1, "failed"), (2, "failed"), (3, "succeeded")]);
    assert!(s[0].3.as_deref().unwrap().contains("500"), "{s:?}");
}

#[actix_rt::test]
async fn a_404_fails_at_once_and_a_429_waits_for_its_retry_after() {
    let receiver = Receiver::start().await;
    let retry = json!({"max_attempts": 3, "initial_backoff_ms": 50, "jitter": false});
    let wf = json!([
        {"name": "lost", "trigger": {"event": "x.lost"},
         "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/lost")}], "retry": retry},
        {"name": "busy", "trigger": {"event": "x.busy"},
         "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/busy")}], "retry": retry},
    ]);
    receiver.on("/lost", Behaviour::Status(404, r#"{"error":"no such thing"}"#.into()));
    receiver.on("/busy", Behaviour::Script(vec![Reply::new(429, "{}").header("Retry-After", "2"), Reply::new(200, "{}")]));
    let (_d, t, mut c, db) = setup(|_| {}, wf).await;
    c.send(&event("lost-1", t.chatbots[0], "x.lost", json!({}))).await;
    c.send(&event("busy-1", t.chatbots[0], "x.busy", json!({}))).await;
    let _ = c.answers(2).await;

    let (_, status, attempt, error) = wait_status(&db, "lost-1", &["failed", "dead", "succeeded"]).await;
    assert_eq!((status.as_str(), attempt), ("failed", 1), "a 404 is not retried");
    assert!(error.unwrap().contains("404"));
    assert_eq!(receiver.count("/lost"), 1);

    let (_, status, attempt, _) = wait_status(&db, "busy-1", &["failed", "dead", "succeeded"]).await;
    assert_eq!((status.as_str(), attempt), ("succeeded", 2));
    let hits = receiver.wait_for("/busy", 2).await;
    let gap = hits[1].at - hits[0].at;
    assert!(gap >= Duration::from_secs(2), "Retry-After: 2 was not honoured: {gap:?}");
}

#[actix_rt::test]
async fn always_500_ends_dead_with_one_dead_letter_and_one_notification_and_replay_succeeds() {
    let receiver = Receiver::start().await;
    receiver.on("/hook", Behaviour::Status(500, r#"{"error":"down"}"#.into()));
    let notify = receiver.url("/notify");
    let retry = json!({"max_attempts": 3, "initial_backoff_ms": 50, "max_backoff_ms": 100});
    let (d, t, mut c, db) = setup(move |c| c.notify.webhook_url = notify, hook_workflow(&receiver, retry)).await;
    send(&mut c, "e1", t.chatbots[0]).await;
    let (id, status, attempt, error) = wait_status(&db, "e1", &["dead", "failed", "succeeded"]).await;
    assert_eq!((status.as_str(), attempt), ("dead", 3));
    assert!(error.as_deref().unwrap_or_default().contains("500"), "{error:?}");
    assert_eq!(receiver.count("/hook"), 3);

    let dls = botflow::store::dead_letters::list(&d.store, &open_of(Some(t.chatbots[0])), None, 10).await.unwrap();
    assert_eq!(dls.len(), 1);
    let dl = &dls[0];
    assert_eq!((dl.execution_id, dl.attempts), (id, 3));
    assert_eq!(dl.event["id"], "e1");
    assert_eq!(dl.history.as_array().unwrap().len(), 3, "every attempt is in the history: {}", dl.history);
    assert!(dl.last_error.as_deref().unwrap().contains("500"));

    // One notification for the burst of failures, naming the dead execution.
    let notes = receiver.wait_for("/notify", 1).await;
    assert!(receiver.stays_at("/notify", 1, Duration::from_millis(500)).await, "only one notification");
    let n = notes[0].json();
    assert_eq!(n["kind"], "dead_execution");
    assert_eq!(n["execution_id"], id.to_string());
    assert_eq!(n["count"], 1);

    // Fixed receiver, replay: one more attempt of the same execution succeeds.
    receiver.on("/hook", Behaviour::Status(200, "{}".into()));
    let replayed = botflow::store::dead_letters::replay(&d.store, dl.id, "tester").await.unwrap();
    assert_eq!(replayed.replayed_by.as_deref(), Some("tester"));
    let (id2, status, attempt, _) = wait_status(&db, "e1", &["succeeded", "dead"]).await;
    assert_eq!((id2, status.as_str(), attempt), (id, "succeeded", 4));
    assert!(botflow::store::dead_letters::replay(&d.store, dl.id, "tester").await.is_err(), "a replayed letter cannot be replayed again");
    assert!(botflow::store::dead_letters::list(&d.store, &open_of(None), None, 10).await.unwrap().is_empty());
}

#[actix_rt::test]
async fn a_discarded_dead_letter_records_who_and_when() {
    let receiver = Receiver::start().await;
    receiver.on("/hook", Behaviour::Status(503, "{}".into()));
    let retry = json!({"max_attempts": 1});
    let (d, t, mut c, db) = setup(|_| {}, hook_workflow(&receiver, retry)).await;
    send(&mut c, "e1", t.chatbots[0]).await;
    wait_status(&db, "e1", &["dead"]).await;
    let dl = &botflow::store::dead_letters::list(&d.store, &open_of(None), None, 10).await.unwrap()[0];
    let gone = botflow::store::dead_letters::discard(&d.store, dl.id, "ops-alice").await.unwrap();
    assert_eq!(gone.discarded_by.as_deref(), Some("ops-alice"));
    assert!(gone.discarded_at.is_some());
    assert_eq!(gone.state(), "discarded");
    assert!(botflow::store::dead_letters::replay(&d.store, dl.id, "x").await.is_err());
    assert_eq!(botflow::store::dead_letters::list(&d.store, &botflow::store::dead_letters::Filter { state: botflow::store::dead_letters::State::All, ..Default::default() }, None, 10).await.unwrap().len(), 1);
}

#[actix_rt::test]
async fn a_reply_is_redelivered_after_a_reconnect_until_it_is_acked() {
    let (d, t, mut c, db) = setup(
        |_| {},
        json!({"name": "r", "trigger": {"event": "x.go"}, "steps": [{"id": "say", "action": "reply", "text": "hi {{event.id}}"}]}),
    )
    .await;
    let bot = t.chatbots[0];
    send(&mut c, "e1", bot).await;
    let (cmd, _) = c.recv_until(|v| v["op"] == "command").await;
    assert_eq!(cmd["payload"]["text"], "hi e1");
    drop(c); // gone before acking
    // The command stays pending, and the step waits for an ack. It is written to the
    // connections before its row commits (the journal writes it in the next batch).
    let id = cmd["command_id"].as_str().unwrap().to_string();
    let outbox_status = || async {
        db.query_opt("SELECT status FROM outbox WHERE command_id = $1", &[&id]).await.unwrap().map(|r| r.get::<_, String>(0))
    };
    eventually("the command's outbox row commits", || async { outbox_status().await.is_some() }).await;
    assert_eq!(outbox_status().await.as_deref(), Some("pending"));
    let (_, status, _, _) = execution(&db, "e1").await;
    assert!(matches!(status.as_str(), "queued" | "running"), "{status}");

    let mut c2 = Client::unix(&d.unix()).await.hello(&t.key, &[bot]).await;
    let (again, _) = c2.recv_until(|v| v["op"] == "command").await;
    assert_eq!(again["command_id"], cmd["command_id"], "the same command, redelivered");
    c2.send(&json!({"op": "ack", "command_id": again["command_id"]})).await;
    wait_status(&db, "e1", &["succeeded"]).await;
    assert_eq!(outbox_status().await.as_deref(), Some("acked"));
    drop(c2);
    let mut c3 = Client::tcp(d.tcp()).await.hello(&t.key, &[bot]).await;
    assert!(c3.try_recv(Duration::from_millis(500)).await.is_none(), "an acked command never comes back");
}

/// The announcements on the channel commands and acks go through between daemons.
struct Announcements {
    _client: tokio_postgres::Client,
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Announcements {
    async fn listen(pg: &tokio_postgres::Config) -> Announcements {
        let (client, mut conn) = pg.connect(tokio_postgres::NoTls).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(message)) = futures::future::poll_fn(|cx| conn.poll_message(cx)).await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n.payload().to_string());
                }
            }
        });
        client.batch_execute("LISTEN botflow_commands").await.unwrap();
        Announcements { _client: client, rx }
    }

    async fn wait_for(&mut self, payload: &str) {
        let found = tokio::time::timeout(DEADLINE, async {
            while let Some(p) = self.rx.recv().await {
                if p == payload {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "no announcement {payload:?}");
    }
}

/// Holds the journal's writes of commands' rows (and only those) uncommitted: an insert
/// into the outbox waits for an advisory lock this session takes, until
/// `SELECT pg_advisory_unlock(4242)`.
async fn hold_outbox_rows(db: &tokio_postgres::Client) {
    db.batch_execute(
        "CREATE FUNCTION hold_outbox() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NEW; END $$;
         CREATE TRIGGER hold_outbox BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION hold_outbox();
         SELECT pg_advisory_lock(4242);",
    )
    .await
    .unwrap();
}

#[actix_rt::test]
async fn a_client_subscribing_before_the_commands_row_commits_still_gets_it() {
    let (d, t, mut c, db) = setup(
        |_| {},
        json!({"name": "r", "trigger": {"event": "x.go"}, "steps": [{"id": "say", "action": "reply", "text": "hi {{event.id}}"}]}),
    )
    .await;
    let bot = t.chatbots[0];
    hold_outbox_rows(&db).await;
    send(&mut c, "e1", bot).await;
    let (cmd, _) = c.recv_until(|v| v["op"] == "command").await;
    drop(c);
    let id = cmd["command_id"].as_str().unwrap().to_string();
    let rows: i64 = db.query_one("SELECT count(*) FROM outbox WHERE command_id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!(rows, 0, "the row is not committed yet");

    let mut c2 = Client::unix(&d.unix()).await.hello(&t.key, &[bot]).await;
    let (again, _) = c2.recv_until(|v| v["op"] == "command").await;
    assert_eq!(again["command_id"], cmd["command_id"], "redelivered from memory");
    c2.send(&json!({"op": "ack", "command_id": again["command_id"]})).await;
    db.batch_execute("SELECT pg_advisory_unlock(4242)").await.unwrap();
    wait_status(&db, "e1", &["succeeded"]).await;
    let status: String = db.query_one("SELECT status FROM outbox WHERE command_id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!(status, "acked");
}

/// Two daemons, A and B, on one database; a reply workflow (`hi <event id>`) on the
/// tenant's chatbot, and a client of A subscribed to it. The ack timeout is longer
/// than any wait of a test: a step that goes on was acked, not timed out.
async fn two_daemons() -> (TestDaemon, TestDaemon, Tenant, Client, tokio_postgres::Client) {
    let slow_timeout = |c: &mut botflow::config::Config| c.outbox.ack_timeout_ms = 120_000;
    let (a, t, sender, db) = setup(
        slow_timeout,
        json!({"name": "r", "trigger": {"event": "x.go"}, "steps": [{"id": "say", "action": "reply", "text": "hi {{event.id}}"}]}),
    )
    .await;
    let b = TestDaemon::start_with(DaemonOptions { pg: Some(a.pg.clone()), tweak: Box::new(slow_timeout) }).await;
    (a, b, t, sender, db)
}

#[actix_rt::test]
async fn a_command_reaches_a_client_of_another_daemon_and_its_ack_comes_back() {
    let (_a, b, t, mut sender, db) = two_daemons().await;
    let bot = t.chatbots[0];
    // The chat service's connection is to daemon B; the event goes in through A.
    let mut chat = Client::unix(&b.unix()).await.hello(&t.key, &[bot]).await;
    send(&mut sender, "e1", bot).await;
    let (cmd, _) = chat.recv_until(|v| v["op"] == "command").await;
    assert_eq!(cmd["payload"]["text"], "hi e1");
    let owner: Uuid = db.query_one("SELECT lease_owner FROM executions WHERE event_id = 'e1'", &[]).await.unwrap().get(0);
    let b_node: Uuid = std::fs::read_to_string(b.config.data_dir.join("node.id")).unwrap().trim().parse().unwrap();
    assert_ne!(owner, b_node, "A runs the step");
    chat.send(&json!({"op": "ack", "command_id": cmd["command_id"]})).await;
    wait_status(&db, "e1", &["succeeded"]).await;
    let status: String =
        db.query_one("SELECT status FROM outbox WHERE command_id = $1", &[&cmd["command_id"].as_str().unwrap()]).await.unwrap().get(0);
    assert_eq!(status, "acked");
    // A's own subscriber got it too, and B's client does not get it again.
    let (own, _) = sender.recv_until(|v| v["op"] == "command").await;
    assert_eq!(own["command_id"], cmd["command_id"]);
    assert!(chat.try_recv(Duration::from_millis(500)).await.is_none(), "delivered once to B's client");
}

#[actix_rt::test]
async fn a_burst_of_commands_reaches_a_client_of_another_daemon_whole() {
    let (_a, b, t, mut sender, db) = two_daemons().await;
    let bot = t.chatbots[0];
    let mut chat = Client::tcp(b.tcp()).await.hello(&t.key, &[bot]).await;
    const N: usize = 40;
    for i in 0..N {
        sender.send(&event(&format!("e{i}"), bot, "x.go", json!({}))).await;
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < N {
        let (cmd, _) = chat.recv_until(|v| v["op"] == "command").await;
        chat.send(&json!({"op": "ack", "command_id": cmd["command_id"]})).await;
        seen.insert(cmd["payload"]["text"].as_str().unwrap().to_string());
    }
    let expected: std::collections::HashSet<String> = (0..N).map(|i| format!("hi e{i}")).collect();
    assert_eq!(seen, expected);
    eventually("every execution succeeds on its acks from B", || async {
        let done: i64 = db.query_one("SELECT count(*) FROM executions WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
        done == N as i64
    })
    .await;
}

#[actix_rt::test]
async fn a_command_announced_while_a_listener_is_away_reaches_its_clients_when_it_is_back() {
    let (_a, b, t, mut sender, db) = two_daemons().await;
    let bot = t.chatbots[0];
    let mut chat = Client::tcp(b.tcp()).await.hello(&t.key, &[bot]).await;
    hold_outbox_rows(&db).await;
    send(&mut sender, "e1", bot).await;
    let (cmd, _) = sender.recv_until(|v| v["op"] == "command").await;
    // Both daemons' change listeners lose their connections (they come back after half
    // a second); the command's row commits, and is announced, meanwhile.
    let cut: i64 = db
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cut, 2, "one listener per daemon");
    db.batch_execute("SELECT pg_advisory_unlock(4242)").await.unwrap();
    // B missed the announcement; once its listener is back it writes what is pending.
    let (got, _) = chat.recv_until(|v| v["op"] == "command").await;
    assert_eq!(got["command_id"], cmd["command_id"]);
    chat.send(&json!({"op": "ack", "command_id": got["command_id"]})).await;
    wait_status(&db, "e1", &["succeeded"]).await;
}

#[actix_rt::test]
async fn an_ack_announced_while_the_steps_daemon_is_not_listening_lets_the_step_go_on_when_it_is_back() {
    let (_a, b, t, mut sender, db) = two_daemons().await;
    let bot = t.chatbots[0];
    let mut chat = Client::tcp(b.tcp()).await.hello(&t.key, &[bot]).await;
    send(&mut sender, "e1", bot).await;
    let (cmd, _) = chat.recv_until(|v| v["op"] == "command").await;
    let id = cmd["command_id"].as_str().unwrap().to_string();
    // Keep every change listener away while B's client acks: A, whose step waits for
    // the ack (for two minutes), never hears B's announcement of it.
    let cutter = cut_listeners_until_stopped(&b).await;
    chat.send(&json!({"op": "ack", "command_id": id})).await;
    eventually("B records the ack", || async {
        let status: String = db.query_one("SELECT status FROM outbox WHERE command_id = $1", &[&id]).await.unwrap().get(0);
        status == "acked"
    })
    .await;
    let (_, status, _, _) = execution(&db, "e1").await;
    assert_ne!(status, "succeeded", "A cannot have heard the ack");
    cutter.stop().await;
    // Back, A reads which of the commands it waits for were acked meanwhile.
    wait_status(&db, "e1", &["succeeded"]).await;
}

/// Terminates the daemons' change listeners over and over (they come back after half
/// a second) until stopped.
struct ListenerCutter {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl ListenerCutter {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

async fn cut_listeners_until_stopped(daemon: &TestDaemon) -> ListenerCutter {
    let db = daemon.db().await;
    let cut = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
               WHERE datname = current_database() AND query LIKE 'LISTEN%'";
    let first: i64 = db.query_one(cut, &[]).await.unwrap().get(0);
    assert_eq!(first, 2, "one listener per daemon");
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        loop {
            db.execute(cut, &[]).await.unwrap();
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    ListenerCutter { stop, task }
}

#[actix_rt::test]
async fn an_ack_through_another_daemon_before_the_commands_row_commits_reaches_the_step_for_its_account_only() {
    let (a, b, t, mut chat_a, db) = two_daemons().await;
    let other = tenant(&a.store, "other", 1).await;
    let bot = t.chatbots[0];
    let mut chat_b = Client::tcp(b.tcp()).await.hello(&t.key, &[]).await;
    let mut stranger_b = Client::tcp(b.tcp()).await.hello(&other.key, &[]).await;

    let mut announced = Announcements::listen(&a.pg).await;

    // The command's row is held uncommitted on A.
    hold_outbox_rows(&db).await;
    send(&mut chat_a, "e1", bot).await;
    let (cmd, _) = chat_a.recv_until(|v| v["op"] == "command").await;
    let id = cmd["command_id"].as_str().unwrap().to_string();
    // Another account's client acks it through B: A must not take that.
    stranger_b.send(&json!({"op": "ack", "command_id": id})).await;
    announced.wait_for(&format!("ack {} {id}", other.account)).await;
    let rows: i64 = db.query_one("SELECT count(*) FROM outbox WHERE command_id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!(rows, 0, "the row is not committed yet");
    db.batch_execute("SELECT pg_advisory_unlock(4242)").await.unwrap();
    let outbox_status = || async {
        db.query_opt("SELECT status FROM outbox WHERE command_id = $1", &[&id]).await.unwrap().map(|r| r.get::<_, String>(0))
    };
    eventually("the command's row commits", || async { outbox_status().await.is_some() }).await;
    // The stranger's ack was announced before the commit; give A time to (wrongly) use it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(outbox_status().await.as_deref(), Some("pending"), "another account's ack was taken");
    let (_, status, _, _) = execution(&db, "e1").await;
    assert_ne!(status, "succeeded");

    // Now the owner's ack through B, again before the row of a second command commits.
    db.batch_execute("SELECT pg_advisory_lock(4242)").await.unwrap();
    send(&mut chat_a, "e2", bot).await;
    let (cmd2, _) = chat_a.recv_until(|v| v["op"] == "command" && v["command_id"] != cmd["command_id"]).await;
    let id2 = cmd2["command_id"].as_str().unwrap().to_string();
    chat_b.send(&json!({"op": "ack", "command_id": id2})).await;
    chat_b.send(&json!({"op": "ack", "command_id": id})).await;
    // B's announcement of the ack is out before A's row exists.
    announced.wait_for(&format!("ack {} {id2}", t.account)).await;
    let rows: i64 = db.query_one("SELECT count(*) FROM outbox WHERE command_id = $1", &[&id2]).await.unwrap().get(0);
    assert_eq!(rows, 0, "the second row is not committed yet");
    db.batch_execute("SELECT pg_advisory_unlock(4242)").await.unwrap();
    wait_status(&db, "e2", &["succeeded"]).await;
    wait_status(&db, "e1", &["succeeded"]).await;
    for c in [&id, &id2] {
        let status: String = db.query_one("SELECT status FROM outbox WHERE command_id = $1", &[c]).await.unwrap().get(0);
        assert_eq!(status, "acked", "{c}");
    }
}

#[actix_rt::test]
async fn a_chat_service_that_never_acks_fails_the_step_after_the_ack_timeout() {
    let (_d, t, mut c, db) = setup(
        |c| c.outbox.ack_timeout_ms = 300,
        json!({"name": "r", "trigger": {"event": "x.go"}, "retry": {"max_attempts": 2, "initial_backoff_ms": 10},
               "steps": [{"id": "say", "action": "reply", "text": "hi"}]}),
    )
    .await;
    send(&mut c, "e1", t.chatbots[0]).await;
    let (_, status, attempt, error) = wait_status(&db, "e1", &["dead", "succeeded"]).await;
    assert_eq!((status.as_str(), attempt), ("dead", 2));
    assert!(error.unwrap().contains("no client acked command"), "the error says why");
    // Both attempts delivered the same command id.
    let mut ids = Vec::new();
    while ids.len() < 2 {
        let (cmd, _) = c.recv_until(|v| v["op"] == "command").await;
        ids.push(cmd["command_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids[0], ids[1]);
}

#[actix_rt::test]
async fn a_delay_waits_durably_and_executions_keep_the_version_they_started_with() {
    let receiver = Receiver::start().await;
    let wf = |marker: &str| {
        json!({"name": "later", "trigger": {"event": "x.go"},
               "steps": [{"id": "wait", "action": "delay", "duration": "1500ms"},
                         {"id": "call", "action": "webhook", "url": receiver.url("/later"), "body": {"v": marker}}]})
    };
    let (d, t, mut c, db) = setup(|_| {}, wf("v1")).await;
    let sent = Instant::now();
    send(&mut c, "e1", t.chatbots[0]).await;
    let (id, _, _, _) = wait_status(&db, "e1", &["waiting"]).await;
    let run_after: chrono::DateTime<chrono::Utc> =
        db.query_one("SELECT run_after FROM executions WHERE id = $1", &[&id]).await.unwrap().get(0);
    assert!(run_after > chrono::Utc::now(), "the due time is stored");
    // Replace the workflow while the execution waits: it finishes on version 1.
    apply(&d.store, t.chatbots[0], wf("v2")).await;
    let hits = receiver.wait_for("/later", 1).await;
    assert_eq!(hits[0].json()["v"], "v1");
    assert!(hits[0].at - sent >= Duration::from_millis(1500), "fired before its time");
    assert!(hits[0].at - sent < Duration::from_millis(1500 + 1000), "fired more than a second late");
    wait_status(&db, "e1", &["succeeded"]).await;
    // A new event runs the new version.
    send(&mut c, "e2", t.chatbots[0]).await;
    let hits = receiver.wait_for("/later", 2).await;
    assert_eq!(hits[1].json()["v"], "v2");
}

#[actix_rt::test]
async fn templates_reading_missing_fields_or_non_json_answers_fail_the_step_clearly() {
    let receiver = Receiver::start().await;
    receiver.on("/text", Behaviour::Status(200, "plain words, not JSON".into()));
    let (_d, t, mut c, db) = setup(
        |_| {},
        json!({"name": "chain", "trigger": {"event": "x.go"}, "retry": {"max_attempts": 3, "initial_backoff_ms": 10},
               "steps": [{"id": "first", "action": "webhook", "url": receiver.url("/text")},
                         {"id": "second", "action": "webhook", "url": receiver.url("/next"),
                          "body": {"id": "{{steps.first.response.id}}"}}]}),
    )
    .await;
    send(&mut c, "e1", t.chatbots[0]).await;
    let (id, status, attempt, error) = wait_status(&db, "e1", &["failed", "dead", "succeeded"]).await;
    assert_eq!((status.as_str(), attempt), ("failed", 1), "a template error is not retried");
    let error = error.unwrap();
    assert!(error.contains("second") && error.contains("first") && error.contains("id"), "{error}");
    assert_eq!(receiver.count("/next"), 0);
    let s = steps(&db, id).await;
    assert_eq!(s.iter().map(|x| x.2.as_str()).collect::<Vec<_>>(), vec!["succeeded", "failed"]);
}

#[actix_rt::test]
async fn a_whole_execution_timeout_ends_a_hanging_attempt() {
    let receiver = Receiver::start().await;
    receiver.on("/hang", Behaviour::Hang);
    let (_d, t, mut c, db) = setup(
        |_| {},
        json!({"name": "slow", "trigger": {"event": "x.go"}, "timeout_ms": 400, "retry": {"max_attempts": 1},
               "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/hang"), "timeout_ms": 30000}]}),
    )
    .await;
    let start = Instant::now();
    send(&mut c, "e1", t.chatbots[0]).await;
    let (_, status, _, error) = wait_status(&db, "e1", &["dead", "failed"]).await;
    assert_eq!(status, "dead");
    assert!(error.unwrap().contains("execution timed out after 400 ms"));
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[actix_rt::test]
async fn executions_past_the_memory_bound_wait_as_queued_rows_and_all_complete() {
    let receiver = Receiver::start().await;
    // Slow while the queue is looked at, so that few executions finish before.
    receiver.on("/slow", Behaviour::Script(vec![Reply::new(200, "{}").after(Duration::from_secs(2))]));
    let (_d, t, mut c, db) = setup(
        |c| {
            c.executor.concurrency_per_chatbot = 2;
            c.executor.queue_capacity = 5;
        },
        json!({"name": "w", "trigger": {"event": "x.go"}, "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/slow")}]}),
    )
    .await;
    let mut burst = String::new();
    for i in 0..60 {
        burst.push_str(&format!("{}\n", event(&format!("e{i}"), t.chatbots[0], "x.go", json!({}))));
    }
    c.send_raw(&burst).await;
    let (answers, _) = c.answers(60).await;
    assert!(answers.values().all(|a| a["op"] == "ack"), "none is refused");
    // Most of them wait in PostgreSQL, held by no node, not in the daemon's memory.
    let free: i64 = db
        .query_one("SELECT count(*) FROM executions WHERE status = 'queued' AND lease_owner IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(free >= 40, "only {free} executions wait unleased");
    receiver.on("/slow", Behaviour::Script(vec![Reply::new(200, "{}").after(Duration::from_millis(30))]));
    eventually("all 60 complete", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
        n == 60
    })
    .await;
    assert_eq!(receiver.count("/slow"), 60, "each ran once");
}

#[actix_rt::test]
async fn the_database_restarted_mid_run_and_the_daemon_recovers_by_itself() {
    let dir = TempDir::new("pgrestart");
    let opts = botflow::postgres::EmbeddedOptions { fast_unsafe: true, ..Default::default() };
    let mut pg = botflow::postgres::EmbeddedPostgres::start(dir.path(), &opts).unwrap();
    pg.ensure_database("botflow").await.unwrap();
    let receiver = Receiver::start().await;
    let daemon = TestDaemon::start_with(DaemonOptions {
        pg: Some(pg.config("botflow")),
        tweak: Box::new(|c| c.database.unavailable_after_ms = 500),
    })
    .await;
    let t = tenant(&daemon.store, "acme", 1).await;
    apply(
        &daemon.store,
        t.chatbots[0],
        json!({"name": "w", "trigger": {"event": "x.go"},
               "steps": [{"id": "wait", "action": "delay", "duration": "1s"},
                         {"id": "call", "action": "webhook", "url": receiver.url("/after")}]}),
    )
    .await;
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    for i in 0..20 {
        c.send(&event(&format!("e{i}"), t.chatbots[0], "x.go", json!({}))).await;
    }
    let (answers, _) = c.answers(20).await;
    assert!(answers.values().all(|a| a["op"] == "ack"));
    // Down while every execution waits on its delay, for longer than the delay.
    pg.stop().unwrap();
    c.send(&event("during", t.chatbots[0], "x.go", json!({}))).await;
    let a = c.recv().await;
    assert_eq!((a["op"].as_str(), a["error"]["code"].as_str()), (Some("nack"), Some("unavailable")), "{a}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pg = botflow::postgres::EmbeddedPostgres::start(dir.path(), &opts).unwrap();
    let (db, conn) = pg.config("botflow").connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    eventually("every execution completes after the restart", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
        n == 20
    })
    .await;
    assert_eq!(receiver.count("/after"), 20);
    let during: i64 = db.query_one("SELECT count(*) FROM executions WHERE event_id = 'during'", &[]).await.unwrap().get(0);
    assert_eq!(during, 0, "nothing was acked while the database was away");
}

#[actix_rt::test]
async fn a_burst_of_dead_executions_gets_one_notification_and_one_summary() {
    let receiver = Receiver::start().await;
    receiver.on("/hook", Behaviour::Status(500, "{}".into()));
    let notify = receiver.url("/notify");
    let (_d, t, mut c, db) = setup(
        move |c| {
            c.notify.webhook_url = notify;
            c.notify.window_seconds = 2;
        },
        hook_workflow(&receiver, json!({"max_attempts": 1})),
    )
    .await;
    for i in 0..4 {
        send(&mut c, &format!("e{i}"), t.chatbots[0]).await;
    }
    eventually("all four die", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE status = 'dead'", &[]).await.unwrap().get(0);
        n == 4
    })
    .await;
    let first = receiver.wait_for("/notify", 1).await;
    let first: Vec<Value> = first.iter().map(|r| r.json()).filter(|n| n["kind"] == "dead_execution").collect();
    // The first death is told at once, alone (the rest are counted for the summary).
    assert_eq!(first[0]["count"], 1, "{first:?}");
    // When the window closes, one summary carries the count of the rest.
    eventually("the window's summary", || async {
        receiver.received().iter().filter(|r| r.json()["kind"] == "dead_execution").count() >= 2
    })
    .await;
    let dead: Vec<Value> = receiver.received().iter().map(|r| r.json()).filter(|n| n["kind"] == "dead_execution").collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[1]["count"], 3);
    assert!(receiver.stays_at("/notify", receiver.count("/notify"), Duration::from_millis(2500)).await, "nothing more");
}

#[actix_rt::test]
async fn executions_running_through_a_database_outage_longer_than_the_lease_finish_once_it_returns() {
    let dir = TempDir::new("pgoutage");
    let opts = botflow::postgres::EmbeddedOptions { fast_unsafe: true, ..Default::default() };
    let mut pg = botflow::postgres::EmbeddedPostgres::start(dir.path(), &opts).unwrap();
    pg.ensure_database("botflow").await.unwrap();
    let receiver = Receiver::start().await;
    receiver.on("/slow", Behaviour::Script(vec![Reply::new(200, "{}").after(Duration::from_millis(300))]));
    let daemon = TestDaemon::start_with(DaemonOptions {
        pg: Some(pg.config("botflow")),
        tweak: Box::new(|c| {
            c.database.unavailable_after_ms = 500;
            c.lease.ttl_ms = 1500;
        }),
    })
    .await;
    let t = tenant(&daemon.store, "acme", 1).await;
    apply(
        &daemon.store,
        t.chatbots[0],
        json!({"name": "w", "trigger": {"event": "x.go"},
               "steps": [{"id": "a", "action": "webhook", "url": receiver.url("/slow")},
                         {"id": "b", "action": "webhook", "url": receiver.url("/slow")}]}),
    )
    .await;
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    for i in 0..16 {
        c.send(&event(&format!("e{i}"), t.chatbots[0], "x.go", json!({}))).await;
    }
    let (answers, _) = c.answers(16).await;
    assert!(answers.values().all(|a| a["op"] == "ack"));
    receiver.wait_for("/slow", 4).await;
    // Away for twice the lease TTL while steps are in flight.
    pg.stop().unwrap();
    c.send(&event("during", t.chatbots[0], "x.go", json!({}))).await;
    let a = c.recv().await;
    assert_eq!(a["error"]["code"], "unavailable", "{a}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pg = botflow::postgres::EmbeddedPostgres::start(dir.path(), &opts).unwrap();
    let (db, conn) = pg.config("botflow").connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    eventually("all executions succeed after the outage", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
        n == 16
    })
    .await;
    let steps: i64 = db.query_one("SELECT count(DISTINCT (execution_id, step_index)) FROM execution_steps WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
    assert_eq!(steps, 32, "every step of every execution is recorded");
    let during: i64 = db.query_one("SELECT count(*) FROM executions WHERE event_id = 'during'", &[]).await.unwrap().get(0);
    assert_eq!(during, 0);
}

/// Open dead letters, of one chatbot or of all.
fn open_of(chatbot_id: Option<uuid::Uuid>) -> botflow::store::dead_letters::Filter {
    botflow::store::dead_letters::Filter { chatbot_id, ..Default::default() }
}
