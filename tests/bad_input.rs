//! Bad input on the ingest protocol: every malformed, oversized, unauthorised or
//! abandoned frame gets its own clear answer (an `error` line or a `nack` naming the
//! problem), and nothing else is disturbed: the same connection (where the protocol
//! keeps it open) and other connections keep getting their events acked and executed.

mod common;
use common::*;

use botflow::config::Config;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// How long to listen when asserting that nothing (more) arrives.
const QUIET: Duration = Duration::from_millis(300);
/// A connection the daemon means to close is closed well within this.
const CLOSE_WITHIN: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------
// Local helpers

fn options(tweak: impl FnOnce(&mut Config) + 'static) -> DaemonOptions {
    DaemonOptions { tweak: Box::new(tweak), ..Default::default() }
}

/// A workflow that runs once for every message containing the word "ping".
fn ping_workflow() -> Value {
    json!([{
        "name": "Ping",
        "trigger": {"event": "message.received", "keywords": {"any": ["ping"]}},
        "steps": [{"id": "answer", "action": "reply", "text": "pong {{event.id}}"}]
    }])
}

/// An event the ping workflow matches.
fn ping(id: &str, bot: Uuid) -> Value {
    event(id, bot, "message.received", json!({"text": "ping please", "sender": "user"}))
}

/// A daemon, one account whose chatbots all run the ping workflow, a database client,
/// and a client connected (over TCP) before anything bad happens.
struct World {
    daemon: TestDaemon,
    t: Tenant,
    db: tokio_postgres::Client,
    other: Client,
}

async fn world(opts: DaemonOptions, bots: usize) -> World {
    let daemon = TestDaemon::start_with(opts).await;
    let t = tenant(&daemon.store, "acme", bots).await;
    for bot in &t.chatbots {
        apply(&daemon.store, *bot, ping_workflow()).await;
    }
    let db = daemon.db().await;
    let other = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    World { daemon, t, db, other }
}

/// Execution rows recorded for one event of one chatbot.
async fn rows(db: &tokio_postgres::Client, bot: Uuid, event_id: &str) -> i64 {
    db.query_one("SELECT count(*) FROM executions WHERE chatbot_id = $1 AND event_id = $2", &[&bot, &event_id])
        .await
        .unwrap()
        .get(0)
}

/// Execution rows recorded for a chatbot.
async fn rows_of(db: &tokio_postgres::Client, bot: Uuid) -> i64 {
    db.query_one("SELECT count(*) FROM executions WHERE chatbot_id = $1", &[&bot]).await.unwrap().get(0)
}

/// Execution rows recorded for an event id, whatever the chatbot.
async fn rows_any(db: &tokio_postgres::Client, event_id: &str) -> i64 {
    db.query_one("SELECT count(*) FROM executions WHERE event_id = $1", &[&event_id]).await.unwrap().get(0)
}

/// Sends a matching event and checks it is acked with one execution, committed by the
/// time of the ack. Lines passed over on the way may only be commands.
async fn served(c: &mut Client, db: &tokio_postgres::Client, bot: Uuid, id: &str) {
    c.send(&ping(id, bot)).await;
    let (v, skipped) =
        c.recv_until(|v| v["id"] == id && matches!(v["op"].as_str(), Some("ack") | Some("nack"))).await;
    for s in &skipped {
        assert_eq!(s["op"], "command", "unexpected line before the answer to {id}: {s}");
    }
    assert_eq!(v["op"], "ack", "{id} was not acked: {v}");
    assert_eq!(v["duplicate"], false, "{v}");
    assert_eq!(v["executions"].as_array().map(Vec::len), Some(1), "{id} should start one execution: {v}");
    assert_eq!(rows(db, bot, id).await, 1, "{id} acked but not recorded");
}

/// Checks an `error` line: its code, and that its message mentions each of `mentions`.
#[track_caller]
fn assert_error(v: &Value, code: &str, mentions: &[&str]) {
    assert_eq!(v["op"], "error", "expected an error line, got {v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("error without a message: {v}"));
    for m in mentions {
        assert!(message.to_lowercase().contains(&m.to_lowercase()), "the message should mention {m:?}: {v}");
    }
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["error", "op"], "an error line carries only op and error: {v}");
}

/// Checks a `nack` line: the echoed id (`None`: null), its code and its field.
#[track_caller]
fn assert_nack(v: &Value, id: Option<&str>, code: &str, field: Option<&str>) {
    assert_eq!(v["op"], "nack", "expected a nack, got {v}");
    match id {
        Some(id) => assert_eq!(v["id"], id, "the nack should echo the event id: {v}"),
        None => assert!(v["id"].is_null(), "the id could not be read, so none can be echoed: {v}"),
    }
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "a nack explains itself: {v}");
    match field {
        Some(f) => {
            assert_eq!(v["error"]["field"], f, "the nack should name the field: {v}");
            assert!(v["error"]["message"].as_str().unwrap().contains(f), "the message should name {f}: {v}");
        }
        None => assert!(v["error"].get("field").is_none(), "{v}"),
    }
}

/// Nothing arrives for a short while.
async fn assert_quiet(c: &mut Client, what: &str) {
    if let Some(v) = c.try_recv(QUIET).await {
        panic!("{what}: unexpected line {v}");
    }
}

/// Reads until the daemon closes the connection, which must happen within `within`;
/// returns the lines read.
async fn closed_within(c: &mut Client, within: Duration) -> Vec<Value> {
    let start = Instant::now();
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        let left = within.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, c.reader.read_line(&mut line)).await {
            Err(_) => panic!("the daemon did not close the connection within {within:?}; lines so far: {out:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(_)) => out.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))),
        }
    }
}

fn hello_line(token: &str, subscribe: &[Uuid]) -> Value {
    json!({"op": "hello", "version": 1, "token": token, "client": "bad-input", "subscribe": subscribe})
}

// ---------------------------------------------------------------------------
// 1. Not JSON

#[actix_rt::test]
async fn a_line_that_is_not_json_gets_invalid_frame_and_the_connection_stays_open() {
    let w = world(DaemonOptions::default(), 1).await;
    let bot = w.t.chatbots[0];
    let mut c = Client::unix(&w.daemon.unix()).await.hello(&w.t.key, &[]).await;
    let mut other = w.other;

    c.send_raw("this is not json\n").await;
    assert_error(&c.recv().await, "invalid_frame", &["not valid JSON"]);

    // Cut in the middle of an object: still one error, and the next line is read afresh.
    c.send_raw(&format!("{{\"op\":\"event\",\"id\":\"cut\",\"chatbot_id\":\"{bot}\"\n")).await;
    assert_error(&c.recv().await, "invalid_frame", &["JSON"]);

    // JSON, but not an object.
    c.send_raw("[1,2,3]\n").await;
    assert_error(&c.recv().await, "invalid_frame", &["not a JSON object"]);
    c.send_raw("\"ping\"\n").await;
    assert_error(&c.recv().await, "invalid_frame", &["JSON object"]);

    // Blank lines are not frames: no answer at all.
    c.send_raw("\n   \r\n\n").await;
    assert_quiet(&mut c, "blank lines").await;

    assert_eq!(rows_any(&w.db, "cut").await, 0);
    served(&mut c, &w.db, bot, "after-garbage").await;
    served(&mut other, &w.db, bot, "other-1").await;
    assert_eq!(rows_of(&w.db, bot).await, 2);
}

