//! TLS: on the ingest TCP listener (the protocol over TLS, clients that do not speak
//! TLS or do not trust the certificate, silent clients, renewed certificates, and
//! `botflow send --tls`), and to an external PostgreSQL that requires it.

mod common;

use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

/// A CA and a certificate it signed for 127.0.0.1, as PEM files in `dir`.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    (params.self_signed(&key).unwrap(), key)
}

fn certs(dir: &Path) -> Certs {
    let (ca_cert, ca_key) = ca("botflow test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    let c = Certs { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
    std::fs::write(&c.ca, ca_cert.pem()).unwrap();
    std::fs::write(&c.cert, leaf.pem()).unwrap();
    std::fs::write(&c.key, key.serialize_pem()).unwrap();
    c
}

/// Certificates, a daemon with TLS on its TCP listener, and a chatbot with a workflow.
async fn setup(tag: &str) -> (TempDir, Certs, TestDaemon, Tenant, uuid::Uuid) {
    let dir = TempDir::new(tag);
    let c = certs(dir.path());
    let d = start(&c).await;
    let t = tenant(&d.store, "acme", 1).await;
    let bot = t.chatbots[0];
    apply(&d.store, bot, workflow()).await;
    (dir, c, d, t, bot)
}

async fn start(c: &Certs) -> TestDaemon {
    let (cert, key) = (c.cert.display().to_string(), c.key.display().to_string());
    TestDaemon::start_with(DaemonOptions {
        tweak: Box::new(move |cfg| {
            cfg.ingest.tls_cert_file = cert;
            cfg.ingest.tls_key_file = key;
            cfg.ingest.handshake_timeout_ms = 500;
        }),
        ..Default::default()
    })
    .await
}

fn workflow() -> serde_json::Value {
    json!({"name": "w", "trigger": {"event": "x.go"}, "steps": [{"id": "d", "action": "delay", "duration": "0s"}]})
}

async fn acked(c: &mut Client, id: &str, bot: uuid::Uuid) {
    c.send(&event(id, bot, "x.go", json!({}))).await;
    let (a, _) = c.recv_until(|v| v["id"] == id).await;
    assert_eq!(a["op"], "ack", "{a}");
    assert_eq!(a["executions"].as_array().map(Vec::len), Some(1), "{a}");
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse::<f64>().unwrap()))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[actix_rt::test]
async fn the_tls_listener_serves_the_protocol_and_refuses_plain_untrusting_and_silent_clients() {
    let (_dir, c, d, t, bot) = setup("tls").await;

    let mut good = Client::tls(d.tcp(), &c.ca).await.hello(&t.key, &[]).await;
    acked(&mut good, "e1", bot).await;

    // A client speaking plain lines is told, in a line it can read, and closed.
    let mut plain = Client::tcp(d.tcp()).await;
    plain.send(&json!({"op": "hello", "version": 1, "token": t.key, "client": "plain"})).await;
    let refused = plain.recv().await;
    assert_eq!(refused["error"]["code"], "tls_required", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("TLS"), "{refused}");
    let mut rest = String::new();
    assert_eq!(plain.reader.read_line(&mut rest).await.unwrap(), 0, "closed after the error: {rest:?}");

    // A client trusting another CA fails its handshake (and learns nothing more).
    let other = TempDir::new("tls-other");
    let (other_ca, _) = ca("someone else");
    std::fs::write(other.path().join("ca.pem"), other_ca.pem()).unwrap();
    let e = Client::try_tls(d.tcp(), &other.path().join("ca.pem")).await.err().expect("an untrusted certificate");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");

    // A client that connects and says nothing is closed after the handshake timeout.
    let mut silent = tokio::net::TcpStream::connect(d.tcp()).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, silent.read(&mut buf)).await.expect("closed before the deadline").unwrap_or(0);
    assert_eq!(n, 0);

    // None of it disturbed the TLS client, and each is counted.
    acked(&mut good, "e2", bot).await;
    let db = d.db().await;
    let n: i64 = db.query_one("SELECT count(*) FROM executions WHERE chatbot_id = $1", &[&bot]).await.unwrap().get(0);
    assert_eq!(n, 2);
    eventually("each refusal counted", || async {
        let m = d.metrics().await;
        ["plaintext", "handshake", "timeout"]
            .iter()
            .all(|r| metric(&m, &format!("botflow_tls_handshake_failures_total{{reason=\"{r}\"}}")) >= 1.0)
    })
    .await;
}

