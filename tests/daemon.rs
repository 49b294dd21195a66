//! The daemon's behaviour over time: ordering, hot reload, idle supervisors, shutdown,
//! metrics, a database that goes away, and migrations racing.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[actix_rt::test]
async fn events_of_one_chatbot_are_matched_in_the_order_sent() {
    let daemon = TestDaemon::start().await;
    let t = tenant(&daemon.store, "acme", 1).await;
    let bot = t.chatbots[0];
    apply(
        &daemon.store,
        bot,
        json!({"name": "all", "trigger": {"event": "x.seq"}, "steps": [{"id": "r", "action": "delay", "duration": "0s"}]}),
    )
    .await;
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    // Interleave events that match with events that do not, in one burst.
    let mut lines = String::new();
    for i in 0..500 {
        lines.push_str(&format!("{}\n", event(&format!("m{i:04}"), bot, "x.seq", json!({}))));
        lines.push_str(&format!("{}\n", event(&format!("n{i:04}"), bot, "x.other", json!({}))));
    }
    c.send_raw(&lines).await;
    let (answers, _) = c.answers(1000).await;
    assert!(answers.values().all(|a| a["op"] == "ack"));
    // Execution ids are time-ordered (UUIDv7) and chosen when the event is matched.
    let db = daemon.db().await;
    let rows = db.query("SELECT event_id FROM executions WHERE chatbot_id = $1 ORDER BY id", &[&bot]).await.unwrap();
    let order: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let expected: Vec<String> = (0..500).map(|i| format!("m{i:04}")).collect();
    assert_eq!(order, expected);
}

#[actix_rt::test]
async fn workflow_changes_reach_the_running_supervisor_promptly() {
    let daemon = TestDaemon::start().await;
    let t = tenant(&daemon.store, "acme", 1).await;
    let bot = t.chatbots[0];
    let wf = |word: &str| {
        json!({"name": "kw", "trigger": {"event": "message.received", "keywords": {"any": [word]}},
               "steps": [{"id": "r", "action": "delay", "duration": "0s"}]})
    };
    apply(&daemon.store, bot, wf("alpha")).await;
    let mut c = Client::unix(&daemon.unix()).await.hello(&t.key, &[]).await;
    c.send(&event("e1", bot, "message.received", json!({"text": "alpha"}))).await;
    let a = c.recv().await;
    assert_eq!(a["executions"].as_array().unwrap().len(), 1, "{a}");

    // Change the workflow the way the CLI does; the daemon hears it through NOTIFY.
    apply(&daemon.store, bot, wf("beta")).await;
    let changed = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        c.send(&event(&format!("probe{n}"), bot, "message.received", json!({"text": "beta"}))).await;
        let a = c.recv().await;
        if a["executions"].as_array().unwrap().len() == 1 {
            break;
        }
        // Usually a few milliseconds; the bound is loose so a loaded machine does not fail it.
        assert!(changed.elapsed() < Duration::from_secs(5), "the change did not arrive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let db = daemon.db().await;
    let version: i32 = db
        .query_one("SELECT workflow_version FROM executions WHERE event_id = $1", &[&format!("probe{n}")])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 2, "the new event runs the new version");
    c.send(&event("e-old", bot, "message.received", json!({"text": "alpha"}))).await;
    let a = c.recv().await;
    assert_eq!(a["executions"].as_array().unwrap().len(), 0, "the old keyword no longer matches: {a}");
}

#[actix_rt::test]
async fn shutdown_answers_every_event_in_flight_and_flushes_the_journal() {
    let mut daemon = TestDaemon::start().await;
    let t = tenant(&daemon.store, "acme", 1).await;
    let bot = t.chatbots[0];
    apply(
        &daemon.store,
        bot,
        json!({"name": "w", "trigger": {"event": "x.a"}, "steps": [{"id": "r", "action": "delay", "duration": "0s"}]}),
    )
    .await;
    let mut c = Client::unix(&daemon.unix()).await.hello(&t.key, &[]).await;
    let mut burst = String::new();
    for i in 0..300 {
        burst.push_str(&format!("{}\n", event(&format!("e{i}"), bot, "x.a", json!({}))));
    }
    c.send_raw(&burst).await;
    // Wait until the daemon has read some (one ack), then shut it down mid-stream.
    let first = c.recv().await;
    assert_eq!(first["op"], "ack");
    let store = daemon.store.clone();
    let pg = daemon.pg.clone();
    daemon.shutdown().await;
    let mut lines = vec![first];
    lines.extend(c.until_closed().await);
    let acked: Vec<String> =
        lines.iter().filter(|l| l["op"] == "ack").map(|l| l["id"].as_str().unwrap().to_string()).collect();
    assert!(lines.iter().all(|l| l["op"] == "ack"), "only acks: {lines:?}");
    // Every acked event's execution is committed and finished: the journal was flushed.
    drop(store);
    let (db, conn) = pg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = db.query("SELECT event_id, status FROM executions", &[]).await.unwrap();
    assert_eq!(rows.len(), acked.len(), "one execution per acked event, none for unread ones");
    for r in rows {
        let id: String = r.get(0);
        let status: String = r.get(1);
        assert!(acked.contains(&id));
        assert_eq!(status, "succeeded", "{id} was not finished before the daemon stopped");
    }
}

