//! `botflow serve` under systemd's `Type=notify`: READY=1 comes once the listeners are
//! open, WATCHDOG=1 pings come while it runs when the unit asks for them, STOPPING=1
//! comes when it starts draining; the embedded PostgreSQL it starts does not speak on
//! the daemon's behalf. The test plays systemd: it reads the datagram socket that
//! `NOTIFY_SOCKET` names.

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The next notification, as its lines, within the deadline.
fn next(socket: &UnixDatagram, within: Duration) -> Option<Vec<String>> {
    socket.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).lines().map(String::from).collect())
}

#[test]
fn serve_tells_systemd_when_it_is_ready_alive_and_stopping() {
    let dir = TempDir::new("systemd");
    let notify_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    let sock = dir.path().join("botflow.sock");
    let mut c = botflow_cmd();
    c.arg("serve")
        .current_dir(dir.path())
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "400000")
        .env("BOTFLOW_DATA_DIR", dir.path().join("var"))
        .env("BOTFLOW_INGEST__UNIX_SOCKET", &sock)
        .env("BOTFLOW_INGEST__TCP", "")
        .env("BOTFLOW_METRICS__LISTEN", "")
        .env("BOTFLOW_ADMIN__LISTEN", "")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut daemon = Serve { child: c.spawn().unwrap() };

    // The first word is READY=1 (the embedded PostgreSQL, which could speak sd_notify
    // too, is not handed the socket), and by then chat services can connect.
    let start = Instant::now();
    let first = next(&socket, Duration::from_secs(60)).expect("READY=1 within a minute");
    assert!(first.iter().any(|l| l == "READY=1"), "{first:?}");
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok(), "READY=1 before the socket listens");
    assert!(first.iter().any(|l| l.starts_with("STATUS=")), "{first:?}");

    // Watchdog pings at half the interval systemd asked for.
    let mut pings = 0;
    while pings < 3 {
        let lines = next(&socket, Duration::from_secs(10)).expect("a watchdog ping");
        assert!(!lines.iter().any(|l| l == "READY=1"), "READY=1 twice: {lines:?}");
        if lines.iter().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!(start.elapsed() < Duration::from_secs(60));

    // SIGTERM: STOPPING=1 comes, then the daemon exits cleanly.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let mut stopping = false;
    while let Some(lines) = next(&socket, Duration::from_secs(30)) {
        if lines.iter().any(|l| l == "STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    let status = daemon.child.wait().unwrap();
    assert!(status.success(), "{status}");
}
