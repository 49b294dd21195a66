//! The egress policy as a chatbot owner and an operator meet it: webhook URLs naming
//! internal addresses are refused at save (each address class, the daemon's own admin
//! port, `deny`), a host name that resolves to loopback fails its step at once without
//! a request, a redirect to an address the policy refuses is not followed, and an
//! `allow` entry opens exactly what it names.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn hook(url: &str) -> Value {
    json!({
        "name": "hook",
        "trigger": {"event": "x.go"},
        "steps": [{"id": "call", "action": "webhook", "url": url, "timeout_ms": 2000}],
        "retry": {"max_attempts": 3, "initial_backoff_ms": 50, "jitter": false},
    })
}

async fn daemon(allow: Vec<String>, deny: Vec<String>) -> TestDaemon {
    let tweak = move |c: &mut botflow::config::Config| {
        c.egress.allow = allow;
        c.egress.deny = deny;
    };
    TestDaemon::start_with(DaemonOptions { tweak: Box::new(tweak), ..Default::default() }).await
}

/// POSTs a workflow through the admin API: (status, body).
async fn save(d: &TestDaemon, chatbot: uuid::Uuid, workflow: &Value) -> (u16, Value) {
    let key = d.app().operator_key.clone().expect("a fresh database gets an operator key");
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chatbots/{chatbot}/workflows", d.admin()))
        .bearer_auth(key)
        .json(workflow)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Sends one event, waits for its ack, and answers (status, attempt, error) of its
/// execution once that is final.
async fn run(c: &mut Client, db: &tokio_postgres::Client, bot: uuid::Uuid, id: &str, kind: &str) -> (String, i32, String) {
    c.send(&event(id, bot, kind, json!({}))).await;
    let (a, _) = c.recv_until(|v| v["id"] == id).await;
    assert_eq!(a["op"], "ack", "{a}");
    let start = Instant::now();
    loop {
        if let Ok(Some(r)) = db.query_opt("SELECT status, attempt, error FROM executions WHERE event_id = $1", &[&id]).await {
            let status: String = r.get(0);
            if ["succeeded", "failed", "dead"].contains(&status.as_str()) {
                return (status, r.get(1), r.get::<_, Option<String>>(2).unwrap_or_default());
            }
        }
        assert!(start.elapsed() < DEADLINE, "{id} did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn refused(d: &TestDaemon, rule: &str) -> f64 {
    metric(&d.metrics().await, "botflow_egress_refused_total", Some(&format!("rule=\"{rule}\"")))
}

#[actix_rt::test]
async fn webhook_urls_naming_internal_addresses_are_refused_at_save_with_the_field_and_the_rule() {
    let d = daemon(vec!["10.1.2.3/32".into(), "127.0.0.1/32".into()], vec!["203.0.113.0/24".into()]).await;
    let t = tenant(&d.store, "acme", 1).await;
    let bot = t.chatbots[0];
    for (url, rule) in [
        ("http://127.0.0.2:8080/x", "a loopback address (127.0.0.0/8)"),
        ("http://[::1]/x", "a loopback address (::1/128)"),
        ("http://10.0.0.1/x", "a private address (10.0.0.0/8)"),
        ("http://172.16.5.4/x", "a private address (172.16.0.0/12)"),
        ("https://192.168.0.1/x", "a private address (192.168.0.0/16)"),
        ("http://[fd00::1]/x", "a unique-local address (fc00::/7)"),
        ("http://169.254.169.254/latest/meta-data/{{event.id}}", "a link-local address (169.254.0.0/16)"),
        ("http://[fe80::1]/x", "a link-local address (fe80::/10)"),
        ("http://100.64.0.1/x", "a shared (carrier-grade NAT) address (100.64.0.0/10)"),
        ("http://0.0.0.0:8080/x", "an unspecified address (0.0.0.0/8)"),
        ("http://224.0.0.1/x", "a multicast address (224.0.0.0/4)"),
        ("http://255.255.255.255/x", "the broadcast address (255.255.255.255/32)"),
        ("http://[::ffff:169.254.169.254]/x", "a link-local address (169.254.0.0/16)"),
        ("http://0x7f.2/x", "a loopback address (127.0.0.0/8)"),
        ("https://203.0.113.5/x", "listed in egress.deny (203.0.113.0/24)"),
    ] {
        let (status, body) = save(&d, bot, &hook(url)).await;
        assert_eq!(status, 422, "{url}: {body}");
        assert_eq!(body["error"]["field"], "steps[0].url", "{url}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("egress refused") && message.contains(rule), "{url}: {message}");
    }
    // The daemon's own admin port, though 127.0.0.1 is allowed.
    let admin = d.app().admin_addr.unwrap();
    let (status, body) = save(&d, bot, &hook(&format!("http://{admin}/v1/chatbots"))).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains(&format!("one of this daemon's own listeners ({admin})")), "{body}");
    // What allow names is accepted.
    for (i, url) in ["http://10.1.2.3:9000/x", "http://127.0.0.1:9/x", "https://hooks.example/x"].into_iter().enumerate() {
        let mut wf = hook(url);
        wf["name"] = json!(format!("hook-{i}"));
        let (status, body) = save(&d, bot, &wf).await;
        assert_eq!(status, 201, "{url}: {body}");
    }
}

#[actix_rt::test]
async fn a_name_resolving_to_loopback_fails_its_step_at_once_and_nothing_is_sent() {
    let receiver = Receiver::start().await;
    let d = daemon(Vec::new(), Vec::new()).await;
    let t = tenant(&d.store, "acme", 1).await;
    let bot = t.chatbots[0];
    // A host name passes at save: what it resolves to is known only when it is called.
    let url = format!("http://localhost:{}/hook", receiver.addr.port());
    let (status, body) = save(&d, bot, &hook(&url)).await;
    assert_eq!(status, 201, "{body}");
    let before = refused(&d, "loopback").await;
    let mut c = Client::tcp(d.tcp()).await.hello(&t.key, &[bot]).await;
    let (status, attempt, error) = run(&mut c, &d.db().await, bot, "dns-1", "x.go").await;
    assert_eq!((status.as_str(), attempt), ("failed", 1), "refused, not retried: {error}");
    assert!(error.contains("egress refused: localhost resolves to") && error.contains("a loopback address"), "{error}");
    assert_eq!(receiver.count("/"), 0, "the receiver was called");
    assert!(refused(&d, "loopback").await > before);
}

#[actix_rt::test]
async fn a_redirect_to_a_refused_address_is_not_followed() {
    let public = Receiver::start().await;
    let inner = Receiver::start().await;
    let port = public.addr.port();
    // Only the first receiver's port is allowed: it stands for a public host.
    let d = daemon(vec![format!("127.0.0.1:{port}")], vec![]).await;
    let t = tenant(&d.store, "acme", 1).await;
    let bot = t.chatbots[0];
    public.on("/hook", Behaviour::Script(vec![Reply::new(302, "").header("Location", &inner.url("/admin"))]));
    let (status, body) = save(&d, bot, &hook(&public.url("/hook"))).await;
    assert_eq!(status, 201, "{body}");
    // The inner receiver's port is not: a workflow naming it directly is refused.
    let (status, body) = save(&d, bot, &hook(&inner.url("/admin"))).await;
    assert_eq!(status, 422, "{body}");

    let mut c = Client::tcp(d.tcp()).await.hello(&t.key, &[bot]).await;
    let (status, attempt, error) = run(&mut c, &d.db().await, bot, "redir-1", "x.go").await;
    assert_eq!((status.as_str(), attempt), ("failed", 1), "{error}");
    assert!(error.contains("302") && error.contains("redirects are not followed") && error.contains(&inner.url("/admin")), "{error}");
    assert_eq!(public.count("/hook"), 1);
    assert_eq!(inner.count("/"), 0, "the redirect was followed");
}

#[actix_rt::test]
async fn an_allowed_private_receiver_gets_its_webhook_and_the_same_address_on_another_port_does_not() {
    let allowed = Receiver::start().await;
    let other = Receiver::start().await;
    let d = daemon(vec![format!("localhost:{}", allowed.addr.port())], vec![]).await;
    let t = tenant(&d.store, "acme", 1).await;
    let bot = t.chatbots[0];
    let wf = json!([
        {"name": "allowed", "trigger": {"event": "x.allowed"},
         "steps": [{"id": "call", "action": "webhook", "url": format!("http://localhost:{}/ok", allowed.addr.port())}]},
        {"name": "other", "trigger": {"event": "x.other"},
         "steps": [{"id": "call", "action": "webhook", "url": format!("http://localhost:{}/no", other.addr.port())}]},
    ]);
    apply(&d.store, bot, wf).await;
    let mut c = Client::tcp(d.tcp()).await.hello(&t.key, &[bot]).await;
    let db = d.db().await;
    let (status, _, error) = run(&mut c, &db, bot, "ok-1", "x.allowed").await;
    assert_eq!(status, "succeeded", "{error}");
    assert_eq!(allowed.wait_for("/ok", 1).await.len(), 1);
    let (status, attempt, error) = run(&mut c, &db, bot, "no-1", "x.other").await;
    assert_eq!((status.as_str(), attempt), ("failed", 1), "{error}");
    assert!(error.contains("egress refused: localhost resolves to"), "{error}");
    assert_eq!(other.count("/"), 0);
}

#[test]
fn check_config_names_each_bad_egress_entry_and_trusts_the_operators_notification_url() {
    let dir = TempDir::new("egress-config");
    let file = dir.path().join("botflow.toml");
    std::fs::write(
        &file,
        "[egress]\nallow = [\"10.0.0.0/8\", \"10.0.0.0/40\", \"hooks.internal\"]\ndeny = [\"nope\"]\n",
    )
    .unwrap();
    let check = || {
        let o = botflow_cmd().env_remove("BOTFLOW_EGRESS__ALLOW").args(["check-config", "--config"]).arg(&file).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
    };
    let (ok, out) = check();
    assert!(!ok, "{out}");
    for needle in [
        "egress.allow[1]: \"10.0.0.0/40\" is not a CIDR",
        "egress.allow[2]: \"hooks.internal\" is not a CIDR",
        "egress.deny[0]: \"nope\" is not a CIDR",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert!(!out.contains("egress.allow[0]"), "{out}");

    // The operator's own notification channel may be internal: it is not a tenant's URL.
    std::fs::write(&file, "[notify]\nwebhook_url = \"http://10.0.0.5:9093/alerts\"\n").unwrap();
    let (ok, out) = check();
    assert!(ok, "{out}");
    std::fs::write(&file, "[egress]\ndeny = [\"nope\"]\n[notify]\nwebhook_url = \"ftp://10.0.0.5/\"\n").unwrap();
    let (ok, out) = check();
    assert!(!ok && out.contains("egress.deny[0]") && out.contains("notify.webhook_url: must be an http"), "{out}");
}

#[actix_rt::test]
async fn the_operators_notification_channel_on_loopback_is_reached_and_a_tenant_webhook_to_it_is_not() {
    let operator = Receiver::start().await;
    let url = operator.url("/alerts");
    let channel = url.clone();
    let tweak = move |c: &mut botflow::config::Config| {
        c.egress.allow = Vec::new();
        c.notify.webhook_url = channel;
    };
    let d = TestDaemon::start_with(DaemonOptions { tweak: Box::new(tweak), ..Default::default() }).await;
    let t = tenant(&d.store, "acme", 1).await;
    let bot = t.chatbots[0];
    apply(&d.store, bot, json!([
        {"name": "tell", "trigger": {"event": "x.tell"}, "steps": [{"id": "n", "action": "notify", "message": "hello ops"}]},
        {"name": "sneak", "trigger": {"event": "x.sneak"},
         "steps": [{"id": "call", "action": "webhook", "url": format!("http://localhost:{}/alerts", operator.addr.port())}]},
    ]))
    .await;
    let mut c = Client::tcp(d.tcp()).await.hello(&t.key, &[bot]).await;
    let db = d.db().await;
    let (status, _, error) = run(&mut c, &db, bot, "tell-1", "x.tell").await;
    assert_eq!(status, "succeeded", "{error}");
    let got = operator.wait_for("/alerts", 1).await;
    assert_eq!(got[0].json()["message"], "hello ops");
    let (status, attempt, error) = run(&mut c, &db, bot, "sneak-1", "x.sneak").await;
    assert_eq!((status.as_str(), attempt), ("failed", 1), "{error}");
    assert!(error.contains("egress refused"), "{error}");
    assert_eq!(operator.count("/alerts"), 1, "a tenant's webhook reached the operator's channel");
    // A literal address in a workflow is refused at save as well.
    let (status, body) = save(&d, bot, &hook(&url)).await;
    assert_eq!(status, 422, "{body}");
}