#[actix_rt::test]
async fn botflow_send_speaks_tls_and_explains_a_missing_tls_flag() {
    let (_dir, c, d, t, bot) = setup("tls-send").await;
    let input = format!("{}\n", event("s1", bot, "x.go", json!({})));
    // The daemon runs in this process: the client waits off its threads.
    let send = |extra: &[&str]| {
        let mut cmd = botflow_cmd();
        cmd.args(["send", "--token", &t.key, "--tcp", &d.tcp().to_string()]).args(extra).arg("-");
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let input = input.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut child = cmd.spawn().unwrap();
                use std::io::Write;
                child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
                child.wait_with_output().unwrap()
            })
            .await
            .unwrap()
        }
    };
    let ca = c.ca.display().to_string();
    let o = send(&["--tls", "--ca-file", &ca]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.lines().any(|l| l.contains("\"op\":\"ack\"") && l.contains("\"s1\"")), "{out}");

    let o = send(&[]).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("--tls"), "the refusal says what to do: {err}");

    // The public roots do not vouch for a test CA.
    let o = send(&["--tls"]).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("TLS handshake") && err.to_lowercase().contains("certificate"), "{err}");
}

#[actix_rt::test]
async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let (dir, c, d, t, bot) = setup("tls-renew").await;
    let mut before = Client::tls(d.tcp(), &c.ca).await.hello(&t.key, &[]).await;
    acked(&mut before, "e1", bot).await;
    let renewal_dir = dir.path().join("renewal");
    std::fs::create_dir_all(&renewal_dir).unwrap();
    let renewal = certs(&renewal_dir);

    // Half a renewal: the new certificate in place, its key not yet. The listener keeps
    // serving the old pair (each handshake below may be the one that looks).
    std::fs::copy(&renewal.cert, &c.cert).unwrap();
    eventually("the broken pair is seen and refused", || async {
        Client::tls(d.tcp(), &c.ca).await.hello(&t.key, &[]).await;
        metric(&d.metrics().await, "botflow_tls_cert_reloads_total{outcome=\"failed\"}") >= 1.0
    })
    .await;
    assert_eq!(metric(&d.metrics().await, "botflow_tls_cert_reload_failing"), 1.0);
    let logs = common::logs();
    assert!(logs.contains("the TLS certificate files changed but do not load; serving the previous certificate"), "{logs}");

    // The key follows: the new certificate is served.
    std::fs::copy(&renewal.key, &c.key).unwrap();
    eventually("the renewed certificate is served", || async { Client::try_tls(d.tcp(), &renewal.ca).await.is_ok() }).await;
    assert!(Client::try_tls(d.tcp(), &c.ca).await.is_err(), "the old certificate is no longer served");
    assert!(metric(&d.metrics().await, "botflow_tls_cert_reloads_total{outcome=\"loaded\"}") >= 1.0);
    assert_eq!(metric(&d.metrics().await, "botflow_tls_cert_reload_failing"), 0.0);
    let mut after = Client::tls(d.tcp(), &renewal.ca).await.hello(&t.key, &[]).await;
    acked(&mut after, "e2", bot).await;
    // A connection made before the renewal goes on.
    acked(&mut before, "e3", bot).await;
}

/// A free TCP port on the loopback address (for a server started next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The password of the `botflow` role for connections over TCP.
const PASSWORD: &str = "tls-test-secret";

