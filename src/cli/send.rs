//! `botflow send`: a small client of the wire protocol. It says hello, streams the
//! NDJSON events of a file or stdin (keeping within the daemon's in-flight window),
//! prints every line the daemon answers, acks the commands it receives, and exits
//! non-zero if any event was nacked or the daemon reported an error.

use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

#[derive(Args, Debug)]
pub struct SendArgs {
    /// The daemon's Unix socket [default: ingest.unix_socket of the configuration]
    #[arg(long, value_name = "PATH", conflicts_with = "tcp")]
    pub socket: Option<PathBuf>,
    /// The daemon's TCP address
    #[arg(long, value_name = "HOST:PORT")]
    pub tcp: Option<String>,
    /// Speak TLS over --tcp (the listener has ingest.tls_cert_file set); the
    /// certificate is checked against the host of --tcp
    #[arg(long, requires = "tcp")]
    pub tls: bool,
    /// PEM certificates to trust for --tls [default: the public web roots]
    #[arg(long, value_name = "PATH", requires = "tls")]
    pub ca_file: Option<PathBuf>,
    /// An ingest (or operator) key
    #[arg(long, env = "BOTFLOW_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Receive the commands (replies, tags, handoffs) of this chatbot; repeatable
    #[arg(long, value_parser = crate::cli::id_arg, value_name = "CHATBOT_ID")]
    pub subscribe: Vec<uuid::Uuid>,
    /// After the last answer, keep printing commands this long [default: 2000 with --subscribe, else 0]
    #[arg(long, value_name = "MS")]
    pub linger_ms: Option<u64>,
    /// Name reported to the daemon
    #[arg(long, default_value = "botflow-send")]
    pub client: String,
    /// NDJSON events, one per line, or - for stdin
    #[arg(default_value = "-")]
    pub file: PathBuf,
}

pub fn run(config: crate::config::Config, args: SendArgs) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let input: Box<dyn AsyncRead + Unpin + Send> = if args.file.as_os_str() == "-" {
            Box::new(tokio::io::stdin())
        } else {
            Box::new(
                tokio::fs::File::open(&args.file)
                    .await
                    .with_context(|| format!("cannot open {}", args.file.display()))?,
            )
        };
        if let Some(addr) = &args.tcp {
            let s = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
            s.set_nodelay(true)?;
            if args.tls {
                let connector = crate::tls::connector(args.ca_file.as_deref())?;
                let name = crate::tls::server_name(addr).map_err(anyhow::Error::msg)?;
                let s = connector.connect(name, s).await.map_err(|e| {
                    // openssl's `req -x509` marks a self-signed certificate as a CA,
                    // which TLS libraries refuse as a server's own certificate.
                    let hint = if e.to_string().contains("CaUsedAsEndEntity") {
                        " (the server's certificate is marked as a CA; a self-signed one needs basicConstraints=critical,CA:FALSE)"
                    } else {
                        ""
                    };
                    anyhow::anyhow!("TLS handshake with {addr} failed: {e}{hint}")
                })?;
                let (r, w) = tokio::io::split(s);
                return session(r, w, input, &args).await;
            }
            let (r, w) = s.into_split();
            session(r, w, input, &args).await
        } else {
            let path = match &args.socket {
                Some(p) => p.clone(),
                None => config.unix_socket_path().context("no --socket or --tcp given and ingest.unix_socket is empty")?,
            };
            let s = tokio::net::UnixStream::connect(&path)
                .await
                .with_context(|| format!("cannot connect to {} (is `botflow serve` running?)", path.display()))?;
            let (r, w) = s.into_split();
            session(r, w, input, &args).await
        }
    })
}

/// Adds `"op":"event"` to an event object that has no `op`, and checks what the daemon
/// would refuse without naming the event (so every event sent gets an answer naming
/// it): the id, and the line length. Returns the line and whether it is an event.
fn as_event_line(line: &str, max_frame_bytes: usize) -> Result<(String, bool), String> {
    let mut v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object_mut().ok_or("not a JSON object")?;
    let op = obj.entry("op").or_insert_with(|| "event".into()).clone();
    let is_event = op == "event";
    if is_event {
        match obj.get("id").and_then(|i| i.as_str()) {
            None => return Err("an event needs a string \"id\"".into()),
            Some(id) if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) => {
                return Err("an event id must be 1 to 256 bytes without control characters".into())
            }
            Some(_) => {}
        }
    }
    let text = v.to_string();
    if text.len() > max_frame_bytes {
        return Err(format!("{} bytes, over the daemon's max_frame_bytes ({max_frame_bytes})", text.len()));
    }
    Ok((text, is_event))
}