// ---------------------------------------------------------------------------
// 2. Too large

#[actix_rt::test]
async fn a_line_over_max_frame_bytes_is_refused_while_it_arrives_and_the_stream_resumes() {
    let w = world(options(|c: &mut Config| c.ingest.max_frame_bytes = 1024), 1).await;
    let bot = w.t.chatbots[0];
    let mut c = Client::tcp(w.daemon.tcp()).await.hello(&w.t.key, &[]).await;
    let mut other = w.other;
    let welcome_limit = {
        // The welcome told the client the limit it runs under.
        let mut probe = Client::unix(&w.daemon.unix()).await;
        probe.send(&hello_line(&w.t.key, &[])).await;
        probe.recv().await
    };
    assert_eq!(welcome_limit["max_frame_bytes"], 1024, "{welcome_limit}");

    // 5 MB without a newline, in 64 KiB writes. The first write is already far over the
    // limit: the error must come while the line is still incomplete.
    let chunk = vec![b'x'; 64 * 1024];
    c.writer.write_all(b"{\"op\":\"event\",\"id\":\"huge\",\"data\":{\"text\":\"").await.unwrap();
    c.writer.write_all(&chunk).await.unwrap();
    let first = c.try_recv(Duration::from_secs(10)).await.expect("frame_too_large before the line is complete");
    assert_error(&first, "frame_too_large", &["1024"]);
    let mut sent = 64 * 1024;
    while sent < 5 * 1024 * 1024 {
        c.writer.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    // The daemon kept reading (and dropping) the line: one error for it, not one per read.
    assert_quiet(&mut c, "the rest of an over-long line").await;
    // The end of the over-long line, then a valid event in the same write.
    let mut tail = b"\"}}\n".to_vec();
    tail.extend_from_slice(format!("{}\n", ping("after-huge", bot)).as_bytes());
    c.writer.write_all(&tail).await.unwrap();
    let v = c.recv().await;
    assert_eq!(v["op"], "ack", "the line after the over-long one is read normally: {v}");
    assert_eq!(v["id"], "after-huge");
    assert_eq!(rows(&w.db, bot, "after-huge").await, 1);

    // A complete over-long line in one write, itself a matching event: refused, never run.
    let padding = "ping ".repeat(300);
    let big = event("big-event", bot, "message.received", json!({"text": padding}));
    c.send_raw(&format!("{big}\n{}\n", ping("after-big", bot))).await;
    assert_error(&c.recv().await, "frame_too_large", &["max_frame_bytes"]);
    let v = c.recv().await;
    assert_eq!(v["op"], "ack", "{v}");
    assert_eq!(v["id"], "after-big");
    assert_eq!(rows_any(&w.db, "big-event").await, 0, "an over-long line must not run");
    assert_eq!(rows_any(&w.db, "huge").await, 0);

    // A line of exactly the limit is accepted.
    let mut exact = ping("exact", bot);
    exact["data"]["text"] = json!("");
    let skeleton = exact.to_string().len();
    exact["data"]["text"] = json!(format!("ping {}", "y".repeat(1024 - skeleton - 5)));
    assert_eq!(exact.to_string().len(), 1024);
    c.send(&exact).await;
    let v = c.recv().await;
    assert_eq!(v["op"], "ack", "a line of exactly max_frame_bytes is allowed: {v}");

    served(&mut c, &w.db, bot, "again").await;
    served(&mut other, &w.db, bot, "other-1").await;
}

// ---------------------------------------------------------------------------
// 3. Unknown op

#[actix_rt::test]
async fn an_unknown_op_gets_unknown_op_naming_it_and_the_connection_stays_open() {
    let w = world(DaemonOptions::default(), 1).await;
    let bot = w.t.chatbots[0];
    let mut c = Client::unix(&w.daemon.unix()).await.hello(&w.t.key, &[]).await;
    let mut other = w.other;

    c.send(&json!({"op": "subscribe", "chatbots": [bot]})).await;
    assert_error(&c.recv().await, "unknown_op", &["subscribe"]);
    c.send(&json!({"op": "EVENT", "id": "upper", "chatbot_id": bot})).await;
    assert_error(&c.recv().await, "unknown_op", &["EVENT"]);
    c.send(&json!({"op": 7})).await;
    assert_error(&c.recv().await, "unknown_op", &["op"]);
    c.send(&json!({"id": "no-op", "chatbot_id": bot, "type": "message.received"})).await;
    assert_error(&c.recv().await, "unknown_op", &["op"]);

    // Control frames with a bad field name it.
    c.send(&json!({"op": "ack"})).await;
    assert_error(&c.recv().await, "invalid_frame", &["command_id"]);
    // A second hello on a welcomed connection.
    c.send(&hello_line(&w.t.key, &[])).await;
    assert_error(&c.recv().await, "protocol_error", &["hello"]);

    c.send(&json!({"op": "ping"})).await;
    assert_eq!(c.recv().await, json!({"op": "pong"}));
    assert_eq!(rows_any(&w.db, "upper").await + rows_any(&w.db, "no-op").await, 0);
    served(&mut c, &w.db, bot, "after-unknown").await;
    served(&mut other, &w.db, bot, "other-1").await;
}

// ---------------------------------------------------------------------------
// 4. Invalid events

#[actix_rt::test]
async fn events_with_missing_or_wrong_fields_are_nacked_naming_the_field() {
    let w = world(DaemonOptions::default(), 1).await;
    let bot = w.t.chatbots[0];
    let mut c = Client::unix(&w.daemon.unix()).await.hello(&w.t.key, &[]).await;
    let mut other = w.other;

    let long = "i".repeat(300);
    // Each case would match the ping workflow if it were accepted.
    let text = r#""data":{"text":"ping"}"#;
    let ok_head = format!(r#""op":"event","chatbot_id":"{bot}","conversation_id":"c-1""#);
    let cases: Vec<(String, Option<&str>, &str)> = vec![
        (format!(r#"{{"op":"event","chatbot_id":"{bot}","type":"message.received","conversation_id":"c",{text}}}"#), None, "id"),
        (format!(r#"{{"op":"event","id":17,"chatbot_id":"{bot}","type":"message.received","conversation_id":"c",{text}}}"#), None, "id"),
        (format!(r#"{{"op":"event","id":"","chatbot_id":"{bot}","type":"message.received","conversation_id":"c",{text}}}"#), None, "id"),
        (format!(r#"{{"op":"event","id":"{long}","chatbot_id":"{bot}","type":"message.received","conversation_id":"c",{text}}}"#), None, "id"),
        (format!(r#"{{"op":"event","id":"e-chatbot-missing","type":"message.received","conversation_id":"c",{text}}}"#), Some("e-chatbot-missing"), "chatbot_id"),
        (format!(r#"{{"op":"event","id":"e-chatbot-bad","chatbot_id":"bot-1","type":"message.received","conversation_id":"c",{text}}}"#), Some("e-chatbot-bad"), "chatbot_id"),
        (format!(r#"{{"op":"event","id":"e-chatbot-num","chatbot_id":42,"type":"message.received","conversation_id":"c",{text}}}"#), Some("e-chatbot-num"), "chatbot_id"),
        (format!(r#"{{{ok_head},"id":"e-type-missing",{text}}}"#), Some("e-type-missing"), "type"),
        (format!(r#"{{{ok_head},"id":"e-type-bad","type":"Message Received",{text}}}"#), Some("e-type-bad"), "type"),
        (format!(r#"{{"op":"event","id":"e-conv-missing","chatbot_id":"{bot}","type":"message.received",{text}}}"#), Some("e-conv-missing"), "conversation_id"),
        (format!(r#"{{"op":"event","id":"e-conv-num","chatbot_id":"{bot}","type":"message.received","conversation_id":9,{text}}}"#), Some("e-conv-num"), "conversation_id"),
        (format!(r#"{{{ok_head},"id":"e-occurred","type":"message.received","occurred_at":"yesterday",{text}}}"#), Some("e-occurred"), "occurred_at"),
        (format!(r#"{{{ok_head},"id":"e-data-array","type":"message.received","data":["ping"]}}"#), Some("e-data-array"), "data"),
        (format!(r#"{{{ok_head},"id":"e-text-missing","type":"message.received","data":{{}}}}"#), Some("e-text-missing"), "data.text"),
        (format!(r#"{{{ok_head},"id":"e-no-data","type":"message.received"}}"#), Some("e-no-data"), "data.text"),
        (format!(r#"{{{ok_head},"id":"e-text-num","type":"message.received","data":{{"text":3}}}}"#), Some("e-text-num"), "data.text"),
        (format!(r#"{{{ok_head},"id":"e-sender","type":"message.received","data":{{"text":"ping","sender":"cat"}}}}"#), Some("e-sender"), "data.sender"),
        (format!(r#"{{{ok_head},"id":"e-score-high","type":"sentiment.analyzed","data":{{"label":"negative","score":3}}}}"#), Some("e-score-high"), "data.score"),
        (format!(r#"{{{ok_head},"id":"e-score-low","type":"sentiment.analyzed","data":{{"label":"negative","score":-1.5}}}}"#), Some("e-score-low"), "data.score"),
        (format!(r#"{{{ok_head},"id":"e-score-str","type":"sentiment.analyzed","data":{{"label":"negative","score":"low"}}}}"#), Some("e-score-str"), "data.score"),
        (format!(r#"{{{ok_head},"id":"e-label","type":"sentiment.analyzed","data":{{"label":"angry","score":0}}}}"#), Some("e-label"), "data.label"),
        (format!(r#"{{{ok_head},"id":"e-confidence","type":"intent.detected","data":{{"name":"refund","confidence":2}}}}"#), Some("e-confidence"), "data.confidence"),
        (format!(r#"{{{ok_head},"id":"e-intent-name","type":"intent.detected","data":{{"confidence":0.5}}}}"#), Some("e-intent-name"), "data.name"),
        (format!(r#"{{{ok_head},"id":"e-url","type":"image.uploaded","data":{{"mime_type":"image/png"}}}}"#), Some("e-url"), "data.url"),
        (format!(r#"{{{ok_head},"id":"e-labels","type":"image.uploaded","data":{{"url":"u","labels":"receipt"}}}}"#), Some("e-labels"), "data.labels"),
        (format!(r#"{{{ok_head},"id":"e-user","type":"conversation.started","data":{{"user":"bob"}}}}"#), Some("e-user"), "data.user"),
    ];
    for (line, id, field) in &cases {
        c.send_raw(&format!("{line}\n")).await;
        let v = c.recv().await;
        assert_nack(&v, *id, "invalid_event", Some(field));
    }
    // All of them at once, with a valid event in the middle: answered in order, the
    // valid one acked.
    let mut batch = String::new();
    for (i, (line, _, _)) in cases.iter().enumerate() {
        batch.push_str(line);
        batch.push('\n');
        if i == cases.len() / 2 {
            batch.push_str(&format!("{}\n", ping("valid-in-batch", bot)));
        }
    }
    c.send_raw(&batch).await;
    let mut nacks = Vec::new();
    let mut acked = false;
    while nacks.len() < cases.len() || !acked {
        let v = c.recv().await;
        if v["op"] == "ack" {
            assert_eq!(v["id"], "valid-in-batch", "{v}");
            acked = true;
        } else {
            nacks.push(v);
        }
    }
    for (v, (_, id, field)) in nacks.iter().zip(&cases) {
        assert_nack(v, *id, "invalid_event", Some(field));
    }
    assert_quiet(&mut c, "after the batch").await;

    // Only the valid event was recorded.
    assert_eq!(rows_of(&w.db, bot).await, 1);
    served(&mut c, &w.db, bot, "after-invalid").await;
    served(&mut other, &w.db, bot, "other-1").await;
    assert_eq!(rows_of(&w.db, bot).await, 3);
}

// ---------------------------------------------------------------------------
// 5. Unknown chatbot

#[actix_rt::test]
async fn an_event_for_an_unknown_chatbot_is_nacked_unknown_chatbot() {
    let w = world(DaemonOptions::default(), 1).await;
    let bot = w.t.chatbots[0];
    let mut c = Client::unix(&w.daemon.unix()).await.hello(&w.t.key, &[]).await;
    let mut other = w.other;
    let ghost = Uuid::new_v4();

    // Twice: once while the daemon looks the chatbot up, once from what it remembered.
    for id in ["ghost-1", "ghost-2"] {
        c.send(&ping(id, ghost)).await;
        let v = c.recv().await;
        assert_nack(&v, Some(id), "unknown_chatbot", None);
        assert!(v["error"]["message"].as_str().unwrap().contains(&ghost.to_string()), "{v}");
    }
    // Mixed in one write with a valid event of a real chatbot: each gets its own answer.
    c.send_raw(&format!("{}\n{}\n{}\n", ping("ghost-3", ghost), ping("real-1", bot), ping("ghost-4", ghost))).await;
    let (answers, others) = c.answers(3).await;
    assert!(others.is_empty(), "{others:?}");
    assert_nack(&answers["ghost-3"], Some("ghost-3"), "unknown_chatbot", None);
    assert_nack(&answers["ghost-4"], Some("ghost-4"), "unknown_chatbot", None);
    assert_eq!(answers["real-1"]["op"], "ack", "{}", answers["real-1"]);

    // Subscribing to an unknown chatbot: welcomed, told, and the rest works.
    let mut s = Client::tcp(w.daemon.tcp()).await.hello(&w.t.key, &[ghost, bot]).await;
    assert_error(&s.recv().await, "unknown_chatbot", &[&ghost.to_string()]);
    served(&mut s, &w.db, bot, "sub-1").await;
    let (cmd, _) = s.recv_until(|v| v["op"] == "command").await;
    assert_eq!(cmd["chatbot_id"], bot.to_string(), "the valid subscription still delivers: {cmd}");

    let n: i64 = w.db.query_one("SELECT count(*) FROM executions WHERE chatbot_id = $1", &[&ghost]).await.unwrap().get(0);
    assert_eq!(n, 0);
    served(&mut c, &w.db, bot, "after-ghost").await;
    served(&mut other, &w.db, bot, "other-1").await;
}

// ---------------------------------------------------------------------------
// 6. Another account's chatbot

#[actix_rt::test]
async fn another_accounts_chatbot_is_answered_as_one_that_does_not_exist_for_events_and_subscriptions() {
    let daemon = TestDaemon::start().await;
    let a = tenant(&daemon.store, "acme", 1).await;
    let b = tenant(&daemon.store, "globex", 1).await;
    let (mine, theirs) = (a.chatbots[0], b.chatbots[0]);
    apply(&daemon.store, mine, ping_workflow()).await;
    apply(&daemon.store, theirs, ping_workflow()).await;
    let db = daemon.db().await;
    let mut cb = Client::tcp(daemon.tcp()).await.hello(&b.key, &[theirs]).await;

    // An event for B's chatbot with A's key, before and after the daemon knows the chatbot.
    let mut ca = Client::unix(&daemon.unix()).await.hello(&a.key, &[]).await;
    // Word for word what an id that does not exist gets: a key cannot tell them apart.
    let nobody = uuid::Uuid::new_v4();
    let same = |v: &serde_json::Value, id: uuid::Uuid| v["error"]["message"].as_str().unwrap().replace(&id.to_string(), "<id>");
    ca.send(&ping("none-1", nobody)).await;
    let none = ca.recv().await;
    assert_nack(&none, Some("none-1"), "unknown_chatbot", None);
    ca.send(&ping("steal-1", theirs)).await;
    let v = ca.recv().await;
    assert_nack(&v, Some("steal-1"), "unknown_chatbot", None);
    assert_eq!(same(&v, theirs), same(&none, nobody), "{v} vs {none}");
    served(&mut cb, &db, theirs, "theirs-1").await;
    ca.send(&ping("steal-2", theirs)).await;
    let v = ca.recv().await;
    assert_nack(&v, Some("steal-2"), "unknown_chatbot", None);
    assert_eq!(same(&v, theirs), same(&none, nobody), "{v} vs {none}");

    // A hello subscribing to B's chatbot: welcomed, refused that one, keeps its own.
    let mut cs = Client::unix(&daemon.unix()).await.hello(&a.key, &[theirs, nobody, mine]).await;
    let (refused_theirs, refused_none) = (cs.recv().await, cs.recv().await);
    assert_error(&refused_theirs, "unknown_chatbot", &[&theirs.to_string()]);
    assert_error(&refused_none, "unknown_chatbot", &[&nobody.to_string()]);
    assert_eq!(same(&refused_theirs, theirs), same(&refused_none, nobody));
    assert_quiet(&mut cs, "after the refused subscription").await;
    served(&mut cs, &db, mine, "mine-1").await;
    let (cmd, _) = cs.recv_until(|v| v["op"] == "command").await;
    assert_eq!(cmd["chatbot_id"], mine.to_string(), "{cmd}");
    assert_eq!(cmd["payload"]["text"], "pong mine-1");
    // B's replies go to B, never to A's connection.
    served(&mut cb, &db, theirs, "theirs-2").await;
    let (cmd, _) = cb.recv_until(|v| v["op"] == "command" && v["payload"]["text"] == "pong theirs-2").await;
    assert_eq!(cmd["chatbot_id"], theirs.to_string());
    assert_quiet(&mut cs, "B's command must not reach A's connection").await;

    // Nothing was written for B's chatbot but B's own events.
    let ids: Vec<String> = db
        .query("SELECT event_id FROM executions WHERE chatbot_id = $1 ORDER BY event_id", &[&theirs])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, ["theirs-1", "theirs-2"]);
    assert_eq!(rows_any(&db, "steal-1").await + rows_any(&db, "steal-2").await, 0);
    served(&mut ca, &db, mine, "mine-2").await;
}

// ---------------------------------------------------------------------------
// 7. Authentication

#[actix_rt::test]
async fn a_wrong_token_a_wrong_version_or_an_event_before_hello_closes_the_connection() {
    let w = world(DaemonOptions::default(), 1).await;
    let bot = w.t.chatbots[0];
    let mut other = w.other;

    // A wrong token (the real key's prefix, a wrong secret), with an event pipelined
    // behind it: the event is never looked at.
    let mut wrong = w.t.key.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    for (i, token) in [wrong.as_str(), "bfk_000000_nonsense", "not-a-key"].into_iter().enumerate() {
        let mut c = Client::unix(&w.daemon.unix()).await;
        let id = format!("pipelined-{i}");
        c.send_raw(&format!("{}\n{}\n", hello_line(token, &[bot]), ping(&id, bot))).await;
        let lines = closed_within(&mut c, CLOSE_WITHIN).await;
        assert_eq!(lines.len(), 1, "one error, then the connection closes: {lines:?}");
        assert_error(&lines[0], "unauthenticated", &["token"]);
        assert_eq!(rows_any(&w.db, &id).await, 0, "an event behind a refused hello must not run");
    }

    // An unsupported version.
    let mut c = Client::unix(&w.daemon.unix()).await;
    c.send(&json!({"op": "hello", "version": 2, "token": w.t.key})).await;
    let lines = closed_within(&mut c, CLOSE_WITHIN).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_error(&lines[0], "unsupported_version", &["version"]);

    // An event before any hello.
    let mut c = Client::unix(&w.daemon.unix()).await;
    c.send(&ping("no-hello", bot)).await;
    let lines = closed_within(&mut c, CLOSE_WITHIN).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_error(&lines[0], "unauthenticated", &["hello"]);
    assert_eq!(rows_any(&w.db, "no-hello").await, 0);

    served(&mut other, &w.db, bot, "other-1").await;
    let mut fresh = Client::unix(&w.daemon.unix()).await.hello(&w.t.key, &[]).await;
    served(&mut fresh, &w.db, bot, "fresh-1").await;
}

#[actix_rt::test]
async fn a_hello_without_a_token_gets_invalid_frame_and_the_connection_closes() {
    let w = world(DaemonOptions::default(), 1).await;
    let bot = w.t.chatbots[0];
    let mut other = w.other;

    // The connection must close because of the bad hello, well before the handshake
    // timeout (10 s by default) would close it anyway.
    for hello in [
        json!({"op": "hello", "version": 1, "client": "no-token"}),
        json!({"op": "hello", "version": 1, "token": "", "client": "empty-token"}),
        json!({"op": "hello", "version": 1, "token": 1234, "client": "number-token"}),
    ] {
        let mut c = Client::tcp(w.daemon.tcp()).await;
        c.send(&hello).await;
        let lines = closed_within(&mut c, CLOSE_WITHIN).await;
        assert!(!lines.is_empty(), "{hello}: closed without a word");
        assert_error(&lines[0], "invalid_frame", &["token"]);
        assert_eq!(lines.len(), 1, "{hello}: one error, then the connection closes: {lines:?}");
    }
    served(&mut other, &w.db, bot, "other-1").await;
}

// ---------------------------------------------------------------------------
// 8. Handshake timeout

#[actix_rt::test]
async fn no_hello_before_the_handshake_timeout_closes_the_connection() {
    let w = world(options(|c: &mut Config| c.ingest.handshake_timeout_ms = 300), 1).await;
    let bot = w.t.chatbots[0];
    let mut other = w.other;
    let started = Instant::now();
    let mut silent = Client::tcp(w.daemon.tcp()).await;
    let mut partial = Client::unix(&w.daemon.unix()).await;
    partial.send_raw(r#"{"op":"hello","version":1,"tok"#).await;
    let mut chatty = Client::unix(&w.daemon.unix()).await;
    let mut good = Client::unix(&w.daemon.unix()).await.hello(&w.t.key, &[]).await;

    // Garbage does not keep a connection past the handshake deadline.
    chatty.send_raw("garbage\n").await;
    assert_error(&chatty.recv().await, "invalid_frame", &[]);
    chatty.send_raw("more garbage\n").await;
    assert_error(&chatty.recv().await, "invalid_frame", &[]);

    for (name, c) in [("silent", &mut silent), ("partial", &mut partial), ("chatty", &mut chatty)] {
        let lines = closed_within(c, CLOSE_WITHIN).await;
        assert_eq!(lines.len(), 1, "{name}: one error, then closed: {lines:?}");
        assert_error(&lines[0], "handshake_timeout", &["300"]);
    }
    assert!(started.elapsed() >= Duration::from_millis(280), "closed before the timeout: {:?}", started.elapsed());

    // The welcomed connection is past its own deadline and unaffected.
    assert_quiet(&mut good, "a welcomed connection").await;
    served(&mut good, &w.db, bot, "good-1").await;
    served(&mut other, &w.db, bot, "other-1").await;
}

// ---------------------------------------------------------------------------
// 9. Closed in the middle of a line

#[actix_rt::test]
async fn a_client_closing_mid_line_gets_incomplete_frame_and_the_half_line_is_dropped() {
    let w = world(DaemonOptions::default(), 1).await;
    let bot = w.t.chatbots[0];
    let mut other = w.other;

    for over_tcp in [false, true] {
        let mut c = if over_tcp {
            Client::tcp(w.daemon.tcp()).await
        } else {
            Client::unix(&w.daemon.unix()).await
        }
        .hello(&w.t.key, &[])
        .await;
        let full = format!("full-{over_tcp}");
        let half = format!("half-{over_tcp}");
        // A whole event, then all of a matching event but its closing brace and newline.
        let line = ping(&half, bot).to_string();
        c.send_raw(&format!("{}\n{}", ping(&full, bot), &line[..line.len() - 1])).await;
        c.close_write().await;
        let lines = closed_within(&mut c, Duration::from_secs(5)).await;
        assert_eq!(lines.len(), 2, "the ack of the whole event and one error: {lines:?}");
        let ack = lines.iter().find(|v| v["op"] == "ack").unwrap_or_else(|| panic!("no ack in {lines:?}"));
        assert_eq!(ack["id"], full.as_str());
        let err = lines.iter().find(|v| v["op"] == "error").unwrap_or_else(|| panic!("no error in {lines:?}"));
        assert_error(err, "incomplete_frame", &["middle of a line"]);
        assert_eq!(rows(&w.db, bot, &full).await, 1);
        assert_eq!(rows_any(&w.db, &half).await, 0, "a half line must not be recorded");
    }

    // Closing cleanly after whole lines is no error.
    let mut c = Client::unix(&w.daemon.unix()).await.hello(&w.t.key, &[]).await;
    c.send(&ping("clean", bot)).await;
    c.close_write().await;
    let lines = closed_within(&mut c, Duration::from_secs(5)).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["op"], "ack");

    served(&mut other, &w.db, bot, "other-1").await;
    assert_eq!(rows_any(&w.db, "half-false").await + rows_any(&w.db, "half-true").await, 0);
}

// ---------------------------------------------------------------------------
// 9b. A row the database refuses

#[actix_rt::test]
async fn a_row_the_database_refuses_costs_only_its_own_event() {
    let mut w = world(options(|_| {}), 1).await;
    let bot = w.t.chatbots[0];
    // The database refuses the execution row of the event "poison" (a permanent error,
    // as a violated constraint would be) and of "bad-value" (as a value out of range
    // would be), and holds the row of "blocker" until the test lets go, so the events
    // sent meanwhile queue up for the chatbot's next write.
    w.db.batch_execute(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           IF NEW.event_id = 'blocker' THEN PERFORM pg_advisory_xact_lock_shared(4243); END IF;
           IF NEW.event_id = 'poison' THEN RAISE EXCEPTION 'this row is refused'; END IF;
           IF NEW.event_id = 'bad-value' THEN RAISE EXCEPTION 'a value out of range' USING ERRCODE = '22003'; END IF;
           RETURN NEW; END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON executions FOR EACH ROW EXECUTE FUNCTION refuse_poison();
         SELECT pg_advisory_lock(4243);",
    )
    .await
    .unwrap();
    let mut c = Client::tcp(w.daemon.tcp()).await.hello(&w.t.key, &[]).await;
    c.send(&ping("blocker", bot)).await;
    eventually("the blocker's write waits for the lock", || async {
        let waiting: i64 = w
            .db
            .query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4243 AND NOT granted", &[])
            .await
            .unwrap()
            .get(0);
        waiting == 1
    })
    .await;
    // In one write, so that they are read, matched and written together.
    let ids = ["good-1", "poison", "good-2", "bad-value", "good-3"];
    let lines: String = ids.iter().map(|id| format!("{}\n", ping(id, bot))).collect();
    c.writer.write_all(lines.as_bytes()).await.unwrap();
    w.db.batch_execute("SELECT pg_advisory_unlock(4243)").await.unwrap();

    let mut answers = std::collections::HashMap::new();
    while answers.len() < ids.len() + 1 {
        let v = c.recv().await;
        answers.insert(v["id"].as_str().unwrap_or_else(|| panic!("{v}")).to_string(), v);
    }
    assert_nack(&answers["poison"], Some("poison"), "internal", None);
    assert!(answers["poison"]["error"]["message"].as_str().unwrap().contains("refused"), "{}", answers["poison"]);
    assert_nack(&answers["bad-value"], Some("bad-value"), "invalid_event", None);
    assert!(answers["bad-value"]["error"]["message"].as_str().unwrap().contains("a value out of range"), "{}", answers["bad-value"]);
    for id in ["blocker", "good-1", "good-2", "good-3"] {
        assert_eq!(answers[id]["op"], "ack", "{id}: {}", answers[id]);
        assert_eq!(rows(&w.db, bot, id).await, 1, "{id} acked but not recorded");
    }
    assert_eq!(rows(&w.db, bot, "poison").await + rows(&w.db, bot, "bad-value").await, 0);
    let metrics = w.daemon.metrics().await;
    assert!(metrics.contains(r#"botflow_db_errors_total{kind="permanent"}"#), "the refusal is counted");
    let logs = common::logs();
    assert!(logs.contains("journal write failed permanently; writing row by row"), "{logs}");
    assert!(logs.contains("an event's executions cannot be recorded") && logs.contains("this row is refused"), "{logs}");
    // The chatbot goes on: a later event is acked and recorded as usual.
    w.db.batch_execute("DROP TRIGGER refuse_poison ON executions").await.unwrap();
    served(&mut w.other, &w.db, bot, "after").await;
}

// ---------------------------------------------------------------------------
// 10. Webhook receivers that hang or fail

/// The hanging receiver's step timeout: long enough that another chatbot's workflow
/// demonstrably completes while the hang is still pending.
const HANG_MS: u64 = 3000;

async fn execution_of(db: &tokio_postgres::Client, bot: Uuid, event_id: &str) -> (Uuid, String, Option<String>) {
    let r = db
        .query_one("SELECT id, status, error FROM executions WHERE chatbot_id = $1 AND event_id = $2", &[&bot, &event_id])
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

async fn wait_finished(db: &tokio_postgres::Client, bot: Uuid, event_id: &str) -> (Uuid, String, Option<String>) {
    eventually(&format!("execution of {event_id} finishes"), || async {
        let (_, status, _) = execution_of(db, bot, event_id).await;
        !matches!(status.as_str(), "queued" | "running")
    })
    .await;
    execution_of(db, bot, event_id).await
}

/// (step_id, status, error, output, duration) of an execution's steps, in order.
async fn steps_of(db: &tokio_postgres::Client, execution: Uuid) -> Vec<(String, String, Option<String>, Option<Value>, f64)> {
    db.query(
        "SELECT step_id, status, error, output, EXTRACT(EPOCH FROM finished_at - started_at)::float8
         FROM execution_steps WHERE execution_id = $1 ORDER BY step_index, attempt",
        &[&execution],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

#[actix_rt::test]
async fn hanging_and_failing_webhooks_fail_their_execution_without_holding_up_anyone() {
    let daemon = TestDaemon::start().await;
    let receiver = Receiver::start().await;
    receiver.on("/hang", Behaviour::Hang);
    receiver.on("/fail", Behaviour::Status(500, r#"{"error":"boom"}"#.into()));
    receiver.on("/ok", Behaviour::Status(200, r#"{"ticket":"T-1"}"#.into()));
    let t = tenant(&daemon.store, "hooks", 3).await;
    let (hang_bot, fail_bot, ok_bot) = (t.chatbots[0], t.chatbots[1], t.chatbots[2]);
    for (bot, path, timeout) in [(hang_bot, "/hang", HANG_MS), (fail_bot, "/fail", 5000), (ok_bot, "/ok", 5000)] {
        apply(
            &daemon.store,
            bot,
            json!([{
                "name": format!("hook {path}"),
                "trigger": {"event": "message.received"},
                // One attempt: this test is about isolation, retries are tested elsewhere.
                "retry": {"max_attempts": 1},
                "steps": [
                    {"id": "page", "action": "webhook", "url": receiver.url(path),
                     "body": {"event": "{{event.id}}"}, "timeout_ms": timeout},
                    {"id": "after", "action": "reply", "text": "done {{steps.page.response.ticket}}"}
                ]
            }]),
        )
        .await;
    }
    let db = daemon.db().await;
    let mut c = Client::unix(&daemon.unix()).await.hello(&t.key, &[ok_bot]).await;
    let mut other = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;

    // The event of the hanging receiver is acked once committed, before its steps end.
    let sent = Instant::now();
    c.send(&ping("hang-1", hang_bot)).await;
    let ack = c.recv().await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(ack["id"], "hang-1");
    assert!(sent.elapsed() < Duration::from_millis(HANG_MS), "the ack waited for the steps: {:?}", sent.elapsed());
    let (hang_exec, status, _) = execution_of(&db, hang_bot, "hang-1").await;
    assert!(matches!(status.as_str(), "queued" | "running"), "at ack time the steps have not finished: {status}");
    let hang_hit = receiver.wait_for("/hang", 1).await[0].at;
    // Its `running` status is written once it has run for a moment (RUNNING_MARK_DELAY).
    let mut status = String::new();
    while hang_hit.elapsed() < Duration::from_millis(HANG_MS - 200) {
        status = execution_of(&db, hang_bot, "hang-1").await.1;
        if status == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, "running", "the hanging execution shows as running while it hangs");

    // Meanwhile: the same chatbot keeps acking, the failing receiver's event is acked,
    // and another chatbot's webhook and reply complete.
    let t0 = Instant::now();
    c.send(&ping("hang-2", hang_bot)).await;
    c.send(&ping("fail-1", fail_bot)).await;
    other.send(&ping("ok-1", ok_bot)).await;
    let (answers, _) = c.answers(2).await;
    for id in ["hang-2", "fail-1"] {
        assert_eq!(answers[id]["op"], "ack", "{}", answers[id]);
        assert_eq!(answers[id]["executions"].as_array().unwrap().len(), 1);
    }
    let ok_ack = other.recv().await;
    assert_eq!(ok_ack["op"], "ack", "{ok_ack}");
    let (cmd, _) = c.recv_until(|v| v["op"] == "command").await;
    assert_eq!(cmd["payload"]["text"], "done T-1");
    c.send(&json!({"op": "ack", "command_id": cmd["command_id"]})).await;
    let (ok_exec, status, error) = wait_finished(&db, ok_bot, "ok-1").await;
    assert_eq!(status, "succeeded", "{error:?}");
    assert_eq!(cmd["execution_id"], ok_exec.to_string());
    assert!(
        hang_hit.elapsed() < Duration::from_millis(HANG_MS),
        "the other chatbot's workflow should finish while the webhook still hangs (took {:?})",
        t0.elapsed()
    );

    // The 500 with its only attempt used: dead, the step records the status and the body.
    let (fail_exec, status, error) = wait_finished(&db, fail_bot, "fail-1").await;
    assert_eq!(status, "dead");
    let error = error.expect("a failed execution records its error");
    assert!(error.contains("500") && error.contains("page"), "{error}");
    let steps = steps_of(&db, fail_exec).await;
    assert_eq!(steps.len(), 1, "the execution stops at the failed step: {steps:?}");
    assert_eq!((steps[0].0.as_str(), steps[0].1.as_str()), ("page", "failed"));
    assert!(steps[0].2.as_deref().unwrap_or_default().contains("500"), "{steps:?}");
    assert_eq!(steps[0].3, Some(json!({"status": 500, "response": {"error": "boom"}})));

    // The hang: failed at its timeout, named as such (and dead: no attempt left).
    let (_, status, error) = wait_finished(&db, hang_bot, "hang-1").await;
    assert_eq!(status, "dead");
    let error = error.expect("a failed execution records its error");
    assert!(error.contains("timed out") && error.contains(&HANG_MS.to_string()), "{error}");
    let steps = steps_of(&db, hang_exec).await;
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!((steps[0].0.as_str(), steps[0].1.as_str()), ("page", "failed"));
    assert!(steps[0].2.as_deref().unwrap_or_default().contains("timed out"), "{steps:?}");
    let took = steps[0].4;
    assert!(
        took >= (HANG_MS as f64 / 1000.0) - 0.05 && took < HANG_MS as f64 / 1000.0 + 3.0,
        "the step should end at its timeout, took {took} s"
    );
    let (_, status, _) = wait_finished(&db, hang_bot, "hang-2").await;
    assert_eq!(status, "dead");
    assert_eq!(receiver.count("/ok"), 1);

    // Both connections still serve.
    other.send(&ping("ok-2", ok_bot)).await;
    assert_eq!(other.recv().await["op"], "ack");
    let (cmd, _) = c.recv_until(|v| v["op"] == "command").await;
    c.send(&json!({"op": "ack", "command_id": cmd["command_id"]})).await;
    assert_eq!(wait_finished(&db, ok_bot, "ok-2").await.1, "succeeded");
}

// ---------------------------------------------------------------------------
// 11. Backpressure

#[actix_rt::test]
async fn a_client_that_does_not_read_is_pushed_back_instead_of_buffered() {
    const EVENTS: usize = 1000;
    let w = world(options(|c: &mut Config| c.ingest.max_in_flight = 4), 1).await;
    let bot = w.t.chatbots[0];
    // A window slot is freed once its answer is written to the socket, and the kernel's
    // socket buffers take a good many acks (~150 bytes each) before a write blocks: acks
    // alone for 1000 events may all fit. So every event also produces a large answer, a
    // reply command echoing 4 KiB of text to this (subscribed) client, which fills the
    // buffers quickly. The events are 4 KiB each as well, so the client's own writes
    // visibly stall.
    apply(
        &w.daemon.store,
        bot,
        json!([{
            "name": "Echo",
            "trigger": {"event": "message.received", "keywords": {"any": ["bulk"]}},
            "steps": [{"id": "echo", "action": "reply", "text": "{{event.data.text}}"}]
        }]),
    )
    .await;
    let mut c = Client::unix(&w.daemon.unix()).await.hello(&w.t.key, &[bot]).await;
    let mut other = w.other;
    let welcome = {
        let mut probe = Client::tcp(w.daemon.tcp()).await;
        probe.send(&hello_line(&w.t.key, &[])).await;
        probe.recv().await
    };
    assert_eq!(welcome["max_in_flight"], 4, "{welcome}");

    let text = format!("bulk {}", "z".repeat(4000));
    let mut payload = Vec::new();
    for i in 0..EVENTS {
        let e = event(&format!("bulk-{i:04}"), bot, "message.received", json!({"text": text}));
        payload.extend_from_slice(format!("{e}\n").as_bytes());
    }
    let written = Arc::new(AtomicUsize::new(0));
    let mut writer = std::mem::replace(&mut c.writer, Box::new(tokio::io::sink()));
    let progress = written.clone();
    let writing = tokio::spawn(async move {
        for piece in payload.chunks(16 * 1024) {
            writer.write_all(piece).await.unwrap();
            progress.fetch_add(piece.len(), Ordering::SeqCst);
        }
        writer
    });

    // While nothing is read, the executions stop growing well short of the whole batch.
    let count = || async { rows_of(&w.db, bot).await };
    eventually("the daemon starts executing", || async { count().await > 0 }).await;
    let mut last = count().await;
    let mut stable_since = Instant::now();
    let give_up = Instant::now() + Duration::from_secs(15);
    while stable_since.elapsed() < Duration::from_millis(700) {
        assert!(Instant::now() < give_up, "the executions never stopped growing (at {last})");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = count().await;
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    // How far it gets depends on how soon the replies come (on a loaded machine the
    // executions lag behind the acks), so the bound is three quarters, not a figure.
    assert!(
        last < (EVENTS as i64) * 3 / 4,
        "with nobody reading, the daemon went on to execute {last} of {EVENTS} events"
    );
    assert!(!writing.is_finished(), "the client's writes should be held back too");
    let held = written.load(Ordering::SeqCst);
    assert!(held < EVENTS * text.len() * 3 / 4, "the daemon took {held} bytes without being read");

    // The other connection is not held back meanwhile.
    served(&mut other, &w.db, bot, "other-1").await;

    // Reading again lets everything through: every event acked, every reply delivered.
    let (answers, _) = c.answers(EVENTS).await;
    let acks = answers.values().filter(|v| v["op"] == "ack").count();
    assert_eq!(acks, EVENTS, "every event acked: {:?}", answers.values().find(|v| v["op"] != "ack"));
    // The socket's write half comes back, for the command acks below.
    c.writer = tokio::time::timeout(DEADLINE, writing).await.expect("the writes complete").unwrap();
    eventually("all executions recorded", || async { count().await == EVENTS as i64 + 1 }).await;
    let mut echoes = 0;
    while echoes < EVENTS {
        let (cmd, _) = c.recv_until(|v| v["op"] == "command").await;
        // Each reply step waits for the client's ack before its executor is free.
        c.send(&json!({"op": "ack", "command_id": cmd["command_id"]})).await;
        if cmd["payload"]["text"] == text.as_str() {
            echoes += 1;
        }
    }
    assert_quiet(&mut c, "after every answer and reply").await;
}

// ---------------------------------------------------------------------------
// 12. Garbage

/// Random bytes split into lines, biased towards what breaks parsers.
fn garbage_lines(rng: &mut impl Rng, lines: usize) -> Vec<Vec<u8>> {
    const NASTY: &[&[u8]] = &[b"\0", b"\xff", b"\xc3", b"\xed\xa0\x80", b"{", b"}", b"\"", b"\\", b"\r", b"\t", b"{\"op\":"];
    (0..lines)
        .map(|_| {
            let mut line = Vec::new();
            let n = rng.gen_range(0..200);
            while line.len() < n {
                if rng.gen_bool(0.2) {
                    line.extend_from_slice(NASTY[rng.gen_range(0..NASTY.len())]);
                } else {
                    let b: u8 = rng.gen();
                    if b != b'\n' {
                        line.push(b);
                    }
                }
            }
            line
        })
        .collect()
}

#[actix_rt::test]
async fn garbage_and_connection_storms_do_not_disturb_the_daemon() {
    let w = world(DaemonOptions::default(), 1).await;
    let bot = w.t.chatbots[0];
    let mut other = w.other;
    let seed: u64 = rand::random();
    eprintln!("garbage seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // A storm: connections that close at once, that write garbage and vanish, and that
    // write garbage, half-close and wait for the daemon to close.
    let mut tasks = Vec::new();
    for i in 0..90 {
        let n = rng.gen_range(1..40);
        let blob: Vec<u8> = garbage_lines(&mut rng, n).join(&b'\n');
        let tcp = w.daemon.tcp();
        let unix = w.daemon.unix();
        tasks.push(tokio::spawn(async move {
            let mut c = if i % 2 == 0 { Client::tcp(tcp).await } else { Client::unix(&unix).await };
            match i % 3 {
                0 => drop(c),
                1 => {
                    let _ = c.writer.write_all(&blob).await;
                    drop(c);
                }
                _ => {
                    let _ = c.writer.write_all(&blob).await;
                    c.close_write().await;
                    let mut rest = Vec::new();
                    let closed = tokio::time::timeout(DEADLINE, c.reader.read_to_end(&mut rest)).await;
                    assert!(closed.is_ok(), "the daemon did not close a half-closed garbage connection");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("storm connection");
    }

    // Garbage on an authenticated connection: one error per non-blank line, in order,
    // and the connection stays usable.
    let mut c = Client::unix(&w.daemon.unix()).await.hello(&w.t.key, &[]).await;
    let lines = garbage_lines(&mut rng, 200);
    let expected = lines.iter().filter(|l| l.iter().any(|b| !b.is_ascii_whitespace())).count();
    let mut blob = lines.join(&b'\n');
    blob.push(b'\n');
    blob.extend_from_slice(format!("{}\n", ping("after-garbage", bot)).as_bytes());
    c.writer.write_all(&blob).await.unwrap();
    let mut errors = 0;
    loop {
        let mut raw = Vec::new();
        let n = tokio::time::timeout(DEADLINE, c.reader.read_until(b'\n', &mut raw))
            .await
            .expect("an answer before the deadline")
            .unwrap();
        assert!(n > 0, "the daemon closed the connection after {errors} errors");
        let text = std::str::from_utf8(&raw).expect("the daemon answers in UTF-8 even to garbage");
        let v: Value = serde_json::from_str(text).expect("every answer is one JSON line");
        if v["op"] == "ack" {
            assert_eq!(v["id"], "after-garbage");
            break;
        }
        assert_eq!(v["op"], "error", "{v}");
        assert!(matches!(v["error"]["code"].as_str(), Some("invalid_frame") | Some("unknown_op")), "{v}");
        errors += 1;
    }
    assert_eq!(errors, expected, "one error per garbage line");

    served(&mut c, &w.db, bot, "after-garbage-2").await;
    served(&mut other, &w.db, bot, "other-1").await;
    let mut fresh = Client::tcp(w.daemon.tcp()).await.hello(&w.t.key, &[]).await;
    served(&mut fresh, &w.db, bot, "fresh-1").await;
    let mut fresh = Client::unix(&w.daemon.unix()).await.hello(&w.t.key, &[]).await;
    served(&mut fresh, &w.db, bot, "fresh-2").await;
}

// ---------------------------------------------------------------------------
// Connections and buffers in total

#[actix_rt::test]
async fn connections_past_the_per_address_limit_are_refused_with_a_reason_and_a_closed_one_makes_room() {
    let w = world(options(|c| c.ingest.max_connections_per_peer = 3), 1).await;
    let bot = w.t.chatbots[0];
    // `world` holds one connection from 127.0.0.1 already.
    let mut second = Client::tcp(w.daemon.tcp()).await.hello(&w.t.key, &[]).await;
    let third = Client::tcp(w.daemon.tcp()).await.hello(&w.t.key, &[]).await;
    let mut fourth = Client::tcp(w.daemon.tcp()).await;
    let lines = closed_within(&mut fourth, CLOSE_WITHIN).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_error(&lines[0], "too_many_connections", &["127.0.0.1", "3 connections", "ingest.max_connections_per_peer"]);
    assert!(logs().contains("refused a connection"), "the refusal is logged");
    // The Unix socket is not an address: it is not limited per peer.
    let mut local = Client::unix(&w.daemon.unix()).await.hello(&w.t.key, &[]).await;
    served(&mut local, &w.db, bot, "u1").await;
    // The others were not disturbed, and a closed connection frees its place.
    served(&mut second, &w.db, bot, "t1").await;
    drop(third);
    let start = Instant::now();
    let mut again = loop {
        let mut c = Client::tcp(w.daemon.tcp()).await;
        c.send(&hello_line(&w.t.key, &[])).await;
        if c.recv().await["op"] == "welcome" {
            break c;
        }
        assert!(start.elapsed() < DEADLINE, "no new connection taken after one closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    served(&mut again, &w.db, bot, "t2").await;
}

#[actix_rt::test]
async fn a_line_that_takes_the_connections_over_the_buffer_budget_closes_that_connection_only() {
    // Two unfinished lines of 40 KiB do not fit a 64 KiB budget.
    let w = world(
        options(|c| {
            c.ingest.max_frame_bytes = 64 * 1024;
            c.ingest.buffer_budget_bytes = 64 * 1024;
        }),
        1,
    )
    .await;
    let bot = w.t.chatbots[0];
    let mut first = Client::tcp(w.daemon.tcp()).await.hello(&w.t.key, &[]).await;
    let mut second = Client::tcp(w.daemon.tcp()).await.hello(&w.t.key, &[]).await;
    let half = format!("{{\"op\":\"event\",\"id\":\"big\",\"pad\":\"{}", "x".repeat(40 * 1024));
    first.send_raw(&half).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // let the daemon read it first
    second.send_raw(&half).await;
    let lines = closed_within(&mut second, CLOSE_WITHIN).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_error(&lines[0], "overloaded", &["ingest.buffer_budget_bytes", "send it again"]);
    // The first connection's line was kept: finished, it is answered (an unknown field
    // makes it invalid, which shows it was read whole).
    first.send_raw("\"}\n").await;
    let (v, _) = first.recv_until(|v| v["op"] == "nack").await;
    assert_eq!(v["id"], "big", "{v}");
    served(&mut first, &w.db, bot, "after").await;
    let mut other = w.other;
    served(&mut other, &w.db, bot, "other").await;
}

#[actix_rt::test]
async fn event_data_nested_too_deep_or_with_a_lone_surrogate_is_nacked_invalid_event_naming_it() {
    let mut w = world(options(|_| {}), 1).await;
    let bot = w.t.chatbots[0];
    let mut c = Client::tcp(w.daemon.tcp()).await.hello(&w.t.key, &[]).await;
    let rejected = || async { metric(&w.daemon.metrics().await, "botflow_events_rejected_total", Some("reason=\"invalid_event\"")) };
    let before = rejected().await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    c.send_raw(&format!(
        "{{\"op\":\"event\",\"id\":\"deep\",\"type\":\"message.received\",\"chatbot_id\":\"{bot}\",\"conversation_id\":\"c1\",\"data\":{{\"text\":\"ping\",\"x\":{deep}}}}}\n"
    ))
    .await;
    c.send_raw(&format!(
        "{{\"op\":\"event\",\"id\":\"surrogate\",\"type\":\"message.received\",\"chatbot_id\":\"{bot}\",\"conversation_id\":\"c1\",\"data\":{{\"text\":\"ping \\ud800 there\"}}}}\n"
    ))
    .await;
    c.send_raw(&format!(
        "{{\"op\":\"event\",\"id\":\"surrogate2\",\"type\":\"message.received\",\"chatbot_id\":\"{bot}\",\"conversation_id\":\"c1\",\"data\":{{\"text\":\"ping\",\"note\":\"\\udc00\"}}}}\n"
    ))
    .await;
    let (answers, _) = c.answers(3).await;
    assert_nack(&answers["deep"], Some("deep"), "invalid_event", Some("data"));
    assert!(answers["deep"]["error"]["message"].as_str().unwrap().contains("nested more than 128 levels"), "{}", answers["deep"]);
    // In a field the trigger reads, that field is named; elsewhere, `data`.
    assert_nack(&answers["surrogate"], Some("surrogate"), "invalid_event", Some("data.text"));
    assert_nack(&answers["surrogate2"], Some("surrogate2"), "invalid_event", Some("data"));
    for id in ["surrogate", "surrogate2"] {
        assert!(answers[id]["error"]["message"].as_str().unwrap().contains("surrogate"), "{}", answers[id]);
    }
    assert_eq!(rows_any(&w.db, "deep").await + rows_any(&w.db, "surrogate").await + rows_any(&w.db, "surrogate2").await, 0);
    assert!(rejected().await >= before + 3.0, "counted in botflow_events_rejected_total");
    // Other tests of this process log errors on purpose; none may be about these events.
    let errors: Vec<String> =
        logs().lines().filter(|l| l.contains("ERROR") && (l.contains("deep") || l.contains("surrogate"))).map(String::from).collect();
    assert!(errors.is_empty(), "no ERROR line for bad input: {errors:?}");
    // The connection and the others go on.
    served(&mut c, &w.db, bot, "fine").await;
    served(&mut w.other, &w.db, bot, "other").await;
}
