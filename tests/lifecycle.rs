//! The lifecycle of keys and chatbots as their owners and operators see it: a revoked
//! key's open connections are told and closed within a second, on the daemon that
//! revoked it and on another daemon of the same database; a rotated key works during
//! its grace period and is refused after it; who may manage which keys; the audit log;
//! a chatbot's rotated webhook secret signing beside the new one during its grace; a
//! deleted chatbot refused on every daemon, its history kept or pruned as asked.

mod common;

use botflow::store::accounts::{self, Role};
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

async fn call(d: &TestDaemon, method: reqwest::Method, key: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", d.admin())).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn operator(d: &TestDaemon) -> String {
    d.app().operator_key.clone().expect("a fresh database gets an operator key")
}

async fn key_id(d: &TestDaemon, key: &str) -> Uuid {
    let db = d.db().await;
    db.query_one("SELECT id FROM api_keys WHERE prefix = $1", &[&&key[4..16]]).await.unwrap().get(0)
}

/// Reads until the daemon closes the connection, at most `within`; the lines read, and
/// when the close came.
async fn closed_within(c: &mut Client, within: Duration) -> (Vec<Value>, Instant) {
    let lines = tokio::time::timeout(within, c.until_closed()).await.unwrap_or_else(|_| panic!("still open after {within:?}"));
    (lines, Instant::now())
}

fn withdrawn_line(lines: &[Value], why: &str) {
    let last = lines.last().unwrap_or_else(|| panic!("no error line before the close"));
    assert_eq!(last["op"], "error", "{lines:?}");
    assert_eq!(last["error"]["code"], "unauthenticated", "{lines:?}");
    assert!(last["error"]["message"].as_str().unwrap().contains(why), "{lines:?}");
}

/// A hello with `key` is refused with `unauthenticated`.
async fn hello_refused(d: &TestDaemon, key: &str) {
    let mut c = Client::tcp(d.tcp()).await;
    c.send(&json!({"op":"hello","version":1,"token":key})).await;
    let lines = c.until_closed().await;
    assert_eq!(lines[0]["error"]["code"], "unauthenticated", "{lines:?}");
}

#[actix_rt::test]
async fn a_revoked_keys_connections_are_closed_within_a_second_on_every_daemon() {
    let a = TestDaemon::start().await;
    let b = TestDaemon::start_with(DaemonOptions { pg: Some(a.pg.clone()), ..Default::default() }).await;
    let t = tenant(&a.store, "acme", 1).await;
    let bot = t.chatbots[0];
    let other = accounts::create_key(&a.store, t.account, Role::Ingest).await.unwrap();
    let mut on_a = Client::tcp(a.tcp()).await.hello(&t.key, &[bot]).await;
    let mut on_b = Client::unix(&b.unix()).await.hello(&t.key, &[bot]).await;
    let mut bystander = Client::tcp(b.tcp()).await.hello(&other, &[bot]).await;
    // The connections work before.
    on_b.send(&event("before", bot, "x.none", json!({}))).await;
    assert_eq!(on_b.recv().await["op"], "ack");

    let id = key_id(&a, &t.key).await;
    let (status, row) = call(&a, reqwest::Method::POST, &operator(&a), &format!("/v1/keys/{id}/revoke"), None).await;
    assert_eq!(status, 200, "{row}");
    let revoked_at = Instant::now();
    assert_eq!(row["state"], "revoked", "{row}");
    let ((lines_a, _), (lines_b, _)) =
        tokio::join!(closed_within(&mut on_a, Duration::from_secs(1)), closed_within(&mut on_b, Duration::from_secs(1)));
    assert!(revoked_at.elapsed() < Duration::from_secs(1), "closed after {:?}", revoked_at.elapsed());
    withdrawn_line(&lines_a, "revoked");
    withdrawn_line(&lines_b, "revoked");

    // Refused from now on, over HTTP and on the socket, on both daemons.
    let (status, _) = call(&a, reqwest::Method::POST, &t.key, "/v1/events", Some(json!([]))).await;
    assert_eq!(status, 401);
    hello_refused(&a, &t.key).await;
    hello_refused(&b, &t.key).await;
    // Another key of the same account is not disturbed.
    bystander.send(&json!({"op":"ping"})).await;
    assert_eq!(bystander.recv().await["op"], "pong");
    // Revoking again changes nothing, and is audited once.
    let (status, again) = call(&a, reqwest::Method::POST, &operator(&a), &format!("/v1/keys/{id}/revoke"), None).await;
    assert_eq!((status, &again["revoked_at"]), (200, &row["revoked_at"]));
    let (_, audit) = call(&a, reqwest::Method::GET, &operator(&a), &format!("/v1/audit?account_id={}", t.account), None).await;
    let items = audit["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{audit}");
    assert_eq!((items[0]["action"].as_str(), items[0]["target_id"].as_str()), (Some("key.revoke"), Some(&*id.to_string())));
    assert_eq!(items[0]["actor_role"], "operator");
}

