//! The observability operators rely on, checked against a real Prometheus (Debian's
//! `prometheus` package, installed here when missing) scraping a running daemon under
//! load: every dashboard query and every alert rule evaluates without error and
//! returns data, `promtool` accepts the metrics and the rules, and the rules' unit
//! tests pass. Also the dashboard's shape (data source variable, stable uid) and the
//! per-chatbot watchlist.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/grafana/botflow.json");
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/prometheus/alerts.yml");
const ALERT_TESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/prometheus/alerts_test.yml");

/// Installs Debian's prometheus package (prometheus and promtool) unless present.
fn ensure_prometheus() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let present = |bin: &str| Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().is_ok_and(|o| o.status.success());
        if present("prometheus") && present("promtool") {
            return;
        }
        assert!(unsafe { libc::geteuid() } == 0, "prometheus is not installed and only root can install it: apt-get install prometheus");
        for args in [vec!["update", "-qq"], vec!["install", "-y", "-qq", "prometheus"]] {
            let o = Command::new("apt-get").args(&args).env("DEBIAN_FRONTEND", "noninteractive").output().expect("run apt-get");
            assert!(o.status.success(), "apt-get {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        assert!(present("prometheus") && present("promtool"), "apt-get install prometheus did not provide prometheus and promtool");
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(target: std::net::SocketAddr) -> Prometheus {
    let dir = TempDir::new("prometheus");
    std::fs::copy(ALERTS, dir.path().join("alerts.yml")).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n\
         scrape_configs:\n  - job_name: botflow\n    static_configs:\n      - targets: [\"{target}\"]\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
}

async fn query(http: &reqwest::Client, prom: &str, expr: &str) -> Value {
    http.get(format!("{prom}/api/v1/query")).query(&[("query", expr)]).send().await.unwrap().json().await.unwrap()
}

/// An alert's measurement: the parenthesised expression before its threshold.
fn measurement(expr: &str) -> &str {
    assert!(expr.starts_with('('), "alert expressions are written `(measurement) op threshold`: {expr}");
    let mut depth = 0;
    for (i, c) in expr.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &expr[1..i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in {expr}");
}

/// Every query of every panel, with Grafana's rate interval as Grafana would fill it.
fn dashboard_queries() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            // "All" of the instance and chatbot variables, as Grafana sends it.
            let expr = t["expr"].as_str().unwrap().replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$chatbot", ".*");
            out.push((p["title"].as_str().unwrap().to_string(), expr));
        }
    }
    out
}

fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(ALERTS).unwrap();
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut out = Vec::new();
    for g in v["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = r["alert"].as_str().unwrap().to_string();
            assert!(r["for"].as_str().is_some(), "{name} has a `for`");
            assert!(r["labels"]["severity"].as_str().is_some(), "{name} has a severity");
            assert!(r["annotations"]["summary"].as_str().is_some(), "{name} has a summary");
            out.push((name, r["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

fn promtool(args: &[&str], stdin: Option<&str>, dir: &Path) -> std::process::Output {
    let mut c = Command::new("promtool");
    c.args(args).current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        c.stdin(Stdio::piped());
    }
    let mut child = c.spawn().expect("run promtool");
    if let Some(text) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

#[test]
fn the_dashboard_uses_a_data_source_variable_and_a_stable_uid() {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    assert!(!text.contains("DS_PROMETHEUS"), "${{DS_PROMETHEUS}} fails when the dashboard is provisioned from files");
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["uid"], "botflow-overview");
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(vars.iter().any(|v| v["type"] == "datasource" && v["name"] == "datasource" && v["query"] == "prometheus"));
    // Instance and chatbot variables, and every query scoped by them.
    for (name, source) in [("instance", "up{job=\"botflow\"}"), ("chatbot", "botflow_chatbot_events_received_total")] {
        let v = vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no {name} variable"));
        assert_eq!(v["query"]["query"], format!("label_values({source}, {name})"), "{v}");
        assert_eq!((v["includeAll"].as_bool(), v["allValue"].as_str()), (Some(true), Some(".*")), "{v}");
    }
    for (title, expr) in dashboard_queries() {
        let raw = expr.replace(".*", "$instance");
        assert!(raw.matches("botflow_").count() == raw.matches("instance=~\"$instance\"").count(), "panel {title:?} is not scoped by instance: {expr}");
    }
    for p in d["panels"].as_array().unwrap() {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${datasource}");
            {
                let name = "botflow_";
                assert!(t["expr"].as_str().unwrap().contains(name));
            }
        }
    }
    // Every metric the dashboard reads is one the daemon defines.
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/telemetry/metrics.rs")).unwrap();
    for (_, expr) in dashboard_queries() {
        for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| w.starts_with("botflow_")) {
            let base = word.trim_end_matches("_bucket");
            assert!(source.contains(&format!("\"{base}\"")), "{word} is not a metric of the daemon");
        }
    }
    for f in ["grafana/provisioning/datasources/prometheus.yml", "grafana/provisioning/dashboards/botflow.yml", "prometheus/prometheus.yml"] {
        let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards")).join(f);
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert!(!v.is_null(), "{f}");
    }
}

#[actix_rt::test]
async fn a_real_prometheus_evaluates_every_dashboard_query_and_alert_rule() {
    tokio::task::spawn_blocking(ensure_prometheus).await.unwrap();
    let receiver = Receiver::start().await;
    receiver.on("/fail", Behaviour::Status(500, "{}".into()));
    // The chatbots exist before the daemon starts: the watchlist panels read series
    // that only chatbots on metrics.watchlist have.
    let pg = fresh_database().await;
    let store = botflow::store::Store::new(pg.clone(), 2, Duration::from_secs(5), None).unwrap();
    botflow::store::migrate::migrate(&store).await.unwrap();
    let t = tenant(&store, "acme", 3).await;
    let (busy, failing, limited) = (t.chatbots[0], t.chatbots[1], t.chatbots[2]);
    let watchlist = vec![busy.to_string(), limited.to_string()];
    let daemon = TestDaemon::start_with(DaemonOptions {
        pg: Some(pg),
        tweak: Box::new(move |c| {
            c.scheduler.scan_interval_ms = 200;
            c.outbox.ack_timeout_ms = 2000;
            c.metrics.watchlist = watchlist;
        }),
    })
    .await;
    apply(
        &daemon.store,
        busy,
        json!([
            {"name": "hook", "trigger": {"event": "message.received", "keywords": {"any": ["order"]}},
             "steps": [{"id": "h", "action": "webhook", "url": receiver.url("/ok")},
                       {"id": "r", "action": "reply", "text": "ok"},
                       {"id": "d", "action": "delay", "duration": "0s"}]},
        ]),
    )
    .await;
    apply(
        &daemon.store,
        failing,
        json!({"name": "fail", "trigger": {"event": "x.fail"}, "retry": {"max_attempts": 2, "initial_backoff_ms": 10},
               "steps": [{"id": "h", "action": "webhook", "url": receiver.url("/fail")}]}),
    )
    .await;
    botflow::store::limits::set(
        &daemon.store,
        limited,
        botflow::store::limits::Overrides { events_per_second: Some(1), burst: Some(1), ..Default::default() },
        "test",
    )
    .await
    .unwrap();

    let metrics_addr = daemon.app().metrics_addr.unwrap();
    let prom = start_prometheus(metrics_addr);
    let http = reqwest::Client::new();

    // Load, for a while: matches, replies acked, retries, dead letters, rate limiting,
    // bad frames; one client stays connected throughout.
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[busy]).await;
    let started = Instant::now();
    let mut n = 0;
    let mut ready = false;
    while !ready {
        for _ in 0..5 {
            n += 1;
            c.send(&event(&format!("m{n}"), busy, "message.received", json!({"text": "my order"}))).await;
            c.send(&event(&format!("f{n}"), failing, "x.fail", json!({}))).await;
            c.send(&event(&format!("l{n}"), limited, "x.any", json!({}))).await;
            c.send(&event(&format!("n{n}"), busy, "conversation.ended", json!({}))).await;
        }
        c.send_raw("this is not json\n").await;
        // Answer whatever came: acks, nacks, commands (acked), errors.
        while let Some(v) = c.try_recv(Duration::from_millis(50)).await {
            if v["op"] == "command" {
                c.send(&json!({"op": "ack", "command_id": v["command_id"]})).await;
            }
        }
        if started.elapsed() > Duration::from_secs(8) {
            let up = query(&http, &prom.url, "up{job=\"botflow\"}").await;
            let samples = query(&http, &prom.url, "count_over_time(botflow_events_received_total[1m])").await;
            ready = up["data"]["result"][0]["value"][1] == "1"
                && samples["data"]["result"].as_array().is_some_and(|r| !r.is_empty())
                && daemon.db().await.query_one("SELECT count(*) FROM dead_letters", &[]).await.unwrap().get::<_, i64>(0) > 0;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "prometheus never scraped the daemon");
    }
    // A few more scrapes after the dead letters, for the gauges' rates.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut failures = Vec::new();
    for (title, expr) in dashboard_queries() {
        let v = query(&http, &prom.url, &expr).await;
        if v["status"] != "success" {
            failures.push(format!("panel {title:?}: {expr} failed: {v}"));
        } else if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
            failures.push(format!("panel {title:?}: {expr} returned no data"));
        }
    }
    for (name, expr) in alert_rules() {
        let m = measurement(&expr);
        let v = query(&http, &prom.url, m).await;
        if v["status"] != "success" {
            failures.push(format!("alert {name}: {m} failed: {v}"));
        } else if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
            failures.push(format!("alert {name}: {m} returned no data"));
        }
    }
    // Prometheus evaluated every rule without error.
    let rules: Value = http.get(format!("{}/api/v1/rules", prom.url)).send().await.unwrap().json().await.unwrap();
    let evaluated: Vec<&Value> = rules["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(evaluated.len(), alert_rules().len());
    for r in evaluated {
        if r["health"] != "ok" {
            failures.push(format!("rule {} health {}: {}", r["name"], r["health"], r["lastError"]));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // promtool accepts the metrics as served, the rules, and the rules' unit tests.
    let dir = Path::new(ALERTS).parent().unwrap();
    let text = daemon.metrics().await;
    let o = promtool(&["check", "metrics"], Some(&text), dir);
    assert!(o.status.success(), "promtool check metrics:\n{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let o = promtool(&["check", "rules", "alerts.yml"], None, dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = promtool(&["test", "rules", ALERT_TESTS], None, dir);
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

#[actix_rt::test]
async fn watched_chatbots_get_series_of_their_own_and_nobody_else_does() {
    let pg = fresh_database().await;
    let store = botflow::store::Store::new(pg.clone(), 2, Duration::from_secs(5), None).unwrap();
    botflow::store::migrate::migrate(&store).await.unwrap();
    let t = tenant(&store, "acme", 2).await;
    let (watched, other) = (t.chatbots[0], t.chatbots[1]);
    let watchlist = vec![watched.to_string()];
    let daemon = TestDaemon::start_with(DaemonOptions { pg: Some(pg), tweak: Box::new(move |c| c.metrics.watchlist = watchlist) }).await;
    for bot in [watched, other] {
        apply(&daemon.store, bot, json!({"name": "w", "trigger": {"event": "x.a"}, "steps": [{"id": "d", "action": "delay", "duration": "0s"}]})).await;
    }
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    for i in 0..3 {
        c.send(&event(&format!("w{i}"), watched, "x.a", json!({}))).await;
        c.send(&event(&format!("o{i}"), other, "x.a", json!({}))).await;
    }
    let _ = c.answers(6).await;
    let db = daemon.db().await;
    eventually("executions finish", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE status = 'succeeded'", &[]).await.unwrap().get(0);
        n == 6
    })
    .await;
    let label = format!("chatbot=\"{watched}\"");
    let start = Instant::now();
    let mut text = daemon.metrics().await;
    while metric(&text, "botflow_chatbot_executions_total", Some(&label)) < 3.0 {
        assert!(start.elapsed() < DEADLINE, "no watched series: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = daemon.metrics().await;
    }
    assert_eq!(metric(&text, "botflow_chatbot_events_received_total", Some(&label)), 3.0);
    assert!(!text.contains(&other.to_string()), "an unwatched chatbot's id never becomes a label");
}
