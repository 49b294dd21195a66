//! The daemon end to end over both listeners: two accounts with two chatbots each,
//! events that trigger only their own chatbot's workflows, acks that arrive after the
//! rows are committed, duplicates, signed webhooks and replies to subscribers.

mod common;

use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

fn workflows_for(chatbot: Uuid, receiver: &Receiver) -> Value {
    json!([
        {
            "name": "Refunds",
            "trigger": {"event": "message.received", "keywords": {"any": ["refund", "money back"]}},
            "steps": [
                {"id": "page", "action": "webhook", "url": receiver.url(&format!("/hook/{chatbot}")),
                 "body": {"conversation": "{{event.conversation_id}}", "text": "{{event.data.text}}",
                          "bot": chatbot.to_string(), "event": "{{event.id}}"},
                 "timeout_ms": 5000},
                {"id": "answer", "action": "reply", "text": "Refund ticket {{steps.page.response.ticket}} opened for {{event.conversation_id}}"}
            ]
        },
        {
            "name": "Greeting",
            "trigger": {"event": "conversation.started"},
            "steps": [{"id": "hi", "action": "reply", "text": "Hello from {{event.chatbot_id}}"}]
        }
    ])
}

/// Rows the database holds for one event of one chatbot.
async fn rows_for(db: &tokio_postgres::Client, chatbot: Uuid, event_id: &str) -> Vec<(Uuid, Uuid, Uuid)> {
    db.query(
        "SELECT id, workflow_id, chatbot_id FROM executions WHERE event_id = $1 AND chatbot_id = $2",
        &[&event_id, &chatbot],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[actix_rt::test]
async fn events_flow_end_to_end_over_unix_and_tcp() {
    let daemon = TestDaemon::start().await;
    let receiver = Receiver::start().await;
    receiver.on("/hook/", Behaviour::Status(200, r#"{"ticket":"T-42"}"#.into()));
    let a = tenant(&daemon.store, "acme", 2).await;
    let b = tenant(&daemon.store, "globex", 2).await;
    let mut workflow_owner = std::collections::HashMap::new();
    for bot in a.chatbots.iter().chain(&b.chatbots) {
        for wf in apply(&daemon.store, *bot, workflows_for(*bot, &receiver)).await {
            workflow_owner.insert(wf, *bot);
        }
    }
    let db = daemon.db().await;

    let mut ca = Client::unix(&daemon.unix()).await.hello(&a.key, &[a.chatbots[0]]).await;
    let mut cb = Client::tcp(daemon.tcp()).await.hello(&b.key, &[b.chatbots[0]]).await;

    for (client, t, tag) in [(&mut ca, &a, "a"), (&mut cb, &b, "b")] {
        let refund = format!("{tag}-refund");
        let hello = format!("{tag}-start");
        let chit = format!("{tag}-chat");
        client
            .send(&event(&refund, t.chatbots[0], "message.received", json!({"text": "I want my money back", "sender": "user"})))
            .await;
        client.send(&event(&hello, t.chatbots[1], "conversation.started", json!({"channel": "web"}))).await;
        client.send(&event(&chit, t.chatbots[0], "message.received", json!({"text": "nice weather"}))).await;
        let (answers, _) = client.answers(3).await;
        for (id, bot, expected) in [(&refund, t.chatbots[0], 1), (&hello, t.chatbots[1], 1), (&chit, t.chatbots[0], 0)] {
            let ack = &answers[id.as_str()];
            assert_eq!(ack["op"], "ack", "{ack}");
            assert_eq!(ack["duplicate"], false);
            let executions = ack["executions"].as_array().unwrap();
            assert_eq!(executions.len(), expected, "{ack}");
            // The ack came after the commit: the rows are there now, for this chatbot only.
            let rows = rows_for(&db, bot, id).await;
            assert_eq!(rows.len(), expected, "rows of {id} at ack time");
            for x in executions {
                let eid: Uuid = x["execution_id"].as_str().unwrap().parse().unwrap();
                let wid: Uuid = x["workflow_id"].as_str().unwrap().parse().unwrap();
                assert!(rows.iter().any(|r| r.0 == eid && r.1 == wid), "{x} not in {rows:?}");
                assert_eq!(workflow_owner[&wid], bot, "an event triggered another chatbot's workflow");
            }
            let all: i64 = db.query_one("SELECT count(*) FROM executions WHERE event_id = $1", &[id]).await.unwrap().get(0);
            assert_eq!(all, expected as i64, "{id} created executions in other chatbots");
        }

        // A re-sent event is a duplicate: same executions, nothing new.
        client
            .send(&event(&refund, t.chatbots[0], "message.received", json!({"text": "I want my money back"})))
            .await;
        let (dup, _) = client.recv_until(|v| v["op"] == "ack" && v["id"] == refund.as_str()).await;
        assert_eq!(dup["duplicate"], true, "{dup}");
        assert_eq!(dup["executions"], answers[refund.as_str()]["executions"]);
        assert_eq!(rows_for(&db, t.chatbots[0], &refund).await.len(), 1);
    }

    // The webhook arrived rendered, signed and with the idempotency key.
    for t in [&a, &b] {
        let bot = t.chatbots[0];
        let hits = receiver.wait_for(&format!("/hook/{bot}"), 1).await;
        assert_eq!(hits.len(), 1, "the duplicate must not call the webhook again");
        let hit = &hits[0];
        let body = hit.json();
        assert_eq!(body["conversation"], "conv-1");
        assert_eq!(body["text"], "I want my money back");
        assert_eq!(body["bot"], bot.to_string());
        let secret: String =
            db.query_one("SELECT webhook_secret FROM chatbots WHERE id = $1", &[&bot]).await.unwrap().get(0);
        let ts = hit.header("x-botflow-timestamp").expect("timestamp header");
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(&hit.body);
        let expected = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(hit.header("x-botflow-signature"), Some(expected.as_str()), "signature");
        let execution: Uuid = db
            .query_one("SELECT id FROM executions WHERE chatbot_id = $1 AND event_type = 'message.received'", &[&bot])
            .await
            .unwrap()
            .get(0);
        assert_eq!(hit.header("idempotency-key"), Some(format!("{execution}:page").as_str()));
    }

    // Replies reach the subscribed connection only, rendered with the webhook's answer.
    for (client, t, tag) in [(&mut ca, &a, "a"), (&mut cb, &b, "b")] {
        let (cmd, _) = client.recv_until(|v| v["op"] == "command").await;
        assert_eq!(cmd["kind"], "reply");
        assert_eq!(cmd["chatbot_id"], t.chatbots[0].to_string());
        assert_eq!(cmd["conversation_id"], "conv-1");
        assert_eq!(cmd["payload"]["text"], "Refund ticket T-42 opened for conv-1", "{tag}: {cmd}");
        client.send(&json!({"op": "ack", "command_id": cmd["command_id"]})).await;
        // chatbots[1]'s greeting went to nobody: neither client subscribed to it.
        assert!(client.try_recv(std::time::Duration::from_millis(300)).await.is_none());
    }

    // It waits in the outbox: a connection that subscribes to chatbots[1] gets it.
    for (t, unix) in [(&a, true), (&b, false)] {
        let late = if unix { Client::unix(&daemon.unix()).await } else { Client::tcp(daemon.tcp()).await };
        let mut late = late.hello(&t.key, &[t.chatbots[1]]).await;
        let (cmd, _) = late.recv_until(|v| v["op"] == "command").await;
        assert_eq!(cmd["chatbot_id"], t.chatbots[1].to_string());
        assert_eq!(cmd["payload"]["text"], format!("Hello from {}", t.chatbots[1]));
        late.send(&json!({"op": "ack", "command_id": cmd["command_id"]})).await;
    }

    // Every execution finished with its steps recorded.
    eventually("executions finish", || async {
        let n: i64 = db
            .query_one("SELECT count(*) FROM executions WHERE status <> 'succeeded'", &[])
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
    let steps: i64 = db.query_one("SELECT count(*) FROM execution_steps WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
    // two refunds × (webhook + reply) + two greetings × reply
    assert_eq!(steps, 6);
    let out: Value = db
        .query_one(
            "SELECT s.output FROM execution_steps s JOIN executions e ON e.id = s.execution_id
             WHERE e.chatbot_id = $1 AND s.step_id = 'page'",
            &[&a.chatbots[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(out, json!({"status": 200, "response": {"ticket": "T-42"}}));
}

#[actix_rt::test]
async fn one_busy_chatbot_over_eight_connections_keeps_each_connections_ack_order_and_counts_every_execution_once() {
    let daemon = TestDaemon::start().await;
    let t = tenant(&daemon.store, "busy", 1).await;
    let bot = t.chatbots[0];
    apply(&daemon.store, bot, json!([{"name": "tag", "trigger": {"event": "x.busy"},
                                      "steps": [{"id": "d", "action": "delay", "duration": "0s"}]}]))
    .await;
    const CONNECTIONS: usize = 8;
    const EVENTS: usize = 150;
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let mut client = Client::unix(&daemon.unix()).await.hello(&t.key, &[]).await;
        tasks.push(tokio::spawn(async move {
            let sent: Vec<String> = (0..EVENTS).map(|i| format!("c{c}-e{i}")).collect();
            for id in &sent {
                client.send(&event(id, bot, "x.busy", json!({}))).await;
            }
            let mut acked = Vec::new();
            while acked.len() < EVENTS {
                let v = client.recv().await;
                if v["op"] == "ack" || v["op"] == "nack" {
                    assert_eq!(v["op"], "ack", "{v}");
                    acked.push(v["id"].as_str().unwrap().to_string());
                }
            }
            // One connection's events of one chatbot are acked in the order sent.
            assert_eq!(acked, sent, "connection {c}");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let db = daemon.db().await;
    let total = (CONNECTIONS * EVENTS) as i64;
    eventually("every execution succeeds", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE chatbot_id = $1 AND status = 'succeeded'", &[&bot]).await.unwrap().get(0);
        n == total
    })
    .await;
    let rows: i64 = db.query_one("SELECT count(*) FROM executions WHERE chatbot_id = $1", &[&bot]).await.unwrap().get(0);
    assert_eq!(rows, total, "one execution per event");
    // The rollups analytics reads add up, whichever lanes wrote them.
    let r = db
        .query_one(
            "SELECT sum(created)::int8, sum(succeeded)::int8, count(DISTINCT shard) FROM execution_stats WHERE chatbot_id = $1",
            &[&bot],
        )
        .await
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (total, total));
    assert!(r.get::<_, i64>(2) > 1, "the busy chatbot's connections were spread over the journal's lanes");
}