#[actix_rt::test]
async fn a_database_that_goes_away_gets_unavailable_never_an_ack_and_the_daemon_recovers() {
    // A server of its own: this test stops it.
    let dir = TempDir::new("pgdown");
    let opts = botflow::postgres::EmbeddedOptions { fast_unsafe: true, ..Default::default() };
    let mut pg = botflow::postgres::EmbeddedPostgres::start(dir.path(), &opts).unwrap();
    pg.ensure_database("botflow").await.unwrap();
    let daemon = TestDaemon::start_with(DaemonOptions {
        pg: Some(pg.config("botflow")),
        tweak: Box::new(|c| c.database.unavailable_after_ms = 500),
    })
    .await;
    let t = tenant(&daemon.store, "acme", 1).await;
    let bot = t.chatbots[0];
    apply(
        &daemon.store,
        bot,
        json!({"name": "w", "trigger": {"event": "x.a"}, "steps": [{"id": "r", "action": "delay", "duration": "0s"}]}),
    )
    .await;
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    c.send(&event("before", bot, "x.a", json!({}))).await;
    assert_eq!(c.recv().await["op"], "ack");

    pg.stop().unwrap();
    c.send(&event("during", bot, "x.a", json!({}))).await;
    let a = c.recv().await;
    assert_eq!(a["op"], "nack", "{a}");
    assert_eq!(a["error"]["code"], "unavailable", "{a}");
    // Events that trigger nothing need no database and are still acked.
    c.send(&event("nothing", bot, "x.none", json!({}))).await;
    assert_eq!(c.recv().await["op"], "ack");

    let pg2 = botflow::postgres::EmbeddedPostgres::start(dir.path(), &opts).unwrap();
    let mut n = 0;
    loop {
        n += 1;
        c.send(&event(&format!("after{n}"), bot, "x.a", json!({}))).await;
        let a = c.recv().await;
        if a["op"] == "ack" {
            assert_eq!(a["executions"].as_array().unwrap().len(), 1);
            break;
        }
        assert_eq!(a["error"]["code"], "unavailable", "{a}");
        assert!(n < 100, "the daemon did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (db, conn) = pg2.config("botflow").connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let ids: Vec<String> =
        db.query("SELECT event_id FROM executions ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids.first().map(String::as_str), Some("before"));
    assert_eq!(ids.last().map(String::as_str), Some(format!("after{n}").as_str()));
    assert!(!ids.contains(&"during".to_string()), "a nacked event left no execution");
}

#[actix_rt::test]
async fn two_instances_migrating_at_once_apply_each_migration_once() {
    let pg = fresh_database().await;
    let store = |pg: &tokio_postgres::Config| botflow::store::Store::new(pg.clone(), 2, Duration::from_secs(5), None).unwrap();
    let (a, b) = (store(&pg), store(&pg));
    let (ra, rb) = tokio::join!(botflow::store::migrate::migrate(&a), botflow::store::migrate::migrate(&b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let latest = botflow::store::migrate::latest_version() as usize;
    assert_eq!(ra.applied.len() + rb.applied.len(), latest, "each migration applied exactly once: {ra:?} {rb:?}");
    assert!(ra.applied.is_empty() || rb.applied.is_empty(), "one of them found nothing to do");
    assert_eq!(botflow::store::migrate::current_version(&a).await.unwrap(), botflow::store::migrate::latest_version());
}

#[actix_rt::test]
async fn upgrading_to_v6_counts_executions_created_before_the_rollups_existed() {
    let pg = fresh_database().await;
    let store = botflow::store::Store::new(pg.clone(), 2, Duration::from_secs(5), None).unwrap();
    botflow::store::migrate::migrate_to(&store, Some(5)).await.unwrap();
    let t = tenant(&store, "acme", 1).await;
    let bot = t.chatbots[0];
    // Rows an older daemon wrote (the workflow as schema V5 holds it; today's code
    // expects the newest schema): executions, no rollups.
    let (db, conn) = pg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let wid = Uuid::now_v7();
    let definition = json!({"name": "w", "trigger": {"event": "x.a"}, "steps": [{"id": "d", "action": "delay", "duration": "0s"}]});
    db.execute("INSERT INTO workflows (id, chatbot_id, name, version, definition) VALUES ($1, $2, 'w', 1, $3)", &[&wid, &bot, &definition])
        .await
        .unwrap();
    db.execute("INSERT INTO workflow_versions (workflow_id, version, definition) VALUES ($1, 1, $2)", &[&wid, &definition]).await.unwrap();
    db.batch_execute(&format!(
        "INSERT INTO executions (id, chatbot_id, workflow_id, workflow_version, event_id, event_type, conversation_id,
                                 event, status, created_at, finished_at, duration_ms)
         SELECT gen_random_uuid(), '{bot}', '{wid}', 1, 'e' || i, 'x.a', 'c', '{{}}',
                CASE WHEN i <= 6 THEN 'succeeded' WHEN i <= 8 THEN 'dead' ELSE 'queued' END,
                now() - interval '2 hours', CASE WHEN i <= 8 THEN now() END, CASE WHEN i <= 8 THEN 10.0 * i END
         FROM generate_series(1, 10) AS i"
    ))
    .await
    .unwrap();
    let rolled = |sql: &'static str| {
        let db = &db;
        async move { db.query_one(sql, &[]).await.unwrap().get::<_, Option<i64>>(0).unwrap_or(0) }
    };
    assert_eq!(rolled("SELECT sum(created)::int8 FROM execution_stats").await, 0);

    botflow::store::migrate::migrate(&store).await.unwrap();
    let counts = db
        .query_one("SELECT coalesce(sum(created), 0)::int8, coalesce(sum(succeeded), 0)::int8, coalesce(sum(failed), 0)::int8,
                    coalesce(sum(dead), 0)::int8 FROM execution_stats", &[])
        .await
        .unwrap();
    let counts: Vec<i64> = (0..4).map(|i| counts.get(i)).collect();
    assert_eq!(counts, vec![10, 6, 0, 2]);
    assert_eq!(rolled("SELECT sum(count)::int8 FROM execution_durations").await, 8, "one duration per ended execution");
}

#[actix_rt::test]
async fn the_first_start_writes_an_operator_key_once() {
    let pg = fresh_database().await;
    let mut d1 = TestDaemon::start_with(DaemonOptions { pg: Some(pg.clone()), ..Default::default() }).await;
    let key = d1.app().operator_key.clone().expect("an operator key on an empty database");
    let path = d1.config.operator_token_path();
    let on_disk = std::fs::read_to_string(&path).unwrap();
    assert_eq!(on_disk.trim(), key);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let p = botflow::store::accounts::authenticate(&d1.store, &key).await.unwrap().unwrap();
    assert_eq!(p.role, botflow::store::accounts::Role::Operator);
    d1.shutdown().await;
    let d2 = TestDaemon::start_with(DaemonOptions { pg: Some(pg), ..Default::default() }).await;
    assert!(d2.app().operator_key.is_none(), "a second start does not make another key");
}

#[actix_rt::test]
async fn ten_thousand_workflows_in_one_chatbot() {
    let daemon = TestDaemon::start().await;
    let t = tenant(&daemon.store, "acme", 1).await;
    let bot = t.chatbots[0];
    let workflows: Vec<_> = (0..10_000)
        .map(|i| {
            let trigger = match i % 4 {
                0 => json!({"event": "message.received", "keywords": {"any": [format!("word{i}")]}}),
                1 => json!({"event": "intent.detected", "intent": {"names": [format!("intent{i}")], "min_confidence": 0.5}}),
                2 => json!({"event": "image.uploaded", "image": {"labels_any": [format!("label{i}")]}}),
                _ => json!({"event": "sentiment.analyzed", "sentiment": {"labels": ["negative"], "score_below": -0.99}}),
            };
            json!({"name": format!("w{i}"), "trigger": trigger, "steps": [{"id": "r", "action": "delay", "duration": "0s"}]})
        })
        .collect();
    let ids = apply(&daemon.store, bot, json!(workflows)).await;
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    let cases = [
        (event("k", bot, "message.received", json!({"text": "say word4444 and word8 please"})), vec![4444, 8]),
        (event("i", bot, "intent.detected", json!({"name": "intent9001", "confidence": 0.7})), vec![9001]),
        (event("im", bot, "image.uploaded", json!({"url": "u", "labels": ["label2"]})), vec![2]),
        (event("s", bot, "sentiment.analyzed", json!({"label": "negative", "score": -0.999})), (0..10_000).filter(|i| i % 4 == 3).collect()),
        (event("none", bot, "message.received", json!({"text": "word"})), vec![]),
    ];
    for (ev, expected) in cases {
        c.send(&ev).await;
        let a = c.recv().await;
        let mut got: Vec<Uuid> =
            a["executions"].as_array().unwrap().iter().map(|x| x["workflow_id"].as_str().unwrap().parse().unwrap()).collect();
        let mut want: Vec<Uuid> = expected.iter().map(|i| ids[*i as usize]).collect();
        got.sort();
        want.sort();
        assert_eq!(got.len(), want.len(), "{}", ev["id"]);
        assert_eq!(got, want, "{}", ev["id"]);
    }
}

#[actix_rt::test]
async fn a_nul_character_in_a_webhook_answer_is_stored_replaced_without_failing_others() {
    let daemon = TestDaemon::start_with(DaemonOptions {
        tweak: Box::new(|c| c.journal.lanes = 1),
        ..Default::default()
    })
    .await;
    let receiver = Receiver::start().await;
    receiver.on("/nul", Behaviour::Status(200, r#"{"t":"a\u0000b"}"#.into()));
    let t = tenant(&daemon.store, "acme", 2).await;
    let (nul_bot, plain_bot) = (t.chatbots[0], t.chatbots[1]);
    apply(
        &daemon.store,
        nul_bot,
        json!({"name": "w", "trigger": {"event": "x.a"},
               "steps": [{"id": "h", "action": "webhook", "url": receiver.url("/nul")}]}),
    )
    .await;
    apply(
        &daemon.store,
        plain_bot,
        json!({"name": "w", "trigger": {"event": "x.a"}, "steps": [{"id": "r", "action": "delay", "duration": "0s"}]}),
    )
    .await;
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    c.send(&event("n1", nul_bot, "x.a", json!({}))).await;
    c.send(&event("p1", plain_bot, "x.a", json!({}))).await;
    let _ = c.answers(2).await;
    let db = daemon.db().await;
    eventually("both executions finish", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
        n == 2
    })
    .await;
    let out: serde_json::Value = db
        .query_one("SELECT output FROM execution_steps WHERE step_id = 'h'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(out["response"]["t"], "a\u{fffd}b");
}

#[actix_rt::test]
async fn events_queued_behind_a_blocked_write_are_nacked_on_time_and_the_blocked_one_is_acked_later() {
    let daemon = TestDaemon::start_with(DaemonOptions {
        tweak: Box::new(|c| {
            c.journal.lanes = 1;
            c.database.unavailable_after_ms = 500;
        }),
        ..Default::default()
    })
    .await;
    let t = tenant(&daemon.store, "acme", 1).await;
    let bot = t.chatbots[0];
    apply(
        &daemon.store,
        bot,
        json!({"name": "w", "trigger": {"event": "x.a"}, "steps": [{"id": "r", "action": "delay", "duration": "0s"}]}),
    )
    .await;
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    // Warm the supervisor so the next events go straight to the journal.
    c.send(&event("warm", bot, "x.a", json!({}))).await;
    assert_eq!(c.recv().await["op"], "ack");
    // And let its execution finish, so that the write the lock blocks is the next event's.
    let db = daemon.db().await;
    eventually("the warm-up execution finishes", || async {
        let n: i64 = db
            .query_one("SELECT count(*) FROM executions WHERE event_id = 'warm' AND status = 'succeeded'", &[])
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;

    let (mut locker, conn) = daemon.pg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE executions IN ACCESS EXCLUSIVE MODE").await.unwrap();
    c.send(&event("blocked", bot, "x.a", json!({}))).await;
    // The journal's write, not any other query on executions (lease sweeps and the
    // scheduler wait on the lock too).
    eventually("the journal's write waits on the lock", || async {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO executions%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n > 0
    })
    .await;
    c.send(&event("behind", bot, "x.a", json!({}))).await;
    let a = c.recv().await;
    assert_eq!((a["id"].as_str(), a["error"]["code"].as_str()), (Some("behind"), Some("unavailable")), "{a}");
    tx.rollback().await.unwrap();
    let a = c.recv().await;
    assert_eq!((a["id"].as_str(), a["op"].as_str()), (Some("blocked"), Some("ack")), "{a}");
    let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE event_id = 'behind'", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "a nacked event left no row");
}

