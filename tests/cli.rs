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
    // As the README starts it: the receiver's one port allowed, nothing else of loopback.
    let allow = format!("[\"{}\"]", receiver.addr);
    let env = |c: &mut Command| {
        c.current_dir(dir.path())
            .env("BOTFLOW_EGRESS__ALLOW", &allow)
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
    let o = send(&conversation, "5000");
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    // `botflow send ... | head -1`: the reader leaves after the welcome, and `send`
    // ends quietly at the next answer instead of panicking on the closed pipe.
    {
        use std::io::{BufRead, Write};
        let mut c = botflow();
        c.args(["send", "--token", key.as_str(), "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        env(&mut c);
        let mut child = c.spawn().unwrap();
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        assert!(first.contains("welcome"), "{first}");
        let events: String = (0..20).map(|i| format!("{}\n", event(&format!("piped-{i}"), bot.parse().unwrap(), "x.none", serde_json::json!({})))).collect();
        child.stdin.take().unwrap().write_all(events.as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
        assert!(o.status.success(), "{:?}: {err}", o.status);
    }
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

/// `botflow serve` in `dir` with only its Unix socket, once the socket accepts.
fn serve_on_socket_only(dir: &Path) -> Serve {
    let var = dir.join("var");
    let mut c = botflow();
    c.arg("serve")
        .current_dir(dir)
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
}

#[test]
fn killing_the_daemon_stops_its_postgres_and_a_restart_keeps_the_data() {
    let dir = TempDir::new("kill9");
    let var = dir.path().join("var");
    let start = || serve_on_socket_only(dir.path());
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

/// `botflow serve` in `dir` on its Unix socket only, logging at info to a pipe (with
/// `env` on top).
fn serve_logging(dir: &Path, env: &[(&str, &str)]) -> Serve {
    let mut c = botflow();
    c.arg("serve")
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env("BOTFLOW_INGEST__TCP", "")
        .env("BOTFLOW_METRICS__LISTEN", "")
        .env("BOTFLOW_ADMIN__LISTEN", "")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Serve { child: c.spawn().unwrap() }
}

/// Stops the daemon with SIGTERM; its exit status and what it logged.
fn terminate_and_read_log(d: &mut Serve) -> (std::process::ExitStatus, String) {
    let status = d.terminate();
    let mut log = String::new();
    use std::io::Read;
    d.child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    (status, log)
}

#[test]
fn a_daemon_restarted_on_its_database_logs_no_postgresql_notices_at_info() {
    let dir = TempDir::new("restart-notices");
    let sock = dir.path().join("var/botflow.sock");
    for round in ["first start", "restart"] {
        let _ = std::fs::remove_file(&sock);
        let mut d = serve_logging(dir.path(), &[]);
        wait_for("the daemon's socket", || sock.exists());
        let (status, log) = terminate_and_read_log(&mut d);
        assert!(status.success(), "{round}: {log}");
        assert!(log.contains("botflow is ready"), "{round}: {log}");
        // Written to a pipe, not a terminal: no colour codes.
        assert!(!log.contains('\x1b'), "{round}: ANSI escapes in a log that is not a terminal: {log:?}");
        // The restart migrates a database that has its schema table already:
        // PostgreSQL says so in a NOTICE, which is chatter kept for debug level.
        assert!(!log.contains("NOTICE"), "{round}: {log}");
    }
    let _ = std::fs::remove_file(&sock);
    let mut d = serve_logging(dir.path(), &[("RUST_LOG", "debug")]);
    wait_for("the daemon's socket", || sock.exists());
    let (_, log) = terminate_and_read_log(&mut d);
    assert!(log.contains("NOTICE"), "at debug level the notice is there: {log}");
}

/// The example receiver of the README finds the chatbot's secret in
/// `var/webhook.secret` whenever it was written, so it can be started first.
#[test]
fn the_example_receiver_reads_the_secret_written_after_it_started() {
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new("receiver");
    std::fs::create_dir_all(dir.path().join("var")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    /// Stops the receiver however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/receiver.py"))
        .arg(port.to_string())
        .current_dir(dir.path())
        .env_remove("BOTFLOW_WEBHOOK_SECRET")
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the example receiver");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let _child = Kill(child);
    assert!(out.next().unwrap().unwrap().contains(&format!("127.0.0.1:{port}")));
    let post = |secret: &str| {
        let body = br#"{"conversation":"c-100"}"#;
        let ts = "1700000000";
        let signature = botflow::chatbot::actions::webhook::sign(secret, 1_700_000_000, body);
        // It says it listens just before it binds: try for a while.
        let start = Instant::now();
        let mut s = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("the receiver does not listen on {port}: {e}"),
            }
        };
        use std::io::{Read, Write};
        write!(
            s,
            "POST /hooks/refund HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             X-Botflow-Timestamp: {ts}\r\nX-Botflow-Signature: {signature}\r\nIdempotency-Key: e:ticket\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.") && answer.contains("T-10"), "{answer}");
    };
    post("s3cret");
    let line = out.next().unwrap().unwrap();
    assert!(line.contains("not checked (no secret in var/webhook.secret)"), "{line}");
    let _ = out.next(); // the body
    std::fs::write(dir.path().join("var/webhook.secret"), "s3cret\n").unwrap();
    post("s3cret");
    let line = out.next().unwrap().unwrap();
    assert!(line.contains("signature valid"), "{line}");
    let _ = out.next();
    post("another");
    let line = out.next().unwrap().unwrap();
    assert!(line.contains("signature INVALID"), "{line}");
}

#[test]
fn logs_can_be_json() {
    let dir = TempDir::new("jsonlog");
    let mut d = serve_logging(dir.path(), &[("BOTFLOW_LOG__FORMAT", "json")]);
    let sock = dir.path().join("var/botflow.sock");
    wait_for("the daemon's socket", || sock.exists());
    let (status, log) = terminate_and_read_log(&mut d);
    assert!(status.success());
    let lines: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
    assert!(lines.iter().any(|l| l["message"] == "botflow is ready" && l["level"] == "INFO"), "{log}");
    assert!(lines.iter().any(|l| l["message"] == "botflow stopped"), "{log}");
}

#[test]
fn sigterm_while_the_daemon_starts_stops_it_cleanly_once_it_is_up() {
    let dir = TempDir::new("early-term");
    let mut d = serve_logging(dir.path(), &[]);
    // Its PostgreSQL is being set up: the daemon is not up yet.
    wait_for("the embedded PostgreSQL's directory", || dir.path().join("var/postgres").exists());
    let (status, log) = terminate_and_read_log(&mut d);
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("SIGTERM received") && log.contains("botflow stopped"), "{log}");
    assert!(postmaster_pid(&dir.path().join("var")).is_none(), "its PostgreSQL stopped too");
}

/// The commands over the admin API, run against one daemon with one key. The CLI gets
/// a database it cannot reach, so nothing passes unless it went through the API.
struct ApiCli {
    admin: String,
    key: String,
    dir: std::path::PathBuf,
}

impl ApiCli {
    fn new(d: &TestDaemon, key: &str) -> ApiCli {
        ApiCli { admin: d.admin(), key: key.to_string(), dir: d.dir.path().to_path_buf() }
    }

    /// The daemon's actors run on this test's thread: wait for the CLI without blocking it.
    async fn run(&self, args: &[&str]) -> Output {
        let mut c = tokio::process::Command::from(botflow());
        c.args(args)
            .current_dir(&self.dir)
            .env("BOTFLOW_ADMIN_URL", &self.admin)
            .env("BOTFLOW_TOKEN", &self.key)
            .env("BOTFLOW_DATABASE__URL", "host=/nonexistent port=1 user=nobody dbname=nothing connect_timeout=1");
        c.output().await.expect("run botflow")
    }

    /// Runs a command that must succeed; returns its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert!(o.status.success(), "botflow {args:?} failed: {}", stderr(&o));
        stdout(&o)
    }

    /// Runs a command that must fail, with nothing on stdout; returns its stderr.
    async fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert!(!o.status.success(), "botflow {args:?} succeeded: {}", stdout(&o));
        assert!(stdout(&o).is_empty(), "botflow {args:?} printed {:?}", stdout(&o));
        stderr(&o)
    }

    /// The `--json` lines of a list command.
    async fn json_lines(&self, args: &[&str]) -> Vec<Value> {
        let mut args = args.to_vec();
        args.push("--json");
        self.ok(&args).await.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    }
}

