//! Data retention as an operator meets it: the daemon's pruner deletes finished
//! executions (with their steps and commands), dead letters and acked commands past
//! their retention, in batches, and keeps what is younger, unfinished, still covered by
//! a kept dead letter, or of a chatbot that keeps its history forever;
//! `botflow prune --dry-run` counts and deletes nothing; the admin API sets a chatbot's
//! own retention, an owner only below the defaults.

mod common;

use botflow::store::accounts::{self, Role};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

/// Event ids of a chatbot's executions, sorted.
async fn executions_of(db: &tokio_postgres::Client, bot: Uuid) -> Vec<String> {
    let rows = db.query("SELECT event_id FROM executions WHERE chatbot_id = $1 ORDER BY event_id", &[&bot]).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// Chatbot A: three old replies acked, a new one, a dead letter 100 days old, one 40
/// days old, and an execution 40 days old still waiting on a delay. Chatbot B: an old
/// reply. Every "old" row is aged in the database after it ran.
async fn history(d: &TestDaemon, t: &Tenant) {
    let (a, b) = (t.chatbots[0], t.chatbots[1]);
    let receiver = Receiver::start().await;
    receiver.on("/fail", Behaviour::Status(500, "{}".into()));
    let wf = json!([
        {"name": "ok", "trigger": {"event": "x.ok"}, "steps": [{"id": "say", "action": "reply", "text": "ok"}]},
        {"name": "fail", "trigger": {"event": "x.fail"}, "retry": {"max_attempts": 1},
         "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/fail")}]},
        {"name": "wait", "trigger": {"event": "x.wait"}, "steps": [{"id": "later", "action": "delay", "duration": "1h"}]},
    ]);
    apply(&d.store, a, wf.clone()).await;
    apply(&d.store, b, wf).await;
    let mut c = Client::tcp(d.tcp()).await.hello(&t.key, &[a, b]).await;
    let events = [
        ("a-old-1", a, "x.ok"),
        ("a-old-2", a, "x.ok"),
        ("a-old-3", a, "x.ok"),
        ("a-new-1", a, "x.ok"),
        ("a-dl-old", a, "x.fail"),
        ("a-dl-mid", a, "x.fail"),
        ("a-wait-old", a, "x.wait"),
        ("b-old-1", b, "x.ok"),
    ];
    for (id, bot, kind) in events {
        c.send(&event(id, bot, kind, json!({}))).await;
    }
    let db = d.db().await;
    // Ack every reply until all of them are recorded acked and everything has settled.
    let start = std::time::Instant::now();
    loop {
        while let Some(v) = c.try_recv(Duration::from_millis(20)).await {
            if v["op"] == "command" {
                c.send(&json!({"op": "ack", "command_id": v["command_id"]})).await;
            }
        }
        if count(&db, "SELECT count(*) FROM outbox WHERE status = 'acked'").await == 5
            && count(&db, "SELECT count(*) FROM dead_letters").await == 2
            && count(&db, "SELECT count(*) FROM executions WHERE status IN ('succeeded', 'dead', 'waiting')").await == 8
        {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the history was not written in time");
    }
    for (sql, ids) in [
        ("UPDATE executions SET created_at = now() - interval '40 days' WHERE event_id = ANY($1)", vec!["a-old-1", "a-old-2", "a-old-3", "a-dl-mid", "a-wait-old", "b-old-1"]),
        ("UPDATE executions SET created_at = now() - interval '100 days' WHERE event_id = ANY($1)", vec!["a-dl-old"]),
        // Cancelled ones are finished too (a deleted chatbot's, say).
        ("UPDATE executions SET status = 'cancelled' WHERE event_id = ANY($1)", vec!["a-old-3"]),
        ("UPDATE dead_letters d SET created_at = now() - interval '40 days' FROM executions e WHERE e.id = d.execution_id AND e.event_id = ANY($1)", vec!["a-dl-mid"]),
        ("UPDATE dead_letters d SET created_at = now() - interval '100 days' FROM executions e WHERE e.id = d.execution_id AND e.event_id = ANY($1)", vec!["a-dl-old"]),
        // Old acked commands of executions that are kept go by their own age.
        ("UPDATE outbox o SET acked_at = now() - interval '10 days' FROM executions e WHERE e.id = o.execution_id AND e.event_id = ANY($1)", vec!["a-old-1", "a-old-2", "a-old-3"]),
    ] {
        let ids: Vec<String> = ids.into_iter().map(String::from).collect();
        db.execute(sql, &[&ids]).await.unwrap();
    }
}

/// What is left of A and B once everything past its retention went.
async fn assert_pruned(db: &tokio_postgres::Client, t: &Tenant) {
    assert_eq!(executions_of(db, t.chatbots[0]).await, ["a-dl-mid", "a-new-1", "a-wait-old"]);
    assert_eq!(executions_of(db, t.chatbots[1]).await, ["b-old-1"], "B keeps its history forever");
    assert_eq!(count(db, "SELECT count(*) FROM dead_letters").await, 1, "the 40-day dead letter stays");
    // Steps and commands went with their executions (and the old acked ones by age).
    assert_eq!(count(db, "SELECT count(*) FROM execution_steps s LEFT JOIN executions e ON e.id = s.execution_id WHERE e.id IS NULL").await, 0);
    assert_eq!(count(db, "SELECT count(*) FROM outbox WHERE status = 'acked'").await, 2, "a-new-1's and b-old-1's");
}