async fn session<R, W>(r: R, mut w: W, input: Box<dyn AsyncRead + Unpin + Send>, args: &SendArgs) -> anyhow::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut daemon = BufReader::new(r).lines();
    let hello = serde_json::json!({
        "op": "hello", "version": 1, "token": args.token, "client": args.client, "subscribe": args.subscribe,
    });
    w.write_all(format!("{hello}\n").as_bytes()).await?;
    let welcome = match tokio::time::timeout(Duration::from_secs(30), daemon.next_line()).await {
        Ok(Ok(Some(l))) => l,
        Ok(Ok(None)) => bail!("the daemon closed the connection without answering the hello"),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => bail!("no answer to the hello within 30 s"),
    };
    print_line(&welcome);
    let welcome: serde_json::Value = serde_json::from_str(&welcome).context("the daemon's answer is not JSON")?;
    if welcome["op"] != "welcome" {
        bail!("the daemon refused the connection: {}", welcome["error"]["message"].as_str().unwrap_or("no reason given"));
    }
    let window = Arc::new(Semaphore::new(welcome["max_in_flight"].as_u64().unwrap_or(64).max(1) as usize));
    let max_frame = welcome["max_frame_bytes"].as_u64().unwrap_or(1 << 20) as usize;

    // The writer streams the input within the window and writes the command acks; this
    // task reads, so the daemon's answers never wait behind our writes.
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel::<String>();
    let sent = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let writer = {
        let (window, sent, skipped) = (window.clone(), sent.clone(), skipped.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(input).lines();
            let mut input_open = true;
            loop {
                tokio::select! {
                    ack = acks_rx.recv() => match ack {
                        Some(a) => w.write_all(a.as_bytes()).await?,
                        None => break,
                    },
                    permit = window.clone().acquire_owned(), if input_open => {
                        let Ok(permit) = permit else { break };
                        match lines.next_line().await? {
                            None => {
                                input_open = false;
                                let _ = done_tx.send(true);
                            }
                            Some(l) if l.trim().is_empty() => {}
                            Some(l) => match as_event_line(&l, max_frame) {
                                Ok((frame, is_event)) => {
                                    w.write_all(format!("{frame}\n").as_bytes()).await?;
                                    if is_event {
                                        permit.forget();
                                        sent.fetch_add(1, Ordering::SeqCst);
                                    }
                                }
                                Err(e) => {
                                    eprintln!("skipping input line: {e}: {l}");
                                    skipped.fetch_add(1, Ordering::SeqCst);
                                }
                            },
                        }
                    }
                }
            }
            let _ = w.shutdown().await;
            anyhow::Ok(())
        })
    };

    let mut ok = true;
    let (mut acked, mut nacked) = (0u64, 0u64);
    let linger = Duration::from_millis(args.linger_ms.unwrap_or(if args.subscribe.is_empty() { 0 } else { 2000 }));
    loop {
        if *done_rx.borrow() && acked + nacked == sent.load(Ordering::SeqCst) {
            break;
        }
        tokio::select! {
            _ = done_rx.changed() => {}
            answer = daemon.next_line() => {
                let Some(answer) = answer? else {
                    eprintln!("the daemon closed the connection with {} events unanswered", sent.load(Ordering::SeqCst) - acked - nacked);
                    return Ok(false);
                };
                ok &= handle_answer(&answer, &acks_tx, &window, &mut acked, &mut nacked);
            }
        }
    }
    // Commands may follow the acks (replies run after the commit).
    let until = tokio::time::Instant::now() + linger;
    while let Ok(answer) = tokio::time::timeout_at(until, daemon.next_line()).await {
        let Some(answer) = answer? else { break };
        ok &= handle_answer(&answer, &acks_tx, &window, &mut acked, &mut nacked);
    }
    drop(acks_tx);
    writer.await.context("the writer stopped")??;
    let skipped = skipped.load(Ordering::SeqCst);
    eprintln!("sent {} events: {acked} acked, {nacked} nacked; {skipped} input lines skipped", sent.load(Ordering::SeqCst));
    Ok(ok && nacked == 0 && skipped == 0)
}

/// Prints a line on stdout. A reader that left (`botflow send ... | head`) ends the
/// command quietly, as it ends other commands; `send` cannot take the default SIGPIPE
/// for that, which would also kill it when the daemon closes the socket.
fn print_line(line: &str) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
}

/// Prints a daemon line and does what it asks; `false` for a nack or an error.
fn handle_answer(
    answer: &str,
    acks: &mpsc::UnboundedSender<String>,
    window: &Semaphore,
    acked: &mut u64,
    nacked: &mut u64,
) -> bool {
    print_line(answer);
    let v: serde_json::Value = match serde_json::from_str(answer) {
        Ok(v) => v,
        Err(_) => return false,
    };
    match v["op"].as_str() {
        Some("ack") => {
            *acked += 1;
            window.add_permits(1);
            true
        }
        Some("nack") => {
            *nacked += 1;
            window.add_permits(1);
            false
        }
        Some("command") => {
            if let Some(id) = v["command_id"].as_str() {
                let _ = acks.send(format!("{}\n", serde_json::json!({"op": "ack", "command_id": id})));
            }
            true
        }
        Some("error") => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_get_an_op_and_are_checked() {
        let (line, is_event) = as_event_line(r#"{"id":"e1","type":"x.a"}"#, 1000).unwrap();
        assert!(is_event);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["op"], "event");
        assert!(as_event_line(r#"{"type":"x.a"}"#, 1000).is_err());
        assert!(as_event_line(r#"{"id":""}"#, 1000).is_err());
        assert!(as_event_line(r#"{"id":"a\nb"}"#, 1000).is_err());
        assert!(as_event_line(r#"{"id":"e1","data":"long"}"#, 10).is_err());
        assert!(as_event_line("nope", 1000).is_err());
        let (_, is_event) = as_event_line(r#"{"op":"ping"}"#, 1000).unwrap();
        assert!(!is_event);
    }
}
