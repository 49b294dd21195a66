//! The client libraries (`clients/python`, `clients/node`) against real daemons: each
//! library's own test suite runs with the daemon's addresses, key and chatbots in
//! environment variables, and this file checks in the database what a client cannot see
//! (its command acks were recorded, every resent event ran once). One daemon runs in
//! process (Unix socket and TCP under TLS); another is a `botflow serve` that the
//! library's test kills and this test starts again.

mod common;

use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Longest a library's suite may run before it is killed and the test fails.
const SUITE_DEADLINE: Duration = Duration::from_secs(120);

/// A client library and how its test suite runs.
#[derive(Clone, Copy)]
enum Library {
    Python,
    Node,
}

impl Library {
    fn name(self) -> &'static str {
        match self {
            Library::Python => "Python",
            Library::Node => "Node",
        }
    }

    fn dir(self) -> PathBuf {
        let sub = match self {
            Library::Python => "clients/python",
            Library::Node => "clients/node",
        };
        Path::new(env!("CARGO_MANIFEST_DIR")).join(sub)
    }

    /// The suite's tests that need a daemon over Unix and TLS, with those that need
    /// none (a scripted stand-in daemon, the declarations' check) so that CI runs them.
    fn daemon_tests(self) -> &'static [&'static str] {
        match self {
            Library::Python => &["tests.test_client", "tests.test_protocol"],
            Library::Node => &["test/client.test.js", "test/protocol.test.js", "test/types.test.js"],
        }
    }

    fn restart_tests(self) -> &'static [&'static str] {
        match self {
            Library::Python => &["tests.test_reconnect"],
            Library::Node => &["test/reconnect.test.js"],
        }
    }

    fn command(self, tests: &[&str]) -> std::process::Command {
        let mut c = match self {
            Library::Python => {
                let mut c = std::process::Command::new("python3");
                c.args(["-m", "unittest", "-v"])
                    .env("PYTHONPATH", self.dir())
                    .env("PYTHONDONTWRITEBYTECODE", "1")
                    .env("PYTHONUNBUFFERED", "1");
                c
            }
            Library::Node => {
                let mut c = std::process::Command::new("node");
                // The suite's own flags only: nothing inherited may change how it runs.
                c.args(["--test", "--test-reporter=tap"]).env_remove("NODE_OPTIONS");
                c
            }
        };
        c.args(tests).current_dir(self.dir());
        c
    }

    /// Whether the output says every test passed and none was skipped (a skip here
    /// would mean a variable is missing).
    fn all_passed(self, output: &str) -> bool {
        match self {
            Library::Python => !output.contains("skipped"),
            Library::Node => {
                let count = |name: &str| {
                    let prefix = format!("# {name} ");
                    output.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|n| n.trim().parse::<u64>().ok())
                };
                // A skipped suite is not counted in the summary, only marked on its own line.
                count("pass").is_some_and(|n| n > 0)
                    && ["fail", "cancelled", "skipped", "todo"].iter().all(|k| count(k) == Some(0))
                    && !output.contains("# SKIP")
                    && !output.contains("# TODO")
            }
        }
    }

    /// Runs the suite's `tests` with `env`; its output as the error unless every test
    /// passed within the deadline.
    async fn run(self, tests: &[&str], env: Vec<(&'static str, String)>) -> Result<(), String> {
        let mut command = self.command(tests);
        let (ok, output) = tokio::task::spawn_blocking(move || {
            let out_dir = TempDir::new("client-suite-out");
            let out_file = out_dir.path().join("output.txt");
            let out = std::fs::File::create(&out_file).unwrap();
            let mut child = command
                .envs(env)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("run the {} suite: {e}", self.name()));
            let start = Instant::now();
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                if start.elapsed() > SUITE_DEADLINE {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            let output = std::fs::read_to_string(&out_file).unwrap_or_default();
            (status.is_some_and(|s| s.success()) && self.all_passed(&output), output)
        })
        .await
        .unwrap();
        if ok {
            // Shown with --nocapture (or when a later check of this test fails).
            eprintln!("{output}");
            Ok(())
        } else {
            Err(format!("the {} tests failed (or were skipped or timed out):\n{output}", self.name()))
        }
    }
}

/// A CA and a certificate it signed for 127.0.0.1, as PEM files in `dir`: (ca, cert, key).
fn certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "botflow test CA");
    let ca_cert = params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

const MAX_IN_FLIGHT: usize = 8;