async fn operator_key(d: &TestDaemon) -> String {
    d.app().operator_key.clone().expect("a fresh database gets an operator key")
}

async fn put_retention(d: &TestDaemon, key: &str, bot: Uuid, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .put(format!("{}/v1/chatbots/{bot}/retention", d.admin()))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[actix_rt::test]
async fn the_pruner_deletes_history_past_its_retention_in_batches_and_keeps_the_rest() {
    let d = TestDaemon::start_with(DaemonOptions {
        tweak: Box::new(|c| {
            c.retention.interval_seconds = 1;
            // Three old executions of A: two statements.
            c.retention.batch_size = 2;
        }),
        ..Default::default()
    })
    .await;
    let t = tenant(&d.store, "acme", 2).await;
    let key = operator_key(&d).await;
    let (status, body) = put_retention(&d, &key, t.chatbots[1], json!({"executions_days": 0, "acked_commands_days": 0})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["retention"]["executions"], 0, "{body}");
    let before = metric(&d.metrics().await, "botflow_pruned_rows_total", Some("kind=\"executions\""));
    history(&d, &t).await;
    let db = d.db().await;
    eventually("the pruner has run", || async { executions_of(&db, t.chatbots[0]).await.len() == 3 }).await;
    assert_pruned(&db, &t).await;
    // a-old-1..3 and a-dl-old (its dead letter, as old as its retention, with it).
    let pruned = metric(&d.metrics().await, "botflow_pruned_rows_total", Some("kind=\"executions\""));
    assert!(pruned - before >= 4.0, "{pruned} - {before}");
}

#[actix_rt::test]
async fn prune_dry_run_counts_and_deletes_nothing_then_prune_deletes() {
    let d = TestDaemon::start_with(DaemonOptions {
        tweak: Box::new(|c| c.retention.interval_seconds = 3_600),
        ..Default::default()
    })
    .await;
    let t = tenant(&d.store, "acme", 2).await;
    botflow::store::retention::set(
        &d.store,
        t.chatbots[1],
        botflow::store::retention::RetentionOverrides { executions_days: Some(0), acked_commands_days: Some(0), ..Default::default() },
        "test",
    )
    .await
    .unwrap();
    history(&d, &t).await;
    let db = d.db().await;
    let prune = |args: &[&str]| {
        let o = botflow_cmd().args(args).env("BOTFLOW_DATABASE__URL", pg_url(&d.pg)).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let counted = prune(&["prune", "--dry-run"]);
    // Executions a-old-1..3 and a-dl-old (its dead letter is past its own retention),
    // the 100-day dead letter, the three old acked commands: each kind counted alone.
    assert_eq!(counted, "executions 4\ndead_letters 1\nacked_commands 3\ndeleted_chatbots 0\n");
    assert_eq!(executions_of(&db, t.chatbots[0]).await.len(), 7, "a dry run deleted something");
    let first = prune(&["prune"]);
    // Children first: the letter and the commands, then their executions.
    assert_eq!(first, counted);
    assert_pruned(&db, &t).await;
    assert_eq!(prune(&["prune", "--dry-run"]), "executions 0\ndead_letters 0\nacked_commands 0\ndeleted_chatbots 0\n");
}

#[actix_rt::test]
async fn an_owner_may_keep_less_than_the_defaults_and_only_an_operator_more() {
    let d = TestDaemon::start().await;
    let t = tenant(&d.store, "acme", 1).await;
    let other = tenant(&d.store, "globex", 1).await;
    let bot = t.chatbots[0];
    let admin = accounts::create_key(&d.store, t.account, Role::Admin).await.unwrap();
    let (status, body) = put_retention(&d, &admin, bot, json!({"executions_days": 7})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["retention"], json!({"executions": 7, "dead_letters": 90, "acked_commands": 7}), "{body}");
    for (field, value) in [("executions_days", 31), ("dead_letters_days", 0)] {
        let (status, body) = put_retention(&d, &admin, bot, json!({ field: value })).await;
        assert_eq!((status, body["error"]["field"].as_str()), (403, Some(field)), "{body}");
    }
    let (status, body) = put_retention(&d, &admin, bot, json!({"executions_days": -1})).await;
    assert_eq!((status, body["error"]["field"].as_str()), (422, Some("executions_days")), "{body}");
    let (status, _) = put_retention(&d, &admin, other.chatbots[0], json!({"executions_days": 1})).await;
    assert_eq!(status, 404, "another account's chatbot");
    let (status, body) = put_retention(&d, &operator_key(&d).await, bot, json!({"dead_letters_days": 0})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["overrides"], json!({"executions_days": null, "dead_letters_days": 0, "acked_commands_days": null}), "{body}");
}