/// A private PostgreSQL on 127.0.0.1:`port` that speaks TLS with `c`'s certificate:
/// with TLS a password is asked (SCRAM, so channel binding can be required), without
/// TLS none (so a connection left in plain text is seen, not refused).
fn postgres_with_tls(dir: &Path, port: u16, c: &Certs) -> botflow::postgres::EmbeddedPostgres {
    use botflow::postgres::{EmbeddedOptions, EmbeddedPostgres};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let opts = EmbeddedOptions { fast_unsafe: true, port: Some(port), ..Default::default() };
    // The first start creates the cluster and sets the password; the server's files
    // go in beside its data.
    let mut first = EmbeddedPostgres::start(dir, &opts).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, conn) = first.config("postgres").connect(tokio_postgres::NoTls).await.unwrap();
        let task = tokio::spawn(conn);
        client.batch_execute(&format!("ALTER ROLE botflow PASSWORD '{PASSWORD}'")).await.unwrap();
        drop(client);
        let _ = task.await;
    });
    first.stop().unwrap();
    let pgdata = dir.join("postgres").join("data");
    let owner = std::fs::metadata(&pgdata).unwrap();
    for (from, to) in [(&c.cert, "server.crt"), (&c.key, "server.key")] {
        let to = pgdata.join(to);
        std::fs::copy(from, &to).unwrap();
        std::os::unix::fs::chown(&to, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let hba = pgdata.join("pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).unwrap();
    let ours = "hostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 127.0.0.1/32 trust\n";
    std::fs::write(&hba, format!("{ours}{rest}")).unwrap();
    let settings = [("listen_addresses", "127.0.0.1"), ("ssl", "on"), ("password_encryption", "scram-sha-256")];
    let opts = EmbeddedOptions { settings: settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..opts };
    EmbeddedPostgres::start(dir, &opts).unwrap()
}

#[actix_rt::test]
async fn the_daemon_reaches_postgresql_over_tls_and_checks_its_certificate() {
    use tokio_postgres::config::{ChannelBinding, SslMode};
    let dir = TempDir::new("pg-tls");
    let cert_dir = dir.path().join("certs");
    std::fs::create_dir_all(&cert_dir).unwrap();
    let c = certs(&cert_dir);
    let port = free_port();
    let server_dir = dir.path().join("server");
    let _server = {
        let (server_dir, c) = (server_dir.clone(), Certs { ca: c.ca.clone(), cert: c.cert.clone(), key: c.key.clone() });
        tokio::task::spawn_blocking(move || postgres_with_tls(&server_dir, port, &c)).await.unwrap()
    };
    let over_tcp = |dbname: &str, mode: SslMode| {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1").port(port).user("botflow").password(PASSWORD).dbname(dbname).ssl_mode(mode);
        cfg.channel_binding(ChannelBinding::Require);
        cfg
    };
    let store = |cfg: tokio_postgres::Config, ca: Option<&Path>| botflow::store::Store::new(cfg, 2, std::time::Duration::from_secs(5), ca).unwrap();
    let uses_tls = |s: botflow::store::Store| async move {
        let client = s.pool().get().await.map_err(|e| botflow::store::error::chain(&e))?;
        let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap();
        Ok::<bool, String>(row.get(0))
    };

    // sslmode=require with the server's CA: TLS, and a SCRAM login bound to the channel.
    assert_eq!(uses_tls(store(over_tcp("postgres", SslMode::Require), Some(&c.ca))).await, Ok(true));
    // The default (prefer) without a CA file stays plain, as before TLS was supported.
    let mut plain = over_tcp("postgres", SslMode::Prefer);
    plain.channel_binding(ChannelBinding::Disable);
    assert_eq!(uses_tls(store(plain, None)).await, Ok(false));
    // With a CA file, prefer uses TLS.
    assert_eq!(uses_tls(store(over_tcp("postgres", SslMode::Prefer), Some(&c.ca))).await, Ok(true));
    // A certificate the CA file (or the public roots) does not vouch for is refused,
    // and the error says why.
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, ca("someone else").0.pem()).unwrap();
    for ca_file in [Some(other.as_path()), None] {
        let e = uses_tls(store(over_tcp("postgres", SslMode::Require), ca_file)).await.unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{ca_file:?}: {e}");
    }

    // The daemon itself, with the default sslmode and a CA file: every one of its
    // connections over TLS (one left without would log in plain text).
    let admin = store(over_tcp("postgres", SslMode::Require), Some(&c.ca));
    admin.pool().get().await.unwrap().batch_execute("CREATE DATABASE botflow_tls").await.unwrap();
    let ca_file = c.ca.to_string_lossy().into_owned();
    let d = TestDaemon::start_with(DaemonOptions {
        pg: Some(over_tcp("botflow_tls", SslMode::Prefer)),
        tweak: Box::new(move |cfg| cfg.database.tls_ca_file = ca_file),
    })
    .await;
    let t = tenant(&d.store, "acme", 1).await;
    apply(&d.store, t.chatbots[0], workflow()).await;
    let mut client = Client::tcp(d.tcp()).await.hello(&t.key, &[]).await;
    acked(&mut client, "e1", t.chatbots[0]).await;
    let check = admin.pool().get().await.unwrap();
    let connections = || async {
        check
            .query(
                "SELECT a.query, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.datname = 'botflow_tls' AND a.pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1)))
            .collect::<Vec<_>>()
    };
    eventually("the change listener is connected", || async { connections().await.iter().any(|(q, _)| q.starts_with("LISTEN")) }).await;
    let all = connections().await;
    assert!(all.len() >= 3, "the pool, a journal lane and the listener: {all:?}");
    assert!(all.iter().all(|(_, ssl)| *ssl), "a connection of the daemon is in plain text: {all:?}");
}
