//! Test support: a real PostgreSQL (the embedded launcher, one server per test process,
//! a fresh database per test; or `BOTFLOW_TEST_DATABASE_URL`), the daemon started in
//! process on OS-chosen ports, a line-oriented protocol client, and a local HTTP server
//! standing in for webhook receivers.
#![allow(dead_code)]

use botflow::app::{App, RunningApp};
use botflow::config::Config;
use botflow::postgres::{EmbeddedOptions, EmbeddedPostgres};
use botflow::store::{accounts, Store};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use uuid::Uuid;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        if start.elapsed() > DEADLINE {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the daemons of this test process logged, as text: a test that provokes an error
/// on purpose asserts on it, and a green run prints none of it. With `RUST_LOG` set the
/// logs go to stderr instead, as the daemon writes them (for a developer chasing a
/// failure), and `logs()` stays empty.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    match std::env::var("RUST_LOG") {
        Ok(level) => botflow::telemetry::init_logging("text", &level),
        Err(_) => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
                .with_writer(|| LogSink)
                .with_ansi(false)
                .try_init();
        }
    }
}

/// Everything logged so far (warnings and errors), one line each.
pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// A directory under /tmp removed on drop (the embedded server runs as the postgres
/// user, which must be able to reach it).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("botflow-{tag}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // A PostgreSQL whose daemon was just killed may still be writing in here as it
        // exits (it follows its parent within moments): try again for a while.
        for _ in 0..50 {
            if std::fs::remove_dir_all(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

enum Server {
    /// The server sits behind a lock so the exit hook can take it out and stop it.
    Embedded {
        pg: Mutex<Option<EmbeddedPostgres>>,
        admin: tokio_postgres::Config,
        dir: PathBuf,
        /// Locked for the life of this process: tells a later run the directory is in use.
        _owner: std::fs::File,
    },
    External(tokio_postgres::Config),
}

// Statics are never dropped, so the server is stopped and its directory removed by an
// exit hook: without it every test process left a cluster of some 200 MB under /tmp.
static SERVER: OnceLock<Server> = OnceLock::new();

const SERVER_DIR_PREFIX: &str = "botflow-testpg-";
const OWNER_LOCK: &str = "owner.lock";

fn server() -> &'static Server {
    SERVER.get_or_init(|| match std::env::var("BOTFLOW_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Server::External(url.parse().expect("BOTFLOW_TEST_DATABASE_URL is a PostgreSQL URL")),
        _ => {
            remove_abandoned_server_dirs();
            let dir = std::env::temp_dir().join(format!("{SERVER_DIR_PREFIX}{}", Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            let owner = std::fs::File::create(dir.join(OWNER_LOCK)).unwrap();
            assert_eq!(flock(&owner, libc::LOCK_EX), 0, "lock {}", dir.display());
            let pg = EmbeddedPostgres::start(&dir, &EmbeddedOptions { fast_unsafe: true, ..Default::default() })
                .expect("start the embedded PostgreSQL for tests");
            let admin = pg.config("postgres");
            // SAFETY: registers a plain `extern "C"` function; it runs once, at exit.
            unsafe { libc::atexit(stop_server_at_exit) };
            Server::Embedded { pg: Mutex::new(Some(pg)), admin, dir, _owner: owner }
        }
    })
}

fn flock(file: &std::fs::File, operation: libc::c_int) -> libc::c_int {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor this file owns.
    unsafe { libc::flock(file.as_raw_fd(), operation) }
}

extern "C" fn stop_server_at_exit() {
    // A panic must not cross into C (it would abort a run that passed).
    let _ = std::panic::catch_unwind(|| {
        if let Some(Server::Embedded { pg, dir, .. }) = SERVER.get() {
            if let Some(mut pg) = pg.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = pg.stop(); // fast shutdown, then the directory can go
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    });
}

/// Removes the directories of test servers whose process is gone (killed by a signal or
/// a timeout, it never ran its exit hook): their owner lock is free.
fn remove_abandoned_server_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        if !entry.file_name().to_str().is_some_and(|n| n.starts_with(SERVER_DIR_PREFIX)) {
            continue;
        }
        let abandoned = match std::fs::File::open(entry.path().join(OWNER_LOCK)) {
            Ok(lock) => flock(&lock, libc::LOCK_EX | libc::LOCK_NB) == 0,
            // No lock file: being created this moment, or left by an older layout.
            Err(_) => entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(600))),
        };
        if abandoned {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn admin_config() -> tokio_postgres::Config {
    match server() {
        Server::Embedded { admin, .. } => admin.clone(),
        Server::External(c) => c.clone(),
    }
}

/// A new, empty database on the test server; returns its connection settings.
pub async fn fresh_database() -> tokio_postgres::Config {
    let name = format!("t_{}", Uuid::new_v4().simple());
    let admin = admin_config();
    let (client, conn) = admin.connect(tokio_postgres::NoTls).await.expect("connect to the test server");
    let task = tokio::spawn(conn);
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create a test database");
    drop(client);
    let _ = task.await;
    let mut cfg = admin;
    cfg.dbname(&name);
    cfg
}

/// Options for one daemon under test.
pub struct DaemonOptions {
    pub pg: Option<tokio_postgres::Config>,
    pub tweak: Box<dyn FnOnce(&mut Config)>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions { pg: None, tweak: Box::new(|_| {}) }
    }
}

pub struct TestDaemon {
    pub app: Option<RunningApp>,
    pub store: Store,
    pub pg: tokio_postgres::Config,
    pub dir: TempDir,
    pub config: Config,
}

impl TestDaemon {
    pub async fn start() -> TestDaemon {
        Self::start_with(DaemonOptions::default()).await
    }

    pub async fn start_with(opts: DaemonOptions) -> TestDaemon {
        let pg = match opts.pg {
            Some(pg) => pg,
            None => fresh_database().await,
        };
        let dir = TempDir::new("daemon");
        let mut config = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
        config.ingest.tcp = "127.0.0.1:0".into();
        config.ingest.unix_socket = dir.path().join("botflow.sock").to_string_lossy().into_owned();
        config.metrics.listen = "127.0.0.1:0".into();
        config.admin.listen = "127.0.0.1:0".into();
        config.ingest.workers = 2;
        config.shutdown_timeout_seconds = 10;
        // Tests send bursts far over the production defaults; the limits have tests
        // of their own.
        config.limits.events_per_second = 1_000_000;
        config.limits.burst = 1_000_000;
        config.limits.executions_per_second = 1_000_000;
        // The receivers of the tests listen on loopback, which the egress policy
        // refuses by default (tests/egress.rs tests the policy itself).
        config.egress.allow = vec![LOOPBACK_RECEIVERS.into()];
        (opts.tweak)(&mut config);
        init_logs();
        let app = App::start(&config, pg.clone()).await.expect("the daemon starts");
        let store = app.store.clone();
        TestDaemon { app: Some(app), store, pg, dir, config }
    }

    pub fn app(&self) -> &RunningApp {
        self.app.as_ref().expect("running")
    }

    pub fn tcp(&self) -> std::net::SocketAddr {
        self.app().tcp_addr.expect("tcp listener")
    }

    pub fn unix(&self) -> PathBuf {
        self.app().unix_path.clone().expect("unix listener")
    }

    pub async fn shutdown(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
    }

    /// The admin API's base URL.
    pub fn admin(&self) -> String {
        format!("http://{}", self.app().admin_addr.expect("admin listener"))
    }

    /// The text of GET /metrics.
    pub async fn metrics(&self) -> String {
        let addr = self.app().metrics_addr.expect("metrics listener");
        reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap()
    }

    /// A client with its own connection to the test database.
    pub async fn db(&self) -> tokio_postgres::Client {
        let (client, conn) = self.pg.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }
}

/// The value of a metric line (`name{labels} value`), summed over matching series.
pub fn metric(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && (l.len() == name.len() || matches!(l.as_bytes()[name.len()], b'{' | b' ')))
        .filter(|l| label.is_none_or(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// An account with an ingest key and chatbots.
pub struct Tenant {
    pub account: Uuid,
    pub key: String,
    pub chatbots: Vec<Uuid>,
}

pub async fn tenant(store: &Store, name: &str, chatbots: usize) -> Tenant {
    let account = accounts::create_account(store, name).await.unwrap();
    let key = accounts::create_key(store, account, accounts::Role::Ingest).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..chatbots {
        ids.push(accounts::create_chatbot(store, account, &format!("{name}-bot-{i}")).await.unwrap());
    }
    Tenant { account, key, chatbots: ids }
}

/// Applies workflows given as JSON values to a chatbot; returns their ids.
pub async fn apply(store: &Store, chatbot: Uuid, workflows: Value) -> Vec<Uuid> {
    let bytes = serde_json::to_vec(&workflows).unwrap();
    let specs = botflow::workflow::parse_workflows(&bytes).expect("valid workflows");
    botflow::store::workflows::apply(store, chatbot, &specs).await.unwrap().iter().map(|a| a.id()).collect()
}

/// A protocol client: writes lines, reads JSON lines with a deadline.
pub struct Client {
    pub reader: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    pub writer: Box<dyn AsyncWrite + Unpin + Send>,
    /// Lines read while looking for another one, handed out first by `recv`.
    stash: std::collections::VecDeque<Value>,
}

impl Client {
    pub async fn tcp(addr: std::net::SocketAddr) -> Client {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        Client { reader: BufReader::new(Box::new(r)), writer: Box::new(w), stash: Default::default() }
    }

    /// Over TLS, trusting the certificates of `ca_file`; panics if the handshake fails.
    pub async fn tls(addr: std::net::SocketAddr, ca_file: &std::path::Path) -> Client {
        Self::try_tls(addr, ca_file).await.unwrap_or_else(|e| panic!("TLS handshake: {e}"))
    }

    pub async fn try_tls(addr: std::net::SocketAddr, ca_file: &std::path::Path) -> std::io::Result<Client> {
        let connector = botflow::tls::connector(Some(ca_file)).unwrap();
        let s = tokio::net::TcpStream::connect(addr).await?;
        let name = botflow::tls::server_name(&addr.to_string()).unwrap();
        let (r, w) = tokio::io::split(connector.connect(name, s).await?);
        Ok(Client { reader: BufReader::new(Box::new(r)), writer: Box::new(w), stash: Default::default() })
    }

    pub async fn unix(path: &std::path::Path) -> Client {
        let s = tokio::net::UnixStream::connect(path).await.unwrap();
        let (r, w) = s.into_split();
        Client { reader: BufReader::new(Box::new(r)), writer: Box::new(w), stash: Default::default() }
    }

    /// Connects and says hello; panics unless welcomed.
    pub async fn hello(mut self, token: &str, subscribe: &[Uuid]) -> Client {
        self.send(&serde_json::json!({"op":"hello","version":1,"token":token,"client":"test","subscribe":subscribe}))
            .await;
        let w = self.recv().await;
        assert_eq!(w["op"], "welcome", "expected a welcome, got {w}");
        self
    }

    pub async fn send(&mut self, v: &Value) {
        self.send_raw(&format!("{v}\n")).await;
    }

    pub async fn send_raw(&mut self, s: &str) {
        self.writer.write_all(s.as_bytes()).await.unwrap();
    }

    /// The next line as JSON.
    pub async fn recv(&mut self) -> Value {
        self.try_recv(DEADLINE).await.expect("a line from the daemon before the deadline")
    }

    /// The next line, or `None` at the deadline. Panics if the connection closed.
    pub async fn try_recv(&mut self, within: Duration) -> Option<Value> {
        if let Some(v) = self.stash.pop_front() {
            return Some(v);
        }
        let mut line = String::new();
        match tokio::time::timeout(within, self.reader.read_line(&mut line)).await {
            Err(_) => None,
            Ok(Ok(0)) => panic!("the daemon closed the connection"),
            Ok(Ok(_)) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))),
            Ok(Err(e)) => panic!("read failed: {e}"),
        }
    }

    /// Waits for the daemon to close the connection, returning the lines before it.
    pub async fn until_closed(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut buf = String::new();
        loop {
            buf.clear();
            match tokio::time::timeout(DEADLINE, self.reader.read_line(&mut buf)).await {
                Err(_) => panic!("the daemon did not close the connection; got {out:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return out,
                Ok(Ok(_)) => out.push(serde_json::from_str(&buf).unwrap()),
            }
        }
    }

    /// Reads until a line matches and returns it; the lines passed over stay queued
    /// for later `recv`s (a copy is returned too).
    pub async fn recv_until(&mut self, pred: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
        if let Some(i) = self.stash.iter().position(&pred) {
            let v = self.stash.remove(i).unwrap();
            return (v, Vec::new());
        }
        let mut skipped = Vec::new();
        loop {
            let mut line = String::new();
            match tokio::time::timeout(DEADLINE, self.reader.read_line(&mut line)).await {
                Err(_) => panic!("no matching line before the deadline; passed over {skipped:?}"),
                Ok(Ok(0)) => panic!("the daemon closed the connection; passed over {skipped:?}"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("read failed: {e}"),
            }
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            if pred(&v) {
                self.stash.extend(skipped.iter().cloned());
                return (v, skipped);
            }
            skipped.push(v);
        }
    }

    /// Reads the answers (ack or nack) for `n` events, keyed by event id; other lines go to `others`.
    pub async fn answers(&mut self, n: usize) -> (std::collections::HashMap<String, Value>, Vec<Value>) {
        let mut map = std::collections::HashMap::new();
        let mut others = Vec::new();
        while map.len() < n {
            let v = self.recv().await;
            match v["op"].as_str() {
                Some("ack") | Some("nack") => {
                    map.insert(v["id"].as_str().unwrap_or_default().to_string(), v);
                }
                _ => others.push(v),
            }
        }
        // Other lines (commands) stay readable.
        self.stash.extend(others.iter().cloned());
        (map, others)
    }

    pub async fn close_write(&mut self) {
        let _ = self.writer.shutdown().await;
    }

    pub async fn read_to_end_raw(&mut self) -> String {
        let mut s = String::new();
        let _ = tokio::time::timeout(DEADLINE, self.reader.read_to_string(&mut s)).await;
        s
    }
}

pub fn event(id: &str, chatbot: Uuid, kind: &str, data: Value) -> Value {
    serde_json::json!({
        "op": "event", "id": id, "chatbot_id": chatbot, "type": kind,
        "conversation_id": "conv-1", "occurred_at": "2026-11-25T10:00:00Z", "data": data,
    })
}

/// One request seen by the receiver.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// When the answer was written (or the connection found closed).
    pub done: Arc<Mutex<Option<Instant>>>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// What the receiver answers.
#[derive(Clone)]
pub enum Behaviour {
    Status(u16, String),
    /// Never answers (the connection stays open).
    Hang,
    /// One answer per request, in order; the last one repeats.
    Script(Vec<Reply>),
}

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
    /// Wait this long before answering.
    pub delay: Duration,
}

impl Reply {
    pub fn new(status: u16, body: &str) -> Reply {
        Reply { status, body: body.into(), headers: Vec::new(), delay: Duration::ZERO }
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn after(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

/// A small HTTP/1.1 server standing in for webhook receivers: records every request
/// and answers as told (per path prefix, default 200 `{"ok":true}`).
#[derive(Clone)]
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    pub requests: Arc<Mutex<Vec<Received>>>,
    behaviour: Arc<Mutex<Vec<(String, Behaviour)>>>,
}

impl Receiver {
    /// Starts on a thread of its own, so it keeps answering while a test blocks its
    /// own runtime (waiting for a child process, say).
    pub async fn start() -> Receiver {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let r = Receiver {
            addr: std_listener.local_addr().unwrap(),
            requests: Arc::default(),
            behaviour: Arc::default(),
        };
        let me = r.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    let Ok((s, _)) = listener.accept().await else { return };
                    let me = me.clone();
                    tokio::spawn(async move { me.serve(s).await });
                }
            });
        });
        r
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn on(&self, prefix: &str, b: Behaviour) {
        self.behaviour.lock().unwrap().insert(0, (prefix.to_string(), b));
    }

    pub fn received(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.requests.lock().unwrap().iter().filter(|r| r.path.starts_with(prefix)).count()
    }

    /// Whether the number of requests to `prefix` stays at `n` for `period` (for
    /// checking that something does not happen again).
    pub async fn stays_at(&self, prefix: &str, n: usize, period: Duration) -> bool {
        let until = Instant::now() + period;
        while Instant::now() < until {
            if self.count(prefix) != n {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.count(prefix) == n
    }

    pub async fn wait_for(&self, prefix: &str, n: usize) -> Vec<Received> {
        let me = self.clone();
        let p = prefix.to_string();
        eventually(&format!("{n} requests to {prefix}"), move || {
            let me = me.clone();
            let p = p.clone();
            async move { me.count(&p) >= n }
        })
        .await;
        self.received().into_iter().filter(|r| r.path.starts_with(prefix)).collect()
    }

    async fn serve(&self, s: tokio::net::TcpStream) {
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        loop {
            let Some((path, headers, body)) = read_http_request(&mut r).await else { return };
            let behaviour = self
                .behaviour
                .lock()
                .unwrap()
                .iter()
                .find(|(p, _)| path.starts_with(p.as_str()))
                .map(|(_, b)| b.clone())
                .unwrap_or(Behaviour::Status(200, r#"{"ok":true}"#.into()));
            let done = Arc::new(Mutex::new(None));
            let nth = {
                let mut reqs = self.requests.lock().unwrap();
                let nth = reqs.iter().filter(|r| r.path == path).count();
                reqs.push(Received { path, headers, body, at: Instant::now(), done: done.clone() });
                nth
            };
            let reply = match behaviour {
                Behaviour::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                Behaviour::Status(code, body) => Reply::new(code, &body),
                Behaviour::Script(replies) => replies[nth.min(replies.len() - 1)].clone(),
            };
            tokio::time::sleep(reply.delay).await;
            let mut resp = format!("HTTP/1.1 {} X\r\ncontent-type: application/json\r\n", reply.status);
            for (k, v) in &reply.headers {
                resp.push_str(&format!("{k}: {v}\r\n"));
            }
            resp.push_str(&format!("content-length: {}\r\n\r\n{}", reply.body.len(), reply.body));
            let written = w.write_all(resp.as_bytes()).await;
            *done.lock().unwrap() = Some(Instant::now());
            if written.is_err() {
                return;
            }
        }
    }
}

/// Reads one HTTP/1.1 request: (path, headers, body of its Content-Length); `None`
/// once the peer has closed.
pub async fn read_http_request<R>(r: &mut R) -> Option<(String, Vec<(String, String)>, Vec<u8>)>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut request_line = String::new();
    if r.read_line(&mut request_line).await.unwrap_or(0) == 0 {
        return None;
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.ok()?;
    Some((path, headers, body))
}

/// A libpq key/value string for a tokio-postgres config (what BOTFLOW_DATABASE__URL takes).
pub fn pg_url(c: &tokio_postgres::Config) -> String {
    let host = match &c.get_hosts()[0] {
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
    };
    format!(
        "host={host} port={} user={} dbname={}",
        c.get_ports().first().copied().unwrap_or(5432),
        c.get_user().unwrap_or("postgres"),
        c.get_dbname().unwrap_or("postgres")
    )
}

/// What the daemons under test allow of the egress policy: the test receivers.
pub const LOOPBACK_RECEIVERS: &str = "127.0.0.1/32";

/// The `botflow` binary, with no BOTFLOW_* from the environment of whoever runs the
/// tests, and loopback receivers allowed (as `TestDaemon` does).
pub fn botflow_cmd() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_botflow"));
    for (k, _) in std::env::vars() {
        if k.starts_with("BOTFLOW_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "warn");
    c.env("BOTFLOW_EGRESS__ALLOW", format!("[{LOOPBACK_RECEIVERS:?}]"));
    c
}

/// A running `botflow serve`, killed on drop if the test did not stop it.
pub struct Serve {
    pub child: std::process::Child,
}

impl Serve {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait for botflow serve")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `botflow serve` in `dir`, listening only on `dir/botflow.sock` (no TCP, admin or
/// metrics port), rate limits out of the way, with `env` overrides and its log to
/// `stderr`. Returns once the socket answers: a socket file left by a killed daemon
/// refuses connections until the new one binds.
pub fn serve_socket_only(dir: &std::path::Path, env: &[(&str, String)], stderr: std::process::Stdio) -> Serve {
    let mut c = botflow_cmd();
    c.arg("serve")
        .current_dir(dir)
        .env("BOTFLOW_DATA_DIR", dir.join("var"))
        .env("BOTFLOW_INGEST__UNIX_SOCKET", dir.join("botflow.sock"))
        .env("BOTFLOW_INGEST__TCP", "")
        .env("BOTFLOW_METRICS__LISTEN", "")
        .env("BOTFLOW_ADMIN__LISTEN", "")
        .env("BOTFLOW_SCHEDULER__SCAN_INTERVAL_MS", "200")
        .env("BOTFLOW_LIMITS__EVENTS_PER_SECOND", "1000000")
        .env("BOTFLOW_LIMITS__BURST", "1000000")
        .env("BOTFLOW_LIMITS__EXECUTIONS_PER_SECOND", "1000000")
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    for (k, v) in env {
        c.env(k, v);
    }
    let daemon = Serve { child: c.spawn().expect("start botflow serve") };
    let sock = dir.join("botflow.sock");
    wait_until("the daemon's socket", || std::os::unix::net::UnixStream::connect(&sock).is_ok());
    daemon
}

/// The database of the embedded server a `botflow serve` started under `dir/var`, for
/// checking rows.
pub async fn embedded_db(dir: &std::path::Path) -> tokio_postgres::Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host_path(dir.join("var/postgres/run").canonicalize().unwrap()).port(5432).user("botflow").dbname("botflow");
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Polls a blocking condition with a deadline.
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
