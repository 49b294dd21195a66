//! Hot reload: workflow changes made through one daemon's admin API reach the
//! supervisor of another daemon on the same database (LISTEN/NOTIFY) while events
//! stream into it, within a second, and no event is lost or matched twice.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use uuid::Uuid;

fn workflow(keyword: &str) -> Value {
    json!({
        "name": "greeter",
        "trigger": {"event": "message.received", "keywords": {"any": [keyword]}},
        "steps": [{"id": "d", "action": "delay", "duration": "0s"}]
    })
}

#[actix_rt::test]
async fn changes_through_one_daemon_reach_another_within_a_second_without_losing_events() {
    let a = TestDaemon::start().await;
    let b = TestDaemon::start_with(DaemonOptions { pg: Some(a.pg.clone()), ..Default::default() }).await;
    let t = tenant(&a.store, "acme", 1).await;
    let bot = t.chatbots[0];
    let admin_key = botflow::store::accounts::create_key(&a.store, t.account, botflow::store::accounts::Role::Admin)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{}/v1/chatbots/{bot}/workflows", a.admin()))
        .bearer_auth(&admin_key)
        .json(&workflow("alpha"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let wid = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["version"], 1, "{created}");

    // Stream events into daemon B: each text holds alpha and beta, never gamma.
    let client = Client::tcp(b.tcp()).await.hello(&t.key, &[]).await;
    let Client { reader, mut writer, .. } = client;
    let started = Instant::now();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = tokio::spawn(async move {
        let mut sent: Vec<Duration> = Vec::new();
        loop {
            if stop_rx.try_recv().is_ok() {
                return sent;
            }
            let i = sent.len();
            let line = format!("{}\n", event(&format!("e{i}"), bot, "message.received", json!({"text": "alpha beta"})));
            writer.write_all(line.as_bytes()).await.unwrap();
            sent.push(started.elapsed());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let receiver = tokio::spawn(async move {
        let mut lines = reader.lines();
        let mut acks: HashMap<String, Value> = HashMap::new();
        while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].as_str().unwrap_or_default().to_string();
            assert_eq!(v["op"], "ack", "every event is acked: {v}");
            assert!(acks.insert(id, v).is_none(), "one answer per event");
        }
        acks
    });

    let change = |keyword: &'static str| {
        let (http, url, key) = (http.clone(), format!("{}/v1/chatbots/{bot}/workflows/{wid}", a.admin()), admin_key.clone());
        async move {
            let before = started.elapsed();
            let r = http.put(url).bearer_auth(key).json(&workflow(keyword)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            (before, started.elapsed(), v["version"].as_i64().unwrap())
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (v2_asked, v2_done, v2) = change("beta").await;
    assert_eq!(v2, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (v3_asked, v3_done, v3) = change("gamma").await;
    assert_eq!(v3, 3);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop_tx.send(()).unwrap();
    let sent = sender.await.unwrap();
    let acks = receiver.await.unwrap();
    assert_eq!(acks.len(), sent.len(), "every one of {} events answered", sent.len());

    // The version each event's execution ran, from the database.
    let db = a.db().await;
    let rows = db
        .query("SELECT event_id, workflow_version FROM executions WHERE chatbot_id = $1", &[&bot])
        .await
        .unwrap();
    let version: HashMap<String, i32> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut last_version = 1;
    for (i, at) in sent.iter().enumerate() {
        let id = format!("e{i}");
        let ack = &acks[&id];
        let executions = ack["executions"].as_array().unwrap();
        assert!(executions.len() <= 1, "{id} matched twice: {ack}");
        if let Some(e) = executions.first() {
            assert_eq!(e["workflow_id"].as_str(), Some(wid.as_str()));
            let _: Uuid = e["execution_id"].as_str().unwrap().parse().unwrap();
        }
        let v = version.get(&id).copied();
        assert_eq!(v.is_some(), !executions.is_empty(), "{id}: the ack and the database agree");
        if *at < v2_asked {
            assert_eq!(v, Some(1), "{id} sent before the first change runs version 1");
        } else if *at < v3_asked {
            // Both versions match this text: one execution, of either version, and
            // never version 1 again once version 2 was seen.
            let v = v.unwrap_or_else(|| panic!("{id} sent between the changes was lost"));
            assert!(v >= last_version, "{id} ran version {v} after an event ran {last_version}");
            last_version = v;
            if *at > v2_done + Duration::from_secs(1) {
                assert_eq!(v, 2, "{id} sent a second after the change runs version 2");
            }
        } else if *at > v3_done + Duration::from_secs(1) {
            assert_eq!(v, None, "{id} sent a second after version 3 (gamma) must not match");
        }
    }
    let late = sent.iter().filter(|at| **at > v3_done + Duration::from_secs(1)).count();
    assert!(late > 50, "the test streamed long enough after the last change ({late} events)");
}