async fn against_a_daemon_over_unix_and_tls(library: Library) {
    let dir = TempDir::new("client");
    let (ca, cert, key) = certs(dir.path());
    let daemon = TestDaemon::start_with(DaemonOptions {
        tweak: Box::new(move |c| {
            c.ingest.tls_cert_file = cert.display().to_string();
            c.ingest.tls_key_file = key.display().to_string();
            // Small, so that a test's burst fills the window.
            c.ingest.max_in_flight = MAX_IN_FLIGHT;
        }),
        ..Default::default()
    })
    .await;
    let t = tenant(&daemon.store, library.name(), 2).await;
    let (bot, limited) = (t.chatbots[0], t.chatbots[1]);
    apply(
        &daemon.store,
        bot,
        json!([
            {"name": "load", "trigger": {"event": "x.load"},
             "steps": [{"id": "rest", "action": "delay", "duration": "0s"}]},
            {"name": "echo", "trigger": {"event": "message.received", "keywords": {"any": ["echo"]}},
             "steps": [{"id": "say", "action": "reply", "text": "echo: {{event.data.text}}"}]}
        ]),
    )
    .await;
    // Set before the chatbot's first event, so its supervisor starts with it.
    let two_per_second = botflow::store::limits::Overrides { events_per_second: Some(2), burst: Some(2), ..Default::default() };
    botflow::store::limits::set(&daemon.store, limited, two_per_second, "client library test").await.unwrap();

    library.run(
        library.daemon_tests(),
        vec![
            ("BOTFLOW_SOCKET", daemon.unix().display().to_string()),
            ("BOTFLOW_TCP", daemon.tcp().to_string()),
            ("BOTFLOW_CA_FILE", ca.display().to_string()),
            ("BOTFLOW_TOKEN", t.key.clone()),
            ("BOTFLOW_CHATBOT", bot.to_string()),
            ("BOTFLOW_LIMITED_CHATBOT", limited.to_string()),
            ("BOTFLOW_MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string()),
        ],
    )
    .await
    .unwrap_or_else(|output| panic!("{output}"));

    // The commands the client acked are recorded as acked: none is left to redeliver.
    let db = daemon.db().await;
    let total: i64 = db.query_one("SELECT count(*) FROM outbox WHERE chatbot_id = $1", &[&bot]).await.unwrap().get(0);
    assert_eq!(total, 2, "one reply per echo event of the {} tests", library.name());
    eventually("the client's command acks are recorded", || async {
        let acked: i64 = db
            .query_one("SELECT count(*) FROM outbox WHERE chatbot_id = $1 AND status = 'acked'", &[&bot])
            .await
            .unwrap()
            .get(0);
        acked == total
    })
    .await;
}

/// Runs a bootstrap command against the daemon's database; returns its stdout.
fn cli(dir: &Path, args: &[&str]) -> String {
    let mut c = botflow_cmd();
    c.args(args).current_dir(dir).env("BOTFLOW_DATA_DIR", dir.join("var"));
    let o = c.output().unwrap();
    assert!(o.status.success(), "botflow {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The daemon of the restart test: socket only, and a short lease so that the
/// execution the killed daemon held is taken over soon.
fn serve(dir: &Path) -> Serve {
    serve_socket_only(dir, &[("BOTFLOW_LEASE__TTL_MS", "2000".to_string())], Stdio::null())
}

async fn resends_across_a_daemon_restart(library: Library) {
    let dir = TempDir::new("client-restart");
    let first = serve(dir.path());
    let account = cli(dir.path(), &["accounts", "create", "acme"]);
    let key = cli(dir.path(), &["keys", "create", "--account", &account, "--role", "ingest"]);
    let bot: Uuid = cli(dir.path(), &["chatbots", "create", "--account", &account, "bot"]).parse().unwrap();
    let file = dir.path().join("workflow.json");
    let workflow = json!({"name": "answer", "trigger": {"event": "x.go"},
                          "steps": [{"id": "say", "action": "reply", "text": "done {{event.id}}"}]});
    std::fs::write(&file, workflow.to_string()).unwrap();
    cli(dir.path(), &["workflows", "apply", "--chatbot", &bot.to_string(), file.to_str().unwrap()]);

    // The library's test kills the daemon; this thread starts the next one once it is gone.
    let pid = first.child.id();
    let path = dir.path().to_path_buf();
    let restarter = std::thread::spawn(move || {
        let mut first = first;
        let _ = first.child.wait();
        serve(&path)
    });
    let suite = library.run(
        library.restart_tests(),
        vec![
            ("BOTFLOW_DAEMON_PID", pid.to_string()),
            ("BOTFLOW_SOCKET", dir.path().join("botflow.sock").display().to_string()),
            ("BOTFLOW_TOKEN", key),
            ("BOTFLOW_CHATBOT", bot.to_string()),
        ],
    )
    .await;
    // Whatever the library's test did, the first daemon goes (a no-op once it is dead), so
    // that the restarter never waits forever.
    // SAFETY: a signal to the process this test started; harmless if it is gone.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _second = tokio::task::spawn_blocking(move || restarter.join().expect("the restarter"))
        .await
        .unwrap();
    suite.unwrap_or_else(|output| panic!("{output}"));

    // Each event ran once, resent or not: the first, and the 30 sent while it was stopped.
    let db = embedded_db(dir.path()).await;
    let r = db
        .query_one("SELECT count(*), count(DISTINCT event_id) FROM executions WHERE chatbot_id = $1", &[&bot])
        .await
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (31, 31));
    // The replies acked after the restart are recorded, the redelivered one included.
    eventually("every reply acked", || async {
        let pending: i64 = db
            .query_one("SELECT count(*) FROM outbox WHERE chatbot_id = $1 AND status <> 'acked'", &[&bot])
            .await
            .unwrap()
            .get(0);
        let all: i64 = db.query_one("SELECT count(*) FROM outbox WHERE chatbot_id = $1", &[&bot]).await.unwrap().get(0);
        pending == 0 && all == 31
    })
    .await;
}

#[actix_rt::test]
async fn the_python_client_against_a_daemon_over_unix_and_tls() {
    against_a_daemon_over_unix_and_tls(Library::Python).await;
}

#[actix_rt::test]
async fn the_python_client_resends_across_a_daemon_restart() {
    resends_across_a_daemon_restart(Library::Python).await;
}

#[actix_rt::test]
async fn the_node_client_against_a_daemon_over_unix_and_tls() {
    against_a_daemon_over_unix_and_tls(Library::Node).await;
}

#[actix_rt::test]
async fn the_node_client_resends_across_a_daemon_restart() {
    resends_across_a_daemon_restart(Library::Node).await;
}
