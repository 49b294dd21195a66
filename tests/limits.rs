//! Per-chatbot rate limits, tuned while the daemon runs: events over the limit are
//! nacked with a retry time, executions over it wait, changes apply within a second
//! without a fresh burst and are audited, and one chatbot's limit slows no other.

mod common;

use botflow::store::accounts::{self, Role};
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, method: reqwest::Method, key: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

/// A daemon with the shipped default limits (the harness raises them for other tests).
async fn start() -> TestDaemon {
    TestDaemon::start_with(DaemonOptions {
        tweak: Box::new(|c| c.limits = botflow::config::LimitsConfig::default()),
        ..Default::default()
    })
    .await
}

async fn operator_key(d: &TestDaemon) -> String {
    d.app().operator_key.clone().expect("a fresh database gets an operator key")
}

#[actix_rt::test]
async fn events_over_the_limit_are_nacked_and_a_raised_limit_applies_at_once_without_slowing_others() {
    let d = start().await;
    let api = Api { base: d.admin(), http: reqwest::Client::new() };
    let op = operator_key(&d).await;
    let t = tenant(&d.store, "acme", 2).await;
    let (slow, busy) = (t.chatbots[0], t.chatbots[1]);
    let (status, v) = api
        .call(reqwest::Method::PUT, &op, &format!("/v1/chatbots/{slow}/limits"), Some(json!({"events_per_second": 5, "burst": 5})))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["limits"]["events_per_second"], 5);

    // The busy chatbot streams on its own connection the whole time.
    let mut other = Client::tcp(d.tcp()).await.hello(&t.key, &[]).await;
    let streamer = tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        for i in 0..200 {
            let sent = Instant::now();
            other.send(&event(&format!("busy{i}"), busy, "x.a", json!({}))).await;
            let a = other.recv().await;
            assert_eq!(a["op"], "ack", "the other chatbot is never limited: {a}");
            worst = worst.max(sent.elapsed());
        }
        worst
    });

    let mut c = Client::unix(&d.unix()).await.hello(&t.key, &[]).await;
    let mut burst = String::new();
    for i in 0..50 {
        burst.push_str(&format!("{}\n", event(&format!("s{i}"), slow, "x.a", json!({}))));
    }
    c.send_raw(&burst).await;
    let (answers, _) = c.answers(50).await;
    let acked = answers.values().filter(|a| a["op"] == "ack").count();
    assert_eq!(acked, 5, "exactly the burst is accepted");
    for a in answers.values().filter(|a| a["op"] == "nack") {
        assert_eq!(a["error"]["code"], "rate_limited", "{a}");
        let retry = a["error"]["retry_after_ms"].as_u64().expect("a retry time");
        assert!((1..=1000).contains(&retry), "a sensible retry_after_ms: {retry}");
    }

    // Raise it at run time: within a second the new limit applies (from what was used).
    let (status, _) = api
        .call(reqwest::Method::PUT, &op, &format!("/v1/chatbots/{slow}/limits"), Some(json!({"events_per_second": 1000, "burst": 1000})))
        .await;
    assert_eq!(status, 200);
    let changed = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        c.send(&event(&format!("after{n}"), slow, "x.a", json!({}))).await;
        let a = c.recv().await;
        if a["op"] == "ack" {
            break;
        }
        assert!(changed.elapsed() < Duration::from_secs(5), "the raised limit did not apply: {a}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut burst = String::new();
    for i in 0..200 {
        burst.push_str(&format!("{}\n", event(&format!("next{i}"), slow, "x.a", json!({}))));
    }
    c.send_raw(&burst).await;
    let (answers, _) = c.answers(200).await;
    assert!(answers.values().all(|a| a["op"] == "ack"), "the next second's events are accepted");

    let worst = streamer.await.unwrap();
    assert!(worst < Duration::from_secs(2), "the other chatbot waited {worst:?} for an ack");

    // Audited: who, when, old and new.
    let db = d.db().await;
    let rows = db
        .query("SELECT changed_by, old_limits, new_limits FROM limit_changes WHERE chatbot_id = $1 ORDER BY id", &[&slow])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let by: String = rows[0].get(0);
    assert!(by.starts_with("key "), "{by}");
    let old: Value = rows[1].get(1);
    let new: Value = rows[1].get(2);
    assert_eq!((old["burst"].clone(), new["burst"].clone()), (json!(5), json!(1000)));
}

#[actix_rt::test]
async fn executions_over_the_execution_limit_wait_and_all_complete() {
    let d = start().await;
    let t = tenant(&d.store, "acme", 1).await;
    let bot = t.chatbots[0];
    botflow::store::limits::set(
        &d.store,
        bot,
        botflow::store::limits::Overrides { executions_per_second: Some(5), ..Default::default() },
        "test",
    )
    .await
    .unwrap();
    let receiver = Receiver::start().await;
    apply(&d.store, bot, json!({"name": "w", "trigger": {"event": "x.a"}, "steps": [{"id": "h", "action": "webhook", "url": receiver.url("/x")}]})).await;
    let mut c = Client::tcp(d.tcp()).await.hello(&t.key, &[]).await;
    let mut burst = String::new();
    for i in 0..20 {
        burst.push_str(&format!("{}\n", event(&format!("e{i}"), bot, "x.a", json!({}))));
    }
    let start = Instant::now();
    c.send_raw(&burst).await;
    let (answers, _) = c.answers(20).await;
    assert!(answers.values().all(|a| a["op"] == "ack"), "executions over the rate are not refused");
    let hits = receiver.wait_for("/x", 20).await;
    // A burst of one second's worth (5), then 5 per second: the last of 20 starts after ~3 s.
    let last = hits.iter().map(|h| h.at).max().unwrap() - start;
    assert!(last >= Duration::from_millis(2500), "20 executions started within {last:?}");
    let db = d.db().await;
    eventually("all 20 succeed", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
        n == 20
    })
    .await;
}