/// The rows of a table printed by the CLI (without its header), split into cells.
fn rows(table: &str) -> Vec<Vec<String>> {
    let mut lines = table.lines();
    lines.next();
    lines.map(|l| l.split_whitespace().map(str::to_string).collect()).collect()
}

async fn operator_key(d: &TestDaemon) -> String {
    d.app().operator_key.clone().expect("a fresh database gets an operator key")
}

#[actix_rt::test]
async fn workflow_execution_and_analytics_commands_work_over_the_api() {
    let receiver = Receiver::start().await;
    receiver.on("/bad", Behaviour::Status(500, "{}".into()));
    let d = TestDaemon::start().await;
    let cli = ApiCli::new(&d, &operator_key(&d).await);
    let t = tenant(&d.store, "acme", 2).await;
    let (bot, other_bot) = (t.chatbots[0].to_string(), t.chatbots[1].to_string());
    let db = d.db().await;
    let dir = TempDir::new("apicli");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };

    // apply through the API: YAML turned into JSON, one id per line, unchanged on a second run.
    let yaml = format!(
        "- name: ok\n  trigger: {{event: x.ok}}\n  steps:\n    - {{id: call, action: webhook, url: {ok}}}\n\
         - name: bad\n  trigger: {{event: x.bad}}\n  retry: {{max_attempts: 1}}\n  steps:\n    - {{id: call, action: webhook, url: {bad}}}\n",
        ok = receiver.url("/ok"),
        bad = receiver.url("/bad")
    );
    let file = write("workflows.yaml", &yaml);
    let o = cli.run(&["workflows", "apply", "--chatbot", &bot, &file]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 2, "{}", stdout(&o));
    assert!(ids.iter().all(|id| id.parse::<uuid::Uuid>().is_ok()), "{ids:?}");
    assert!(stderr(&o).contains("created workflow \"ok\""), "{}", stderr(&o));
    let (ok_wf, bad_wf) = (ids[0].clone(), ids[1].clone());
    let n: i64 = db
        .query_one("SELECT count(*) FROM workflows WHERE chatbot_id = $1::text::uuid", &[&bot])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let o = cli.run(&["workflows", "apply", "--chatbot", &bot, &file]).await;
    assert_eq!(stdout(&o).lines().collect::<Vec<_>>(), ids);
    assert!(stderr(&o).contains("unchanged"), "{}", stderr(&o));
    // --admin and --token on the command line do the same as the environment.
    let mut c = tokio::process::Command::from(botflow());
    c.args(["workflows", "apply", "--chatbot", &bot, &file, "--admin", &cli.admin, "--token", &cli.key])
        .current_dir(&cli.dir)
        .env("BOTFLOW_DATABASE__URL", "host=/nonexistent port=1 user=nobody dbname=nothing connect_timeout=1");
    let o = c.output().await.unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().collect::<Vec<_>>(), ids);
    let v2 = write("v2.yaml", &yaml.replacen("url:", "timeout_ms: 4000, url:", 1));
    let applied = cli.json_lines(&["workflows", "apply", "--chatbot", &bot, &v2]).await;
    assert_eq!((applied[0]["result"].as_str(), applied[0]["version"].as_i64()), (Some("updated"), Some(2)), "{applied:?}");
    assert_eq!(applied[1]["result"], "unchanged");
    let bad_file = write("bad.yaml", "name: x\ntrigger: {event: x.a}\nsteps:\n  - {id: a, action: webhook, url: ftp://nowhere}\n");
    let err = cli.fails(&["workflows", "apply", "--chatbot", &bot, &bad_file]).await;
    assert!(err.contains("422") && err.contains("steps[0].url"), "{err}");
    let err = cli.fails(&["workflows", "apply", "--chatbot", &uuid::Uuid::new_v4().to_string(), &file]).await;
    assert!(err.contains("not found"), "{err}");

    // list, get, versions.
    let table = cli.ok(&["workflows", "list", "--chatbot", &bot]).await;
    let listed = rows(&table);
    assert_eq!(listed.len(), 2, "{table}");
    assert_eq!(listed[0][..4], [ok_wf.clone(), "ok".into(), "2".into(), "yes".into()], "{table}");
    assert_eq!(listed[1][..2], [bad_wf.clone(), "bad".into()], "{table}");
    let names: Vec<Value> = cli.json_lines(&["workflows", "list", "--chatbot", &bot]).await.iter().map(|w| w["name"].clone()).collect();
    assert_eq!(names, ["ok", "bad"]);
    let definition: Value = serde_json::from_str(&cli.ok(&["workflows", "get", "--chatbot", &bot, &ok_wf]).await).unwrap();
    assert_eq!(definition["name"], "ok");
    assert_eq!(definition["steps"][0]["timeout_ms"], 4000);
    let record: Value = serde_json::from_str(&cli.ok(&["workflows", "get", "--chatbot", &bot, &ok_wf, "--json"]).await).unwrap();
    assert_eq!((record["id"].as_str(), record["version"].as_i64()), (Some(ok_wf.as_str()), Some(2)));
    let table = cli.ok(&["workflows", "versions", "--chatbot", &bot, &ok_wf]).await;
    let versions: Vec<String> = rows(&table).iter().map(|r| r[0].clone()).collect();
    assert_eq!(versions, ["2", "1"], "{table}");
    let err = cli.fails(&["workflows", "list", "--chatbot", &uuid::Uuid::new_v4().to_string()]).await;
    assert!(err.contains("404") && err.contains("not found"), "{err}");

    // copy, disable, enable, delete.
    let o = cli.run(&["workflows", "copy", "--chatbot", &bot, &ok_wf, "--to", &other_bot, "--name", "ok copy"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let copy = stdout(&o).trim().to_string();
    assert!(copy.parse::<uuid::Uuid>().is_ok() && copy != ok_wf, "stdout is only the new id: {copy:?}");
    let copied: Vec<Value> = cli.json_lines(&["workflows", "list", "--chatbot", &other_bot]).await;
    assert_eq!(copied.len(), 1);
    assert_eq!((copied[0]["id"].as_str(), copied[0]["name"].as_str()), (Some(copy.as_str()), Some("ok copy")));
    let enabled = |id: String| {
        let db = &db;
        async move {
            let e: bool = db.query_one("SELECT enabled FROM workflows WHERE id = $1::text::uuid", &[&id]).await.unwrap().get(0);
            e
        }
    };
    assert!(cli.ok(&["workflows", "disable", "--chatbot", &other_bot, &copy]).await.is_empty());
    assert!(!enabled(copy.clone()).await);
    cli.ok(&["workflows", "enable", "--chatbot", &other_bot, &copy]).await;
    assert!(enabled(copy.clone()).await);
    cli.ok(&["workflows", "delete", "--chatbot", &other_bot, &copy]).await;
    let err = cli.fails(&["workflows", "get", "--chatbot", &other_bot, &copy]).await;
    assert!(err.contains("not found"), "{err}");
    let err = cli.fails(&["workflows", "copy", "--chatbot", &bot, &ok_wf, "--to", &uuid::Uuid::new_v4().to_string()]).await;
    assert!(err.contains("not found"), "{err}");

    // dry-run: a saved workflow or a file, exit 0 whether it matches or not.
    let matching = write("ok-event.json", r#"{"op":"event","id":"e","type":"x.ok","data":{}}"#);
    let other = write("other-event.json", r#"{"type":"x.other"}"#);
    let dry_run = ["workflows", "dry-run", "--chatbot", &bot, "--workflow-id", &ok_wf, "--event"];
    let out = cli.ok(&[&dry_run[..], &[&matching]].concat()).await;
    assert_eq!(out.trim(), "match");
    let out = cli.ok(&[&dry_run[..], &[&other]].concat()).await;
    assert!(out.starts_with("no match: trigger.event") && out.contains("x.other"), "{out}");
    let err = cli.fails(&["workflows", "dry-run", "--chatbot", &bot, "--file", &v2, "--event", &other]).await;
    assert!(err.contains("dry-run tries one workflow; the file has 2"), "{err}");
    let one = write("one.yaml", "name: kw\ntrigger: {event: message.received, keywords: {any: [refund]}}\nsteps:\n  - {id: r, action: reply, text: hi}\n");
    let msg = write("msg.yaml", "type: message.received\ndata: {text: I want a REFUND now}\n");
    let v: Value = serde_json::from_str(&cli.ok(&["workflows", "dry-run", "--chatbot", &bot, "--file", &one, "--event", &msg, "--json"]).await).unwrap();
    assert_eq!(v["matches"], true, "{v}");
    let err = cli.fails(&["workflows", "dry-run", "--chatbot", &bot, "--file", &bad_file, "--event", &msg]).await;
    assert!(err.contains("workflow.steps[0].url"), "{err}");

    // Two executions: one succeeds, one dies.
    let mut c = Client::tcp(d.tcp()).await.hello(&t.key, &[]).await;
    c.send(&event("e-ok", t.chatbots[0], "x.ok", serde_json::json!({}))).await;
    let mut bad_event = event("e-bad", t.chatbots[0], "x.bad", serde_json::json!({}));
    bad_event["conversation_id"] = "conv-2".into();
    c.send(&bad_event).await;
    let _ = c.answers(2).await;
    eventually("one execution succeeds and one dies", || async {
        let rows = db
            .query("SELECT status FROM executions WHERE status IN ('succeeded', 'dead') ORDER BY status", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>() == ["dead", "succeeded"]
    })
    .await;
    let id_of = |status: &'static str| {
        let db = &db;
        async move {
            let r = db.query_one("SELECT id::text FROM executions WHERE status = $1", &[&status]).await.unwrap();
            r.get::<_, String>(0)
        }
    };
    let (succeeded, dead) = (id_of("succeeded").await, id_of("dead").await);

    // executions list: a table, filters, pages.
    let table = cli.ok(&["executions", "list", "--chatbot", &bot]).await;
    let listed = rows(&table);
    assert_eq!(listed.iter().map(|r| r[0].clone()).collect::<Vec<_>>(), [dead.clone(), succeeded.clone()], "newest first: {table}");
    assert_eq!(listed[0][3], "dead", "{table}");
    // The workflow by its name and version ("bad" died, "ok" succeeded), not its id;
    // `--json` keeps the id.
    let lines: Vec<&str> = table.lines().skip(1).collect();
    assert!(lines[0].contains(" bad v1 ") && lines[1].contains(" ok v"), "{table}");
    assert!(!table.contains(&bad_wf) && !table.contains(&ok_wf), "{table}");
    let only_dead = cli.json_lines(&["executions", "list", "--chatbot", &bot, "--status", "dead"]).await;
    assert_eq!(only_dead.len(), 1);
    assert_eq!(only_dead[0]["workflow_name"], "bad", "{}", only_dead[0]);
    assert_eq!((only_dead[0]["id"].as_str(), only_dead[0]["status"].as_str()), (Some(dead.as_str()), Some("dead")));
    assert!(only_dead[0]["error"].as_str().unwrap().contains("500"), "{}", only_dead[0]);
    let by_workflow = cli.json_lines(&["executions", "list", "--chatbot", &bot, "--workflow", &ok_wf]).await;
    assert_eq!(by_workflow.iter().map(|e| e["id"].as_str().unwrap()).collect::<Vec<_>>(), [succeeded.as_str()]);
    let by_conversation = cli.json_lines(&["executions", "list", "--chatbot", &bot, "--conversation", "conv-2"]).await;
    assert_eq!(by_conversation.len(), 1);
    assert_eq!(by_conversation[0]["id"].as_str(), Some(dead.as_str()));
    let by_text = cli.json_lines(&["executions", "list", "--chatbot", &bot, "--q", "500"]).await;
    assert_eq!(by_text.len(), 1);
    let future = cli.json_lines(&["executions", "list", "--chatbot", &bot, "--since", "2999-01-01T00:00:00Z"]).await;
    assert!(future.is_empty());
    let o = cli.run(&["executions", "list", "--chatbot", &bot, "--limit", "1"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(rows(&stdout(&o)).len(), 1);
    let cursor = stderr(&o).lines().find_map(|l| l.strip_prefix("more: --cursor ")).map(str::to_string).expect("a cursor on stderr");
    let o = cli.run(&["executions", "list", "--chatbot", &bot, "--limit", "1", "--cursor", &cursor]).await;
    assert_eq!(rows(&stdout(&o))[0][0], succeeded);
    assert!(!stderr(&o).contains("--cursor"), "the last page has no cursor: {}", stderr(&o));
    let all = cli.json_lines(&["executions", "list", "--chatbot", &bot, "--limit", "1", "--all"]).await;
    assert_eq!(all.len(), 2);
    let err = cli.fails(&["executions", "list", "--chatbot", &bot, "--status", "exploded"]).await;
    assert!(err.contains("400") && err.contains("status \"exploded\" is not one of"), "{err}");
    let err = cli.fails(&["executions", "list", "--chatbot", &uuid::Uuid::new_v4().to_string()]).await;
    assert!(err.contains("not found"), "{err}");
    let err = cli.fails(&["executions", "list", "--chatbot", "nope"]).await;
    assert!(err.contains("'--chatbot <CHATBOT>'") && err.contains("expected an id, a UUID such as"), "{err}");
    let err = cli.fails(&["executions", "list", "--chatbot", &bot, "--since", "yesterday"]).await;
    assert!(err.contains("--since"), "{err}");

    // executions show: the execution and one line per step attempt.
    let out = cli.ok(&["executions", "show", &dead]).await;
    assert!(out.contains(&format!("execution    {dead}")) && out.contains("dead (attempt 1)"), "{out}");
    let attempt = out.lines().find(|l| l.starts_with("0 call")).expect("a line for the step's attempt");
    assert!(attempt.contains("webhook") && attempt.contains("failed") && attempt.contains("500"), "{out}");
    let v: Value = serde_json::from_str(&cli.ok(&["executions", "show", &succeeded, "--json"]).await).unwrap();
    assert_eq!((v["status"].as_str(), v["steps"].as_array().map(Vec::len)), (Some("succeeded"), Some(1)));
    let err = cli.fails(&["executions", "show", &uuid::Uuid::new_v4().to_string()]).await;
    assert!(err.contains("not found"), "{err}");

    // analytics: a row per workflow.
    let table = cli.ok(&["analytics", "--chatbot", &bot]).await;
    let stats = rows(&table);
    assert_eq!(stats.len(), 2, "{table}");
    let ok_row = stats.iter().find(|r| r[0] == "ok").expect("a row for ok");
    assert_eq!(ok_row[1..7], ["1", "1", "0", "0", "0", "100.0%"], "{table}");
    let bad_row = stats.iter().find(|r| r[0] == "bad").expect("a row for bad");
    assert_eq!(bad_row[1..7], ["1", "0", "0", "1", "0", "0.0%"], "{table}");
    let v: Value = serde_json::from_str(&cli.ok(&["analytics", "--chatbot", &bot, "--method", "exact", "--json"]).await).unwrap();
    assert_eq!(v["exact"], true);
    assert_eq!(v["workflows"].as_array().unwrap().len(), 2);
    let v: Value = serde_json::from_str(&cli.ok(&["analytics", "--chatbot", &bot, "--method", "rollup", "--json"]).await).unwrap();
    assert_eq!(v["exact"], false);
    let err = cli.fails(&["analytics", "--chatbot", &bot, "--method", "guess"]).await;
    assert!(err.contains("method \"guess\""), "{err}");
    let err = cli.fails(&["analytics", "--chatbot", &bot, "--since", "2026-01-02T00:00:00Z", "--until", "2026-01-01T00:00:00Z"]).await;
    assert!(err.contains("since must be before until"), "{err}");
    let out = cli.ok(&["analytics", "--chatbot", &other_bot]).await;
    assert!(out.is_empty(), "no executions, no table: {out}");
}

#[actix_rt::test]
async fn dlq_commands_list_show_replay_and_discard_over_the_api() {
    let receiver = Receiver::start().await;
    receiver.on("/hook", Behaviour::Status(500, "{}".into()));
    let d = TestDaemon::start().await;
    let t = tenant(&d.store, "acme", 1).await;
    let bot = t.chatbots[0].to_string();
    let workflow = apply(
        &d.store,
        t.chatbots[0],
        serde_json::json!({"name": "w", "trigger": {"event": "x.go"}, "retry": {"max_attempts": 1},
                           "steps": [{"id": "call", "action": "webhook", "url": receiver.url("/hook")}]}),
    )
    .await[0]
    .to_string();
    let mut c = Client::tcp(d.tcp()).await.hello(&t.key, &[]).await;
    for id in ["e1", "e2", "e3", "e4"] {
        c.send(&event(id, t.chatbots[0], "x.go", serde_json::json!({}))).await;
    }
    let _ = c.answers(4).await;
    let db = d.db().await;
    eventually("every execution dies", || async {
        let n: i64 = db.query_one("SELECT count(*) FROM dead_letters", &[]).await.unwrap().get(0);
        n == 4
    })
    .await;
    let cli = ApiCli::new(&d, &operator_key(&d).await);

    // list: one JSON object per line, a table, pages.
    let letters = cli.json_lines(&["dlq", "list", "--chatbot", &bot]).await;
    assert_eq!(letters.len(), 4);
    assert!(letters.iter().all(|l| l["last_error"].as_str().unwrap().contains("500") && l["attempts"] == 1), "{letters:?}");
    let ids: Vec<String> = letters.iter().map(|l| l["id"].as_str().unwrap().to_string()).collect();
    let table = cli.ok(&["dlq", "list"]).await;
    let listed = rows(&table);
    assert_eq!(listed.iter().map(|r| r[0].clone()).collect::<Vec<_>>(), ids, "operators see every account's: {table}");
    // The workflow by its name and version; `--json` keeps the id.
    assert!(listed.iter().all(|r| r[3] == "open" && r[4] == bot && table.lines().skip(1).all(|l| l.contains(" w v1 "))), "{table}");
    assert!(!table.contains(&workflow), "{table}");
    assert!(letters.iter().all(|l| l["workflow_id"] == workflow.as_str() && l["workflow_name"] == "w"), "{letters:?}");
    let o = cli.run(&["dlq", "list", "--chatbot", &bot, "--limit", "3"]).await;
    assert_eq!(rows(&stdout(&o)).len(), 3);
    let cursor = stderr(&o).lines().find_map(|l| l.strip_prefix("more: --cursor ")).map(str::to_string).expect("a cursor on stderr");
    let rest = cli.json_lines(&["dlq", "list", "--chatbot", &bot, "--limit", "3", "--cursor", &cursor]).await;
    assert_eq!(rest.iter().map(|l| l["id"].as_str().unwrap()).collect::<Vec<_>>(), [ids[3].as_str()]);
    assert_eq!(cli.json_lines(&["dlq", "list", "--limit", "1", "--all-pages"]).await.len(), 4);
    assert_eq!(cli.json_lines(&["dlq", "list", "--chatbot", &bot, "--q", "nothing like this"]).await.len(), 0);

    // show: the letter, its event and its attempts.
    let out = cli.ok(&["dlq", "show", &ids[0]]).await;
    assert!(out.contains(&format!("dead letter  {}", ids[0])) && out.contains("after attempt 1"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("0 call") && l.contains("webhook") && l.contains("failed")), "{out}");
    let v: Value = serde_json::from_str(&cli.ok(&["dlq", "show", &ids[0], "--json"]).await).unwrap();
    assert_eq!(v["event"]["type"], "x.go");

    // discard one: the API records the key that did it.
    cli.ok(&["dlq", "discard", &ids[0]]).await;
    let by: Option<String> =
        db.query_one("SELECT discarded_by FROM dead_letters WHERE id = $1::text::uuid", &[&ids[0]]).await.unwrap().get(0);
    assert!(by.as_deref().is_some_and(|b| b.starts_with("key ")), "{by:?}");
    let err = cli.fails(&["dlq", "discard", &ids[0]]).await;
    assert!(err.contains("409") && err.contains("already discarded"), "{err}");

    // replay one: prints the execution id, which then succeeds.
    receiver.on("/hook", Behaviour::Status(200, "{}".into()));
    let execution = cli.ok(&["dlq", "replay", &ids[1]]).await.trim().to_string();
    assert_eq!(execution, letters[1]["execution_id"].as_str().unwrap());
    let succeeded = |execution: String| {
        let db = &db;
        async move {
            let s: String =
                db.query_one("SELECT status FROM executions WHERE id = $1::text::uuid", &[&execution]).await.unwrap().get(0);
            s == "succeeded"
        }
    };
    eventually("the replayed execution succeeds", || succeeded(execution.clone())).await;

    // Bulk: replay what matches, then discard the rest; each prints a count. In batches
    // of one here (one request each), with no progress drawn on a pipe.
    let n = cli
        .ok(&["dlq", "replay", "--chatbot", &bot, "--matching", "--workflow", &workflow, "--q", "500", "--max", "1"])
        .await;
    assert_eq!(n.trim(), "1");
    let o = cli.run(&["dlq", "discard", "--chatbot", &bot, "--matching", "--batch", "1", "--max", "5"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "1");
    assert!(!stderr(&o).contains(['\r', '\x1b']), "progress drawn on a pipe: {:?}", stderr(&o));
    let o = cli.run(&["dlq", "list", "--chatbot", &bot]).await;
    assert!(o.status.success() && stdout(&o).is_empty(), "nothing open is left: {}", stdout(&o));
    assert!(stderr(&o).contains("no dead letters"), "{}", stderr(&o));
    let states: Vec<String> = rows(&cli.ok(&["dlq", "list", "--chatbot", &bot, "--state", "all"]).await)
        .iter()
        .map(|r| r[3].clone())
        .collect();
    assert_eq!(states.iter().filter(|s| *s == "replayed").count(), 2, "{states:?}");
    assert_eq!(states.iter().filter(|s| *s == "discarded").count(), 2, "{states:?}");
    assert_eq!(cli.json_lines(&["dlq", "list", "--state", "replayed"]).await.len(), 2);
    let open: i64 = db
        .query_one("SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL AND discarded_at IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0);

    // Bad input.
    let err = cli.fails(&["dlq", "replay", &uuid::Uuid::new_v4().to_string()]).await;
    assert!(err.contains("404") && err.contains("not found"), "{err}");
    let err = cli.fails(&["dlq", "list", "--chatbot", &uuid::Uuid::new_v4().to_string()]).await;
    assert!(err.contains("not found"), "{err}");
    let err = cli.fails(&["dlq", "list", "--state", "lost"]).await;
    assert!(err.contains("400") && err.contains("lost"), "{err}");
    let err = cli.fails(&["dlq", "discard", "--chatbot", &bot, "--matching", "--max", "0"]).await;
    assert!(err.contains("max must be"), "{err}");
    let err = cli.fails(&["dlq", "list", "--all"]).await;
    assert!(err.contains("--state all"), "{err}");
    let err = cli.fails(&["dlq", "replay", "--matching"]).await;
    assert!(err.contains("--chatbot"), "{err}");
    // An admin key sees its own account's letters, not every account's.
    let admin = botflow::store::accounts::create_key(&d.store, t.account, botflow::store::accounts::Role::Admin).await.unwrap();
    let admin_cli = ApiCli::new(&d, &admin);
    assert_eq!(admin_cli.json_lines(&["dlq", "list", "--chatbot", &bot, "--state", "all"]).await.len(), 4);
    let err = admin_cli.fails(&["dlq", "list"]).await;
    assert!(err.contains("403") && err.contains("operator"), "{err}");
}

/// `pg_ctl restart` on the embedded server's data directory, as an operator might run
/// it (as the server's user when this runs as root); answers the new postmaster's pid.
fn restart_from_outside(var: &Path) -> i32 {
    let before = postmaster_pid(var).expect("the embedded PostgreSQL runs");
    let pgdata = var.join("postgres/data");
    let mut c = if unsafe { libc::geteuid() } == 0 {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", "pg_ctl"]);
        c
    } else {
        std::process::Command::new("pg_ctl")
    };
    let o = c.args(["restart", "-m", "fast", "-w", "-D"]).arg(&pgdata).stdout(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "pg_ctl restart: {}", String::from_utf8_lossy(&o.stderr));
    let after = postmaster_pid(var).expect("restarted");
    assert_ne!(after, before);
    after
}

#[test]
fn a_postgres_restarted_from_outside_is_stopped_with_the_daemon_and_one_left_behind_is_stopped_at_start() {
    let dir = TempDir::new("outside");
    let var = dir.path().join("var");
    let start = || serve_on_socket_only(dir.path());
    // A stopped server whose parent is gone may stay a zombie until something reaps it.
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
            .unwrap_or(false)
    };

    // Restarted under a running daemon: SIGTERM still stops it.
    let mut d = start();
    let outside = restart_from_outside(&var);
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    assert!(d.child.wait().unwrap().success());
    wait_for("the restarted PostgreSQL to stop with its daemon", || !alive(outside));

    // Restarted, then the daemon killed: the server is left running, and the next
    // start stops it and starts its own instead of refusing.
    let mut d = start();
    let outside = restart_from_outside(&var);
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(outside), "a server not started by the daemon outlives it");
    let mut d = start();
    assert!(!alive(outside), "the server left behind was stopped");
    let own = postmaster_pid(&var).expect("the daemon's own PostgreSQL runs");
    assert_ne!(own, outside);
    let o = run(botflow().args(["accounts", "create", "after"]).current_dir(dir.path()));
    assert!(o.status.success(), "{}", stderr(&o));
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    assert!(d.child.wait().unwrap().success());
    wait_for("its PostgreSQL to stop", || !alive(own));
}

#[test]
fn a_command_whose_reader_goes_away_ends_quietly() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    // The OpenAPI document is larger than a pipe holds: printing it blocks until the
    // reader reads, and the reader leaves after a few bytes (`botflow openapi | head -c 100`).
    let mut child = botflow().arg("openapi").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = [0u8; 100];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert!(o.status.success() || o.status.signal() == Some(libc::SIGPIPE), "{:?}: {err}", o.status);
}


#[test]
fn completions_and_the_man_page_come_from_the_command_definition() {
    let dir = TempDir::new("completions");
    let o = run(botflow().args(["completions", "bash"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let script = dir.path().join("botflow.bash");
    std::fs::write(&script, o.stdout).unwrap();
    // bash loads it and then completes `botflow dl` to `dlq`.
    let o = run(Command::new("bash").arg("-c").arg(format!(
        "source {}; COMP_WORDS=(botflow dl); COMP_CWORD=1; COMP_LINE='botflow dl'; COMP_POINT=10; _botflow botflow dl botflow; echo \"${{COMPREPLY[@]}}\"",
        script.display()
    )));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "dlq", "{}", stderr(&o));
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let o = run(botflow().args(["completions", shell]));
        assert!(o.status.success() && stdout(&o).contains("workflows"), "{shell}: {}", stderr(&o));
    }
    let o = run(botflow().arg("man"));
    assert!(o.status.success(), "{}", stderr(&o));
    let page = stdout(&o);
    assert!(page.contains(".TH botflow 1"), "{page}");
    for sub in ["serve", "check\\-config", "workflows", "dlq", "completions"] {
        assert!(page.contains(sub), "the man page does not list {sub}");
    }
}

#[actix_rt::test]
async fn key_commands_list_rotate_revoke_and_the_audit_over_the_api() {
    let d = TestDaemon::start().await;
    let t = tenant(&d.store, "acme", 0).await;
    let admin = botflow::store::accounts::create_key(&d.store, t.account, botflow::store::accounts::Role::Admin).await.unwrap();
    let cli = ApiCli::new(&d, &admin);
    let prefix = &t.key[4..16];

    // A table of the account's keys, never a key itself.
    let out = cli.ok(&["keys", "list"]).await;
    let table = rows(&out);
    assert_eq!(table.len(), 2, "{out}");
    assert!(out.starts_with("ID") && out.contains("LAST USED") && out.contains(&format!("bfk_{prefix}_…")), "{out}");
    assert!(!out.contains(&t.key[17..]), "{out}");
    let id = table.iter().find(|r| r[1].contains(prefix)).unwrap()[0].clone();
    assert!(table.iter().all(|r| r.contains(&"active".to_string())), "{out}");

    // Rotation prints only the new key on stdout.
    let o = cli.run(&["keys", "rotate", &id, "--grace", "10m"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let new_key = stdout(&o).trim().to_string();
    assert!(new_key.starts_with("bfk_") && !new_key.contains(char::is_whitespace), "{new_key:?}");
    assert!(stderr(&o).contains("works until"), "{}", stderr(&o));
    let err = cli.fails(&["keys", "rotate", &id, "--grace", "ten minutes"]).await;
    assert!(err.contains("10m"), "{err}");
    let listed = cli.json_lines(&["keys", "list"]).await;
    assert_eq!(listed.len(), 3);
    let old = listed.iter().find(|k| k["id"] == id.as_str()).unwrap();
    assert_eq!(old["state"], "expiring", "{old}");
    let left = chrono::DateTime::parse_from_rfc3339(old["expires_at"].as_str().unwrap()).unwrap().to_utc() - chrono::Utc::now();
    assert!(left > chrono::TimeDelta::seconds(590) && left <= chrono::TimeDelta::seconds(600), "{left}");

    // Revocation shows the key's fields; the audit lists both actions, newest first.
    let out = cli.ok(&["keys", "revoke", &id]).await;
    assert!(out.contains("state") && out.contains("revoked"), "{out}");
    let out = cli.ok(&["audit"]).await;
    let entries = rows(&out);
    assert_eq!(entries.iter().map(|r| r[2].as_str()).collect::<Vec<_>>(), ["key.revoke", "key.rotate"], "{out}");
    let json = cli.json_lines(&["audit"]).await;
    assert_eq!(json[1]["details"]["new_key_id"], listed.iter().find(|k| k["id"] != id.as_str() && k["role"] == "ingest").unwrap()["id"]);
    // Another account's key is not found.
    let other = tenant(&d.store, "other", 0).await;
    let op = ApiCli::new(&d, &operator_key(&d).await);
    let theirs = op.json_lines(&["keys", "list", "--account", &other.account.to_string()]).await;
    let err = cli.fails(&["keys", "revoke", theirs[0]["id"].as_str().unwrap()]).await;
    assert!(err.contains("404") && err.contains("not found"), "{err}");

    // A chatbot's webhook secret: the new one alone on stdout.
    let bot = botflow::store::accounts::create_chatbot(&d.store, t.account, "support").await.unwrap();
    let o = cli.run(&["chatbots", "rotate-secret", &bot.to_string(), "--grace", "1h"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let secret = stdout(&o).trim().to_string();
    assert_eq!(secret.len(), 64, "{secret:?}");
    assert!(stderr(&o).contains("old secret's signature too until"), "{}", stderr(&o));
    let record = botflow::store::accounts::get_chatbot(&d.store, bot).await.unwrap().unwrap();
    assert_eq!(record.signing().current, secret);
    assert!(cli.ok(&["audit"]).await.contains("chatbot.rotate_secret"));

    // Deleting it: the operator must say what becomes of its history.
    let err = cli.fails(&["chatbots", "delete", &bot.to_string()]).await;
    assert!(err.contains("--history"), "{err}");
    let o = cli.run(&["chatbots", "delete", &bot.to_string(), "--history", "prune"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("is deleted; its history is being pruned"), "{}", stderr(&o));
    assert!(stdout(&o).contains("cancelled executions") && stdout(&o).contains("prune"), "{}", stdout(&o));
    assert!(botflow::store::accounts::get_chatbot(&d.store, bot).await.unwrap().is_none());
    assert!(cli.ok(&["audit"]).await.contains("chatbot.delete"));
    let err = cli.fails(&["chatbots", "delete", &bot.to_string(), "--history", "keep"]).await;
    assert!(err.contains("404") && err.contains("not found"), "{err}");
}