#[actix_rt::test]
async fn a_rotated_key_works_during_its_grace_period_and_is_refused_after_it() {
    let d = TestDaemon::start().await;
    let t = tenant(&d.store, "acme", 1).await;
    let bot = t.chatbots[0];
    let admin = accounts::create_key(&d.store, t.account, Role::Admin).await.unwrap();
    let old_id = key_id(&d, &t.key).await;
    let mut open = Client::tcp(d.tcp()).await.hello(&t.key, &[bot]).await;

    let (status, rotated) =
        call(&d, reqwest::Method::POST, &admin, &format!("/v1/keys/{old_id}/rotate"), Some(json!({"grace_seconds": 2}))).await;
    assert_eq!(status, 201, "{rotated}");
    let grace_from = Instant::now();
    let new_key = rotated["key"].as_str().unwrap().to_string();
    assert_eq!((rotated["new"]["role"].as_str(), rotated["new"]["state"].as_str()), (Some("ingest"), Some("active")));
    assert_eq!(rotated["old"]["state"], "expiring");
    assert_eq!(rotated["old"]["replaced_by"], rotated["new"]["id"]);
    // A rotated key cannot be rotated again: its replacement is the one to rotate.
    let (status, _) =
        call(&d, reqwest::Method::POST, &admin, &format!("/v1/keys/{old_id}/rotate"), Some(json!({"grace_seconds": 2}))).await;
    assert_eq!(status, 409);

    // During the grace both keys work: the open connection, a new one, HTTP.
    open.send(&event("during", bot, "x.none", json!({}))).await;
    assert_eq!(open.recv().await["op"], "ack");
    let mut fresh_old = Client::tcp(d.tcp()).await.hello(&t.key, &[]).await;
    let mut fresh_new = Client::tcp(d.tcp()).await.hello(&new_key, &[bot]).await;
    let http_event = json!([{"id": "http", "chatbot_id": bot, "type": "x.none", "conversation_id": "c"}]);
    let (status, answer) = call(&d, reqwest::Method::POST, &t.key, "/v1/events", Some(http_event)).await;
    assert_eq!(status, 200, "{answer}");
    assert!(grace_from.elapsed() < Duration::from_secs(2), "the checks took the whole grace period");

    // After it the old key's connections are told and closed (within a second of the
    // expiry), and the old key is refused; the new one goes on.
    let ((lines, closed), (lines2, _)) =
        tokio::join!(closed_within(&mut open, Duration::from_secs(4)), closed_within(&mut fresh_old, Duration::from_secs(4)));
    withdrawn_line(&lines, "expired");
    withdrawn_line(&lines2, "expired");
    let after = closed.duration_since(grace_from);
    assert!(after >= Duration::from_millis(1900) && after < Duration::from_secs(3), "closed {after:?} after the rotation");
    hello_refused(&d, &t.key).await;
    let (status, _) = call(&d, reqwest::Method::POST, &t.key, "/v1/events", Some(json!([]))).await;
    assert_eq!(status, 401);
    fresh_new.send(&event("after", bot, "x.none", json!({}))).await;
    assert_eq!(fresh_new.recv().await["op"], "ack");

    // The list shows both, never a key; the audit names the admin key that rotated.
    let (_, keys) = call(&d, reqwest::Method::GET, &admin, "/v1/keys", None).await;
    let items = keys["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{keys}");
    let state = |id: &Value| items.iter().find(|k| &k["id"] == id).map(|k| k["state"].clone());
    assert_eq!(state(&json!(old_id)), Some(json!("expired")));
    assert_eq!(state(&rotated["new"]["id"]), Some(json!("active")));
    assert!(!keys.to_string().contains(&new_key[17..]) && !keys.to_string().contains(&t.key[17..]), "{keys}");
    assert!(items.iter().all(|k| k.get("key_hash").is_none()));
    let used = items.iter().find(|k| k["id"] == json!(old_id)).unwrap();
    assert!(used["last_used_at"].is_string(), "{used}");
    let (_, audit) = call(&d, reqwest::Method::GET, &admin, "/v1/audit", None).await;
    let entry = &audit["items"][0];
    assert_eq!(entry["action"], "key.rotate", "{audit}");
    assert_eq!(entry["actor_key_id"], json!(key_id(&d, &admin).await));
    assert_eq!(entry["details"]["new_key_id"], rotated["new"]["id"]);
    assert_eq!(entry["details"]["grace_seconds"], 2.0);
}

