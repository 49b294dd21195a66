//! The `botflow` binary as a user runs it: check-config, the bootstrap commands, and the
//! README's quickstart and worked example end to end (`serve` with the embedded
//! PostgreSQL, `send`, SIGTERM).

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn botflow() -> Command {
    botflow_cmd()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run botflow")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_config_reports_every_bad_key_and_hides_secrets() {
    let dir = TempDir::new("cfg");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "data_dirr = \"x\"\n[ingest]\nmax_in_flight = \"lots\"\n[nope]\nk = 1\n").unwrap();
    let o = run(botflow().args(["check-config", "--config"]).arg(&bad));
    assert!(!o.status.success());
    let err = stderr(&o);
    for key in ["data_dirr", "ingest.max_in_flight", "nope", "3 problems"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    let o = run(botflow().args(["check-config", "--config"]).arg(&bad).env("BOTFLOW_INGEST__NOPE", "1"));
    assert!(stderr(&o).contains("BOTFLOW_INGEST__NOPE"), "{}", stderr(&o));

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[database]\nurl = \"postgres://app:s3cret@db.internal/botflow\"\n").unwrap();
    let o = run(botflow().args(["check-config", "--config"]).arg(&good).env("BOTFLOW_INGEST__MAX_IN_FLIGHT", "77"));
    assert!(o.status.success(), "{}", stderr(&o));
    let effective: toml::Table = stdout(&o).parse().expect("the effective configuration is TOML");
    assert_eq!(effective["ingest"]["max_in_flight"].as_integer(), Some(77));
    assert_eq!(effective["database"]["url"].as_str(), Some("postgres://app:***@db.internal/botflow"));
    assert!(!stdout(&o).contains("s3cret"));

    let o = run(botflow().args(["check-config", "--config"]).arg(dir.path().join("missing.toml")));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.toml"), "{}", stderr(&o));
    // The shipped file is valid.
    let o = run(botflow().args(["check-config", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/config/botflow.toml")]));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[actix_rt::test]
async fn bootstrap_commands_print_only_ids_and_name_bad_fields() {
    let pg = fresh_database().await;
    let url = pg_url(&pg);
    let dir = TempDir::new("boot");
    let cmd = |args: &[&str]| {
        let mut c = botflow();
        c.args(args).env("BOTFLOW_DATABASE__URL", &url).current_dir(dir.path());
        run(&mut c)
    };
    let o = cmd(&["accounts", "create", "acme"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let account = stdout(&o).trim().to_string();
    assert!(account.parse::<uuid::Uuid>().is_ok(), "stdout is only the id: {:?}", stdout(&o));

    let o = cmd(&["keys", "create", "--account", &account, "--role", "ingest"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let key = stdout(&o).trim().to_string();
    assert!(key.starts_with("bfk_") && !key.contains(char::is_whitespace), "{key:?}");
    let o = cmd(&["keys", "create", "--account", &account, "--role", "root"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("root"), "{}", stderr(&o));
    let o = cmd(&["keys", "create", "--account", &uuid::Uuid::new_v4().to_string(), "--role", "admin"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));

    let o = cmd(&["chatbots", "create", "--account", &account, "support"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bot = stdout(&o).trim().to_string();
    assert!(bot.parse::<uuid::Uuid>().is_ok());
    let o = cmd(&["chatbots", "secret", &bot]);
    assert_eq!(stdout(&o).trim().len(), 64);

    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let bad = write("bad.yaml", "name: x\ntrigger: {event: message.received}\nsteps:\n  - id: a\n    action: webhook\n    url: ftp://nowhere\n");
    let o = cmd(&["workflows", "apply", "--chatbot", &bot, &bad]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("steps[0].url"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
    let unknown = write("unknown.json", r#"[{"name":"a","trigger":{"event":"x.a"},"steps":[{"id":"s","action":"sms"}]}]"#);
    let o = cmd(&["workflows", "apply", "--chatbot", &bot, &unknown]);
    assert!(stderr(&o).contains("[0].steps[0]") && stderr(&o).contains("sms"), "{}", stderr(&o));
    let delay = write("delay.yaml", "name: d\ntrigger: {event: x.a}\nsteps:\n  - {id: w, action: delay, duration: 1 week}\n");
    let o = cmd(&["workflows", "apply", "--chatbot", &bot, &delay]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("steps[0].duration"), "{}", stderr(&o));

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflows.yaml");
    let o = cmd(&["workflows", "apply", "--chatbot", &bot, example]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 3);
    // Applying the same file again changes nothing and prints the same ids.
    let o = cmd(&["workflows", "apply", "--chatbot", &bot, example]);
    assert_eq!(stdout(&o).lines().map(str::to_string).collect::<Vec<_>>(), ids);
    assert!(stderr(&o).contains("unchanged"));
    let o = cmd(&["workflows", "apply", "--chatbot", &uuid::Uuid::new_v4().to_string(), example]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("chatbot") && stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(data_dir.join("postgres/data/postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
}

#[actix_rt::test]
async fn the_quickstart_and_worked_example_work_with_the_real_binary() {
    let dir = TempDir::new("quickstart");
    let receiver = Receiver::start().await;
    receiver.on("/hooks/", Behaviour::Status(200, r#"{"ticket":"T-1001"}"#.into()));
    let env = |c: &mut Command| {
        c.current_dir(dir.path())
            .env("BOTFLOW_INGEST__TCP", "127.0.0.1:0")
            .env("BOTFLOW_METRICS__LISTEN", "127.0.0.1:0")
            .env("BOTFLOW_ADMIN__LISTEN", "127.0.0.1:0");
    };
    // The first command of the quickstart: the daemon with the embedded default.
    let mut serve = botflow();
    serve.arg("serve").stdout(Stdio::null()).stderr(Stdio::piped());
    env(&mut serve);
    let mut daemon = Serve { child: serve.spawn().unwrap() };
    let var = dir.path().join("var");
    wait_for("the daemon's socket and operator token", || {
        var.join("botflow.sock").exists() && var.join("operator.token").exists()
    });
    let token = std::fs::read_to_string(var.join("operator.token")).unwrap();
    assert!(token.trim().starts_with("bfk_"));

    let cmd = |args: &[&str]| {
        let mut c = botflow();
        c.args(args);
        env(&mut c);
        let o = run(&mut c);
        assert!(o.status.success(), "botflow {args:?}: {}", stderr(&o));
        stdout(&o).trim().to_string()
    };
    let account = cmd(&["accounts", "create", "acme"]);
    let key = cmd(&["keys", "create", "--account", &account, "--role", "ingest"]);
    let bot = cmd(&["chatbots", "create", "--account", &account, "support-bot"]);
    let secret = cmd(&["chatbots", "secret", &bot]);
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workflows.yaml"))
        .unwrap()
        .replace("http://127.0.0.1:8099", &format!("http://{}", receiver.addr));
    std::fs::write(dir.path().join("workflows.yaml"), example).unwrap();
    let ids = cmd(&["workflows", "apply", "--chatbot", &bot, "workflows.yaml"]);
    assert_eq!(ids.lines().count(), 3);

    let conversation = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/conversation.ndjson"))
        .unwrap()
        .replace("CHATBOT_ID", &bot);
    let send = |input: &str, linger_ms: &str| {
        let mut c = botflow();
        c.args(["send", "--token", key.as_str(), "--subscribe", bot.as_str(), "--linger-ms", linger_ms])
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        env(&mut c);
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let o = send(&conversation, "3000");
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let lines: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).expect("NDJSON")).collect();
    let ops = |op: &str| lines.iter().filter(|l| l["op"] == op).count();
    assert_eq!(ops("welcome"), 1);
    assert_eq!(ops("ack"), 5, "{lines:?}");
    let commands: Vec<&Value> = lines.iter().filter(|l| l["op"] == "command").collect();
    let texts: Vec<String> = commands.iter().map(|c| c["payload"].to_string()).collect();
    assert_eq!(commands.len(), 3, "greeting, handoff and refund reply: {texts:?}");
    assert!(texts.iter().any(|t| t.contains("Hi Ada, how can I help?")), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("tier-2")), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("I opened refund ticket T-1001 for you.")), "{texts:?}");

    let hooks = receiver.wait_for("/hooks/", 2).await;
    for h in &hooks {
        let ts = h.header("x-botflow-timestamp").unwrap();
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(&h.body);
        assert_eq!(h.header("x-botflow-signature").unwrap(), format!("v1={}", hex::encode(mac.finalize().into_bytes())));
    }

    // Replaying the same file: every event is a duplicate and nothing runs again.
    let o = send(&conversation, "500");
    assert!(o.status.success(), "{}", stderr(&o));
    let acks: Vec<Value> =
        stdout(&o).lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|l| l["op"] == "ack").collect();
    assert_eq!(acks.len(), 5);
    for a in &acks {
        let started = !a["executions"].as_array().unwrap().is_empty();
        assert_eq!(a["duplicate"], started, "{a}");
    }
    // `send` fails when an event is nacked.
    let o = send(&conversation.replace(&bot, &uuid::Uuid::new_v4().to_string()).replace("evt-", "other-"), "0");
    assert!(!o.status.success());
    assert!(stdout(&o).contains("unknown_chatbot"));

    // Lines the daemon could not answer by id are refused by `send` itself.
    let o = send(r#"{"id":"","chatbot_id":"x","type":"x.a","conversation_id":"c"}"#, "0");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("skipping input line"), "{}", stderr(&o));

    // SIGTERM: a clean exit, and the embedded PostgreSQL stopped with it.
    let pg_pid = postmaster_pid(&var).expect("the embedded PostgreSQL runs");
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = daemon.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the daemon did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    use std::io::Read;
    daemon.child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(status.success(), "exit status {status}: {log}");
    assert!(unsafe { libc::kill(pg_pid, 0) } != 0, "PostgreSQL {pg_pid} still runs");
    assert!(!var.join("botflow.sock").exists(), "the socket file is removed");
}

#[test]
fn killing_the_daemon_stops_its_postgres_and_a_restart_keeps_the_data() {
    let dir = TempDir::new("kill9");
    let var = dir.path().join("var");
    let start = || {
        let mut c = botflow();
        c.arg("serve")
            .current_dir(dir.path())
            .env("BOTFLOW_INGEST__TCP", "")
            .env("BOTFLOW_METRICS__LISTEN", "")
        .env("BOTFLOW_ADMIN__LISTEN", "")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let d = Serve { child: c.spawn().unwrap() };
        wait_for("the daemon's socket", || {
            var.join("botflow.sock").exists() && std::os::unix::net::UnixStream::connect(var.join("botflow.sock")).is_ok()
        });
        d
    };
    let mut d = start();
    let o = run(botflow().args(["accounts", "create", "survivor"]).current_dir(dir.path()));
    assert!(o.status.success(), "{}", stderr(&o));
    let account = stdout(&o).trim().to_string();
    let pg_pid = postmaster_pid(&var).expect("the embedded PostgreSQL runs");

    // kill -9 leaves no chance to clean up: PostgreSQL must notice its parent died.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    wait_for("PostgreSQL to stop after its daemon died", || unsafe { libc::kill(pg_pid, 0) } != 0);

    let mut d = start();
    let mut c = botflow();
    c.args(["keys", "create", "--account", &account, "--role", "ingest"]).current_dir(dir.path());
    let o = run(&mut c);
    assert!(o.status.success(), "the account survived the crash: {}", stderr(&o));
    // `migrate` shares the running daemon's PostgreSQL and finds nothing to do.
    let o = run(botflow().arg("migrate").current_dir(dir.path()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("latest schema version"), "{}", stderr(&o));
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn logs_can_be_json() {
    let dir = TempDir::new("jsonlog");
    let mut c = botflow();
    c.arg("serve")
        .current_dir(dir.path())
        .env("BOTFLOW_LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .env("BOTFLOW_INGEST__TCP", "")
        .env("BOTFLOW_METRICS__LISTEN", "")
        .env("BOTFLOW_ADMIN__LISTEN", "")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut d = Serve { child: c.spawn().unwrap() };
    let sock = dir.path().join("var/botflow.sock");
    wait_for("the daemon's socket", || sock.exists());
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    assert!(d.child.wait().unwrap().success());
    let mut log = String::new();
    use std::io::Read;
    d.child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    let lines: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
    assert!(lines.iter().any(|l| l["message"] == "botflow is ready" && l["level"] == "INFO"), "{log}");
    assert!(lines.iter().any(|l| l["message"] == "botflow stopped"), "{log}");
}

#[actix_rt::test]
async fn dlq_commands_list_replay_and_discard() {
    let receiver = Receiver::start().await;
    receiver.on("/hook", Behaviour::Status(500, "{}".into()));
    let daemon = TestDaemon::start().await;
    let t = tenant(&daemon.store, "acme", 1).await;
    apply(
        &daemon.store,
        t.chatbots[0],
        serde_json::json!({"name": "w", "trigger": {"event": "x.go"}, "retry": {"max_attempts": 1},
                           "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/hook")}]}),
    )
    .await;
    let mut c = Client::tcp(daemon.tcp()).await.hello(&t.key, &[]).await;
    for id in ["e1", "e2"] {
        c.send(&event(id, t.chatbots[0], "x.go", serde_json::json!({}))).await;
    }
    let _ = c.answers(2).await;
    let db = daemon.db().await;
    eventually("both executions die", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM dead_letters", &[]).await.unwrap().get(0);
        n == 2
    })
    .await;

    let url = pg_url(&daemon.pg);
    let dlq = |args: &[&str]| {
        let mut c = botflow();
        c.arg("dlq").args(args).env("BOTFLOW_DATABASE__URL", &url).env("USER", "ops-bob");
        run(&mut c)
    };
    let o = dlq(&["list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let letters: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(letters.len(), 2);
    assert!(letters.iter().all(|l| l["last_error"].as_str().unwrap().contains("500") && l["attempts"] == 1));
    let (first, second) = (letters[0]["id"].as_str().unwrap(), letters[1]["id"].as_str().unwrap());
    let o = dlq(&["list"]);
    assert_eq!(stdout(&o).lines().count(), 2, "a line per dead letter");

    let o = dlq(&["discard", first]);
    assert!(o.status.success(), "{}", stderr(&o));
    let by: Option<String> =
        db.query_one("SELECT discarded_by FROM dead_letters WHERE id = $1::text::uuid", &[&first]).await.unwrap().get(0);
    assert_eq!(by.as_deref(), Some("ops-bob"));
    let o = dlq(&["discard", first]);
    assert!(!o.status.success() && stderr(&o).contains("already discarded"), "{}", stderr(&o));

    receiver.on("/hook", Behaviour::Status(200, "{}".into()));
    let o = dlq(&["replay", second, "--by", "ops-carol"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let execution = stdout(&o).trim().to_string();
    eventually("the replayed execution succeeds", || async {
        let s: String = db
            .query_one("SELECT status FROM executions WHERE id = $1::text::uuid", &[&execution])
            .await
            .unwrap()
            .get(0);
        s == "succeeded"
    })
    .await;
    let o = dlq(&["list"]);
    assert!(stdout(&o).trim().is_empty(), "nothing open is left: {}", stdout(&o));
    let o = dlq(&["list", "--all"]);
    assert_eq!(stdout(&o).lines().count(), 2);
    let o = dlq(&["replay", &uuid::Uuid::new_v4().to_string()]);
    assert!(!o.status.success() && stderr(&o).contains("does not exist"), "{}", stderr(&o));
}