#[actix_rt::test]
async fn the_limits_api_checks_roles_ownership_and_values() {
    let d = start().await;
    let api = Api { base: d.admin(), http: reqwest::Client::new() };
    let op = operator_key(&d).await;
    let a = tenant(&d.store, "acme", 1).await;
    let b = tenant(&d.store, "globex", 1).await;
    let admin_a = accounts::create_key(&d.store, a.account, Role::Admin).await.unwrap();
    let bot = a.chatbots[0];
    let path = format!("/v1/chatbots/{bot}/limits");

    let (s, v) = api.call(reqwest::Method::GET, &admin_a, &path, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["limits"]["events_per_second"], 200, "the configured default");
    assert!(v["usage"].is_null(), "idle: no supervisor runs yet");
    // Admins read their own chatbot's limits but may not change them.
    let (s, v) = api.call(reqwest::Method::PUT, &admin_a, &path, Some(json!({"burst": 9}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    // Another account's chatbot does not exist for them.
    let admin_b = accounts::create_key(&d.store, b.account, Role::Admin).await.unwrap();
    let (s, v) = api.call(reqwest::Method::GET, &admin_b, &path, None).await;
    assert_eq!(s, 404, "{v}");
    assert!(!v.to_string().contains("acme"));
    // Ingest keys and bad keys.
    let (s, _) = api.call(reqwest::Method::GET, &a.key, &path, None).await;
    assert_eq!(s, 403);
    let (s, v) = api.call(reqwest::Method::GET, "bfk_nope", &path, None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (401, Some("unauthenticated")));
    // Values are checked and named.
    let (s, v) = api.call(reqwest::Method::PUT, &op, &path, Some(json!({"burst": 0}))).await;
    assert_eq!((s, v["error"]["field"].as_str()), (422, Some("burst")), "{v}");
    let (s, v) = api.call(reqwest::Method::PUT, &op, &path, Some(json!({"bursts": 5}))).await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("bursts")), "{v}");
    let (s, v) = api.call(reqwest::Method::PUT, &op, &path, Some(json!({"burst": "lots"}))).await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = api.call(reqwest::Method::GET, &op, "/v1/chatbots/not-a-uuid/limits", None).await;
    assert_eq!(s, 400);
    let (s, _) = api.call(reqwest::Method::GET, &op, &format!("/v1/chatbots/{}/limits", Uuid::new_v4()), None).await;
    assert_eq!(s, 404);

    // With a running supervisor, usage is reported. One token a second comes back, so
    // the figure read after the ack is still the one the event left.
    let (s, v) = api.call(reqwest::Method::PUT, &op, &path, Some(json!({"events_per_second": 1, "burst": 400}))).await;
    assert_eq!(s, 200, "{v}");
    let mut c = Client::tcp(d.tcp()).await.hello(&a.key, &[]).await;
    c.send(&event("e1", bot, "x.a", json!({}))).await;
    assert_eq!(c.recv().await["op"], "ack");
    let (s, v) = api.call(reqwest::Method::GET, &op, &path, None).await;
    assert_eq!(s, 200);
    assert_eq!(v["usage"]["events_available"], 399, "burst 400, one event used: {v}");
    // The answer to a change shows the usage under the new limits, not the old ones.
    let (s, v) = api.call(reqwest::Method::PUT, &op, &path, Some(json!({"events_per_second": 1, "burst": 100}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["limits"]["burst"], 100, "{v}");
    // Under the new burst of 100, not the old 400. (Each look at the usage takes a cell
    // of its own, one a second comes back: a few may be gone.)
    let available = v["usage"]["events_available"].as_u64().unwrap();
    assert!((95..=99).contains(&available), "burst 100, one event used: {v}");
}

#[actix_rt::test]
async fn the_limits_cli_gets_and_sets_through_the_api() {
    let d = start().await;
    let op = operator_key(&d).await;
    let t = tenant(&d.store, "acme", 1).await;
    let bot = t.chatbots[0].to_string();
    // The daemon's actors run on this test's thread: wait for the CLI without blocking it.
    let run = |args: &[&str]| {
        let mut c = tokio::process::Command::from(botflow_cmd());
        c.args(args).env("BOTFLOW_ADMIN_URL", d.admin()).env("BOTFLOW_TOKEN", &op);
        async move { c.output().await.unwrap() }
    };
    let o = run(&["limits", "set", "--chatbot", &bot, "--events-per-second", "7", "--burst", "3"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["limits", "get", "--chatbot", &bot, "--json"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["limits"]["events_per_second"].clone(), v["limits"]["burst"].clone()), (json!(7), json!(3)));
    assert_eq!(v["limits"]["executions_per_second"], 100, "untouched values keep the default");
    let o = run(&["limits", "set", "--chatbot", &bot, "--executions-per-second", "4"]).await;
    assert!(o.status.success());
    let o = run(&["limits", "get", "--chatbot", &bot]).await;
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("events_per_second") && text.contains("(own)") && text.contains("recent changes"), "{text}");
    let o = run(&["limits", "set", "--chatbot", &bot, "--burst", "0"]).await;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("burst"), "{}", String::from_utf8_lossy(&o.stderr));
}