#[actix_rt::test]
async fn keys_are_managed_by_their_accounts_admins_and_by_operators_only() {
    let d = TestDaemon::start().await;
    let op = operator(&d);
    let a = tenant(&d.store, "alpha", 0).await;
    let b = tenant(&d.store, "bravo", 0).await;
    let admin_a = accounts::create_key(&d.store, a.account, Role::Admin).await.unwrap();
    let operator_in_a = accounts::create_key(&d.store, a.account, Role::Operator).await.unwrap();
    let (a_ingest, b_ingest, a_op) = (key_id(&d, &a.key).await, key_id(&d, &b.key).await, key_id(&d, &operator_in_a).await);
    let post = reqwest::Method::POST;

    // An admin lists its own account's keys only; naming another lists nothing.
    let (_, mine) = call(&d, reqwest::Method::GET, &admin_a, "/v1/keys", None).await;
    let accounts_seen: Vec<&Value> = mine["items"].as_array().unwrap().iter().map(|k| &k["account_id"]).collect();
    assert!(accounts_seen.len() == 3 && accounts_seen.iter().all(|x| **x == json!(a.account)), "{mine}");
    let (status, theirs) = call(&d, reqwest::Method::GET, &admin_a, &format!("/v1/keys?account_id={}", b.account), None).await;
    assert_eq!((status, &theirs["items"]), (200, &json!([])));
    // Another account's key is not found, word for word as one that does not exist.
    let (status, e) = call(&d, post.clone(), &admin_a, &format!("/v1/keys/{b_ingest}/revoke"), None).await;
    assert_eq!(status, 404, "{e}");
    let ghost = Uuid::now_v7();
    let (_, g) = call(&d, post.clone(), &admin_a, &format!("/v1/keys/{ghost}/revoke"), None).await;
    assert_eq!(e["error"]["message"].as_str().unwrap().replace(&b_ingest.to_string(), "X"), g["error"]["message"].as_str().unwrap().replace(&ghost.to_string(), "X"));
    // An admin may not revoke or rotate an operator key, even in its own account.
    let (status, _) = call(&d, post.clone(), &admin_a, &format!("/v1/keys/{a_op}/revoke"), None).await;
    assert_eq!(status, 403);
    let (status, _) = call(&d, post.clone(), &admin_a, &format!("/v1/keys/{a_op}/rotate"), Some(json!({}))).await;
    assert_eq!(status, 403);
    // An ingest key manages nothing.
    let (status, _) = call(&d, post.clone(), &a.key, &format!("/v1/keys/{a_ingest}/revoke"), None).await;
    assert_eq!(status, 403);
    let (status, _) = call(&d, reqwest::Method::GET, &a.key, "/v1/keys", None).await;
    assert_eq!(status, 403);
    // A grace period beyond 30 days is refused, naming the field.
    let (status, e) =
        call(&d, post.clone(), &admin_a, &format!("/v1/keys/{a_ingest}/rotate"), Some(json!({"grace_seconds": 9_999_999}))).await;
    assert_eq!((status, e["error"]["field"].as_str()), (422, Some("grace_seconds")), "{e}");
    // Nothing of that changed a key.
    let db = d.db().await;
    let changed: i64 = db
        .query_one("SELECT count(*) FROM api_keys WHERE revoked_at IS NOT NULL OR expires_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(changed, 0);
    // The admin revokes its account's ingest key; the operator any key, operator ones too.
    let (status, _) = call(&d, post.clone(), &admin_a, &format!("/v1/keys/{a_ingest}/revoke"), None).await;
    assert_eq!(status, 200);
    let (status, _) = call(&d, post.clone(), &op, &format!("/v1/keys/{a_op}/revoke"), None).await;
    assert_eq!(status, 200);
    let (status, _) = call(&d, post, &op, &format!("/v1/keys/{b_ingest}/revoke"), None).await;
    assert_eq!(status, 200);
    // Each account's admins read their own account's audit only.
    let (_, audit) = call(&d, reqwest::Method::GET, &admin_a, "/v1/audit", None).await;
    let targets: Vec<&Value> = audit["items"].as_array().unwrap().iter().map(|e| &e["target_id"]).collect();
    assert_eq!(targets, vec![&json!(a_op), &json!(a_ingest)], "{audit}");
    // An admin that revokes its own key is refused from then on.
    let own = key_id(&d, &admin_a).await;
    let (status, _) = call(&d, reqwest::Method::POST, &admin_a, &format!("/v1/keys/{own}/revoke"), None).await;
    assert_eq!(status, 200);
    let (status, _) = call(&d, reqwest::Method::GET, &admin_a, "/v1/keys", None).await;
    assert_eq!(status, 401);
}

fn hmac_v1(secret: &str, timestamp: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The secrets whose signatures a request carries, in the header's order.
fn signed_by(r: &Received, secrets: &[(&str, &str)]) -> Vec<String> {
    let ts = r.header("X-Botflow-Timestamp").unwrap();
    r.header("X-Botflow-Signature")
        .unwrap()
        .split(',')
        .map(|sig| {
            let who = secrets.iter().find(|(_, s)| hmac_v1(s, ts, &r.body) == sig);
            who.map(|(name, _)| name.to_string()).unwrap_or_else(|| format!("invalid {sig}"))
        })
        .collect()
}

#[actix_rt::test]
async fn a_rotated_webhook_secret_signs_beside_the_new_one_during_its_grace_period() {
    let receiver = Receiver::start().await;
    let d = TestDaemon::start().await;
    let t = tenant(&d.store, "acme", 2).await;
    let (bot, other_bot) = (t.chatbots[0], t.chatbots[1]);
    let admin = accounts::create_key(&d.store, t.account, Role::Admin).await.unwrap();
    let url = receiver.url("/hook");
    apply(&d.store, bot, json!([{"name": "hook", "trigger": {"event": "x.go"}, "steps": [{"id": "call", "action": "webhook", "url": url}]}])).await;
    let old = accounts::get_chatbot(&d.store, bot).await.unwrap().unwrap().signing().current;
    let mut c = Client::tcp(d.tcp()).await.hello(&t.key, &[]).await;
    let mut fire = async |id: &str| {
        c.send(&event(id, bot, "x.go", json!({}))).await;
        assert_eq!(c.recv().await["op"], "ack");
    };
    fire("before").await;
    let r = receiver.wait_for("/hook", 1).await;
    assert_eq!(signed_by(&r[0], &[("old", &old)]), ["old"]);

    let (status, v) =
        call(&d, reqwest::Method::POST, &admin, &format!("/v1/chatbots/{bot}/rotate-secret"), Some(json!({"grace_seconds": 2}))).await;
    assert_eq!(status, 200, "{v}");
    let rotated = Instant::now();
    let new = v["secret"].as_str().unwrap().to_string();
    assert!(new.len() == 64 && new != old, "{v}");
    assert!(v["previous_secret_expires_at"].is_string(), "{v}");
    let both = [("new", new.as_str()), ("old", old.as_str())];
    fire("during").await;
    let r = receiver.wait_for("/hook", 2).await;
    assert!(rotated.elapsed() < Duration::from_secs(2));
    assert_eq!(signed_by(&r[1], &both), ["new", "old"], "{:?}", r[1].header("X-Botflow-Signature"));

    tokio::time::sleep(Duration::from_secs(2).saturating_sub(rotated.elapsed()) + Duration::from_millis(100)).await;
    fire("after").await;
    let r = receiver.wait_for("/hook", 3).await;
    assert_eq!(signed_by(&r[2], &both), ["new"]);

    // The chatbot's admins and operators only; audited.
    let other = tenant(&d.store, "other", 0).await;
    let other_admin = accounts::create_key(&d.store, other.account, Role::Admin).await.unwrap();
    let (status, _) = call(&d, reqwest::Method::POST, &other_admin, &format!("/v1/chatbots/{other_bot}/rotate-secret"), Some(json!({}))).await;
    assert_eq!(status, 404);
    let (status, _) = call(&d, reqwest::Method::POST, &t.key, &format!("/v1/chatbots/{other_bot}/rotate-secret"), Some(json!({}))).await;
    assert_eq!(status, 403);
    let (_, audit) = call(&d, reqwest::Method::GET, &admin, "/v1/audit", None).await;
    assert_eq!(audit["items"][0]["action"], "chatbot.rotate_secret", "{audit}");
    assert_eq!(audit["items"][0]["target_id"], json!(bot));
    assert_eq!(audit["items"].as_array().unwrap().len(), 1);
}

#[actix_rt::test]
async fn a_secret_rotated_through_another_daemon_signs_here_too() {
    let receiver = Receiver::start().await;
    let a = TestDaemon::start().await;
    let b = TestDaemon::start_with(DaemonOptions { pg: Some(a.pg.clone()), ..Default::default() }).await;
    let t = tenant(&a.store, "acme", 1).await;
    let bot = t.chatbots[0];
    apply(&a.store, bot, json!([{"name": "hook", "trigger": {"event": "x.go"}, "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/hook")}]}])).await;
    let old = accounts::get_chatbot(&a.store, bot).await.unwrap().unwrap().signing().current;
    // B's supervisor for the chatbot runs (and holds the secret) before the rotation.
    let mut c = Client::unix(&b.unix()).await.hello(&t.key, &[]).await;
    c.send(&event("warm", bot, "x.go", json!({}))).await;
    assert_eq!(c.recv().await["op"], "ack");
    receiver.wait_for("/hook", 1).await;
    let (status, v) =
        call(&a, reqwest::Method::POST, &operator(&a), &format!("/v1/chatbots/{bot}/rotate-secret"), Some(json!({"grace_seconds": 60}))).await;
    assert_eq!(status, 200, "{v}");
    let new = v["secret"].as_str().unwrap().to_string();
    let both = [("new", new.as_str()), ("old", old.as_str())];
    // Announced within a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.send(&event("after", bot, "x.go", json!({}))).await;
    assert_eq!(c.recv().await["op"], "ack");
    let r = receiver.wait_for("/hook", 2).await;
    assert_eq!(signed_by(&r[1], &both), ["new", "old"]);
}

