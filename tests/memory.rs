//! Memory under a flood of clients that never say who they are: many connections
//! each writing a long unfinished line before any hello. Alone in its test binary, so
//! the process's resident memory is the daemon's.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[actix_rt::test]
async fn unauthenticated_connections_writing_long_lines_are_closed_at_the_hello_limit_and_memory_stays_bounded() {
    let daemon = TestDaemon::start().await;
    let t = tenant(&daemon.store, "acme", 1).await;
    const FLOOD: usize = 400;
    const LINE: usize = 1_040_000; // under max_frame_bytes (1 MiB): a whole line fits it
    let before = rss();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let addr = daemon.tcp();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..FLOOD {
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let chunk = vec![b'x'; 64 * 1024];
            let mut written = 0;
            while written < LINE {
                match s.write_all(&chunk[..(LINE - written).min(chunk.len())]).await {
                    Ok(()) => written += chunk.len().min(LINE - written),
                    Err(_) => break, // closed by the daemon
                }
            }
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer)).await;
            String::from_utf8_lossy(&answer).to_string()
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    sampler.abort();
    let grew = peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(before);
    eprintln!("{FLOOD} connections x {LINE} bytes before hello: resident memory grew by {} MiB at most, in {:?}", grew >> 20, started.elapsed());
    // Each was told why, and closed, long before its handshake deadline (10 s).
    for a in &answers {
        let v: serde_json::Value = serde_json::from_str(a.lines().next().unwrap_or("")).unwrap_or_else(|_| panic!("no error line: {a:?}"));
        assert_eq!(v["error"]["code"], "frame_too_large", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("ingest.max_hello_bytes"), "{v}");
    }
    // 400 lines of a megabyte would be 400 MiB held; at most 16 KiB each may be.
    assert!(grew < 96 << 20, "resident memory grew by {} MiB", grew >> 20);
    // The daemon still serves a client that says hello.
    let mut c = Client::tcp(addr).await.hello(&t.key, &[]).await;
    c.send(&serde_json::json!({"op": "ping"})).await;
    assert_eq!(c.recv().await["op"], "pong");
}