/// Rows of `sql` (one bind: a chatbot id) counted.
async fn count_of(db: &tokio_postgres::Client, sql: &str, bot: Uuid) -> i64 {
    db.query_one(sql, &[&bot]).await.unwrap().get(0)
}

/// Sends `id` for `bot` until it is refused as an unknown chatbot; answers the acks seen
/// before that.
async fn until_unknown(c: &mut Client, bot: Uuid, id: &str) -> usize {
    let mut acked = 0;
    let mut n = 0;
    loop {
        n += 1;
        c.send(&event(&format!("{id}-{n}"), bot, "x.go", json!({}))).await;
        let answer = c.recv().await;
        match answer["op"].as_str() {
            Some("ack") => acked += 1,
            _ => {
                assert_eq!(answer["error"]["code"], "unknown_chatbot", "{answer}");
                assert_eq!(answer["error"]["message"], format!("chatbot {bot} does not exist"), "{answer}");
                return acked;
            }
        }
        assert!(n < 500, "events for a deleted chatbot are still acked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix_rt::test]
async fn a_deleted_chatbot_is_refused_on_every_daemon_and_its_history_kept_or_pruned_as_asked() {
    // The pruner runs only when told (a deletion) in this test.
    let slow = |c: &mut botflow::config::Config| c.retention.interval_seconds = 3600;
    let a = TestDaemon::start_with(DaemonOptions { tweak: Box::new(slow), ..Default::default() }).await;
    let b = TestDaemon::start_with(DaemonOptions { pg: Some(a.pg.clone()), tweak: Box::new(slow) }).await;
    let t = tenant(&a.store, "acme", 3).await;
    let (kept, pruned, bystander) = (t.chatbots[0], t.chatbots[1], t.chatbots[2]);
    let receiver = Receiver::start().await;
    receiver.on("/fail", Behaviour::Status(500, "{}".into()));
    let flows = json!([
        {"name": "quick", "trigger": {"event": "x.go"}, "steps": [{"id": "t", "action": "delay", "duration": "0s"}]},
        {"name": "later", "trigger": {"event": "x.later"}, "steps": [{"id": "w", "action": "delay", "duration": "1h"}]},
        {"name": "fails", "trigger": {"event": "x.fail"}, "retry": {"max_attempts": 1},
         "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/fail")}]}
    ]);
    for bot in [kept, pruned, bystander] {
        apply(&a.store, bot, flows.clone()).await;
    }
    let db = a.db().await;
    // History on daemon B: finished executions of each, and one waiting an hour on `kept`.
    let mut on_b = Client::unix(&b.unix()).await.hello(&t.key, &[]).await;
    for bot in [kept, pruned, bystander] {
        for i in 0..5 {
            on_b.send(&event(&format!("h{i}-{bot}"), bot, "x.go", json!({}))).await;
            assert_eq!(on_b.recv().await["op"], "ack");
        }
    }
    on_b.send(&event("wait", kept, "x.later", json!({}))).await;
    assert_eq!(on_b.recv().await["op"], "ack");
    on_b.send(&event("dies", pruned, "x.fail", json!({}))).await;
    assert_eq!(on_b.recv().await["op"], "ack");
    let finished = "SELECT count(*) FROM executions WHERE chatbot_id = $1 AND status = 'succeeded'";
    for bot in [kept, pruned, bystander] {
        eventually("the history is written", || async { count_of(&db, finished, bot).await == 5 }).await;
    }
    eventually("the dead letter is written", || async {
        count_of(&db, "SELECT count(*) FROM dead_letters WHERE chatbot_id = $1", pruned).await == 1
    })
    .await;
    let op = operator(&a);
    let admin = accounts::create_key(&a.store, t.account, Role::Admin).await.unwrap();

    // Refused while an execution is unfinished, naming why; nothing changes.
    let (status, v) = call(&a, reqwest::Method::DELETE, &admin, &format!("/v1/chatbots/{kept}?history=keep"), None).await;
    assert_eq!((status, v["error"]["code"].as_str()), (409, Some("conflict")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("1 unfinished executions"), "{v}");
    let (status, _) = call(&a, reqwest::Method::GET, &admin, &format!("/v1/chatbots/{kept}"), None).await;
    assert_eq!(status, 200);
    // The history must be named.
    let (status, v) = call(&a, reqwest::Method::DELETE, &admin, &format!("/v1/chatbots/{kept}"), None).await;
    assert_eq!((status, v["error"]["field"].as_str()), (422, Some("history")), "{v}");
    assert!(v.to_string().contains("history=keep or history=prune"), "{v}");

    // With force: the waiting execution is cancelled, and B refuses the chatbot's events
    // once it heard of the deletion.
    let (status, v) = call(&a, reqwest::Method::DELETE, &admin, &format!("/v1/chatbots/{kept}?history=keep&force=true"), None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((v["history"].as_str(), v["cancelled_executions"].as_i64()), (Some("keep"), Some(1)), "{v}");
    // Events B acked before it heard are recorded (and cancelled by the pruner's sweep).
    let late = until_unknown(&mut on_b, kept, "late").await as i64;
    let cancelled = db
        .query_one("SELECT status, error FROM executions WHERE chatbot_id = $1 AND event_id = 'wait'", &[&kept])
        .await
        .unwrap();
    assert_eq!(cancelled.get::<_, String>(0), "cancelled");
    assert_eq!(cancelled.get::<_, String>(1), "the chatbot was deleted");
    // Gone from the API, on both daemons; the rest of the account is not.
    for d in [&a, &b] {
        for path in [format!("/v1/chatbots/{kept}"), format!("/v1/chatbots/{kept}/workflows"), format!("/v1/chatbots/{kept}/executions")] {
            let (status, v) = call(d, reqwest::Method::GET, &admin, &path, None).await;
            assert_eq!((status, v["error"]["message"].as_str()), (404, Some(&*format!("chatbot {kept} not found"))), "{path} {v}");
        }
        let (_, list) = call(d, reqwest::Method::GET, &admin, "/v1/chatbots", None).await;
        let ids: Vec<&str> = list["items"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
        assert_eq!(ids, [pruned.to_string(), bystander.to_string()], "{list}");
    }
    // Kept: its history stays in the database (and goes as its retention says).
    assert_eq!(count_of(&db, "SELECT count(*) FROM executions WHERE chatbot_id = $1", kept).await, 6 + late);

    // Pruned: its executions go now, in the background.
    let (status, v) = call(&b, reqwest::Method::DELETE, &op, &format!("/v1/chatbots/{pruned}?history=prune"), None).await;
    assert_eq!((status, v["cancelled_executions"].as_i64()), (200, Some(0)), "{v}");
    eventually("the deleted chatbot's executions are pruned", || async {
        count_of(&db, "SELECT count(*) FROM executions WHERE chatbot_id = $1", pruned).await == 0
    })
    .await;
    // Its dead letter went as a dead letter (before its execution), not by cascade.
    assert_eq!(count_of(&db, "SELECT count(*) FROM dead_letters WHERE chatbot_id = $1", pruned).await, 0);
    let text = a.metrics().await;
    assert!(metric(&text, "botflow_pruned_rows_total", Some("kind=\"dead_letters\"")) >= 1.0, "{text}");
    // Deleted through B: refused there before the answer.
    assert_eq!(until_unknown(&mut on_b, pruned, "late").await, 0);
    // The bystander works on both daemons.
    let mut on_a = Client::tcp(a.tcp()).await.hello(&t.key, &[]).await;
    for c in [&mut on_a, &mut on_b] {
        c.send(&event(&format!("after-{}", Uuid::now_v7()), bystander, "x.go", json!({}))).await;
        assert_eq!(c.recv().await["op"], "ack");
    }
    eventually("the bystander runs", || async { count_of(&db, finished, bystander).await == 7 }).await;
    assert_eq!(receiver.count("/fail"), 1, "only the pruned chatbot's one execution called");
    // A deleted chatbot cannot be deleted again, nor given workflows.
    let (status, _) = call(&a, reqwest::Method::DELETE, &op, &format!("/v1/chatbots/{pruned}?history=prune"), None).await;
    assert_eq!(status, 404);
    let bytes = serde_json::to_vec(&flows).unwrap();
    let specs = botflow::workflow::parse_workflows(&bytes).unwrap();
    assert!(botflow::store::workflows::apply(&a.store, pruned, &specs).await.is_err());

    // Audited: who, which history, whether forced.
    let (_, audit) = call(&a, reqwest::Method::GET, &op, &format!("/v1/audit?account_id={}", t.account), None).await;
    let deletions: Vec<&Value> = audit["items"].as_array().unwrap().iter().filter(|e| e["action"] == "chatbot.delete").collect();
    assert_eq!(deletions.len(), 2, "{audit}");
    assert_eq!(deletions[0]["target_id"], pruned.to_string());
    assert_eq!(deletions[0]["actor_role"], "operator");
    assert_eq!(deletions[0]["details"], json!({"history": "prune", "force": false, "cancelled_executions": 0}));
    assert_eq!(deletions[1]["target_id"], kept.to_string());
    assert_eq!(deletions[1]["actor_role"], "admin");
    assert_eq!(deletions[1]["details"], json!({"history": "keep", "force": true, "cancelled_executions": 1}));

    // A minute after the deletion the pruner drops the rows left: the pruned chatbot
    // with its workflows and rollups; the kept one stays while its history does.
    db.execute("UPDATE chatbots SET deleted_at = deleted_at - interval '2 minutes' WHERE id = ANY($1)", &[&vec![kept, pruned]])
        .await
        .unwrap();
    let defaults = (&a.config.retention).into();
    let swept = botflow::store::retention::prune(&a.store, defaults, botflow::store::retention::Pacing { batch: 100, max_rows_per_second: 0 }, false, |_, _| {}).await.unwrap();
    assert_eq!(swept.chatbots, 1, "{swept:?}");
    assert_eq!(count_of(&db, "SELECT count(*) FROM chatbots WHERE id = $1", pruned).await, 0);
    assert_eq!(count_of(&db, "SELECT count(*) FROM workflows WHERE chatbot_id = $1", pruned).await, 0);
    assert_eq!(count_of(&db, "SELECT count(*) FROM execution_stats WHERE chatbot_id = $1", pruned).await, 0);
    assert_eq!(count_of(&db, "SELECT count(*) FROM chatbots WHERE id = $1", kept).await, 1);
    assert_eq!(count_of(&db, "SELECT count(*) FROM executions WHERE chatbot_id = $1", kept).await, 6 + late);
    let unfinished = "SELECT count(*) FROM executions WHERE chatbot_id = $1 AND status IN ('queued', 'running', 'retrying', 'waiting')";
    assert_eq!(count_of(&db, unfinished, kept).await, 0);
    let text = a.metrics().await;
    assert!(metric(&text, "botflow_pruned_rows_total", Some("kind=\"executions\"")) >= 6.0, "{text}");
}
