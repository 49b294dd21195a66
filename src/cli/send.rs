//! `botflow send`: a small client of the wire protocol. It says hello, streams the
//! NDJSON events of a file or stdin (keeping within the daemon's in-flight window),
//! prints every line the daemon answers, acks the commands it receives, and exits
//! non-zero if any event was nacked or the daemon reported an error.

use anyhow::{bail, Context};
use clap::Args;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

#[derive(Args, Debug)]
pub struct SendArgs {
    /// The daemon's Unix socket [default: ingest.unix_socket of the configuration]
    #[arg(long, value_name = "PATH", conflicts_with = "tcp")]
    pub socket: Option<PathBuf>,
    /// The daemon's TCP address
    #[arg(long, value_name = "HOST:PORT")]
    pub tcp: Option<String>,
    /// An ingest (or operator) key
    #[arg(long, env = "BOTFLOW_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Receive the commands (replies, tags, handoffs) of this chatbot; repeatable
    #[arg(long, value_name = "CHATBOT_ID")]
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
        let input: Box<dyn AsyncRead + Unpin> = if args.file.as_os_str() == "-" {
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

/// Adds `"op":"event"` to an event object that has no `op`.
fn as_event_line(line: &str) -> Result<(String, Option<String>), String> {
    let mut v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object_mut().ok_or("not a JSON object")?;
    let op = obj.entry("op").or_insert_with(|| "event".into()).clone();
    let id = obj.get("id").and_then(|i| i.as_str()).map(str::to_string);
    if op == "event" && id.is_none() {
        return Err("an event needs a string \"id\"".into());
    }
    Ok((v.to_string(), if op == "event" { id } else { None }))
}

async fn session<R, W>(r: R, mut w: W, input: Box<dyn AsyncRead + Unpin>, args: &SendArgs) -> anyhow::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
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
    println!("{welcome}");
    let welcome: serde_json::Value = serde_json::from_str(&welcome).context("the daemon's answer is not JSON")?;
    if welcome["op"] != "welcome" {
        bail!("the daemon refused the connection: {}", welcome["error"]["message"].as_str().unwrap_or("no reason given"));
    }
    let window = welcome["max_in_flight"].as_u64().unwrap_or(64).max(1) as usize;

    let mut lines = BufReader::new(input).lines();
    let mut outstanding: HashSet<String> = HashSet::new();
    let mut input_done = false;
    let mut ok = true;
    let (mut sent, mut acked, mut nacked) = (0u64, 0u64, 0u64);
    let linger = Duration::from_millis(args.linger_ms.unwrap_or(if args.subscribe.is_empty() { 0 } else { 2000 }));
    loop {
        if input_done && outstanding.is_empty() {
            break;
        }
        tokio::select! {
            line = lines.next_line(), if !input_done && outstanding.len() < window => {
                match line? {
                    None => input_done = true,
                    Some(l) if l.trim().is_empty() => {}
                    Some(l) => match as_event_line(&l) {
                        Ok((frame, id)) => {
                            w.write_all(frame.as_bytes()).await?;
                            w.write_all(b"\n").await?;
                            if let Some(id) = id {
                                outstanding.insert(id);
                                sent += 1;
                            }
                        }
                        Err(e) => {
                            eprintln!("skipping input line: {e}: {l}");
                            ok = false;
                        }
                    },
                }
            }
            answer = daemon.next_line() => {
                let Some(answer) = answer? else {
                    eprintln!("the daemon closed the connection with {} events unanswered", outstanding.len());
                    return Ok(false);
                };
                ok &= handle_answer(&answer, &mut w, &mut outstanding, &mut acked, &mut nacked).await?;
            }
        }
    }
    // Commands may follow the acks (replies run after the commit).
    let until = tokio::time::Instant::now() + linger;
    while let Ok(answer) = tokio::time::timeout_at(until, daemon.next_line()).await {
        let Some(answer) = answer? else { break };
        ok &= handle_answer(&answer, &mut w, &mut outstanding, &mut acked, &mut nacked).await?;
    }
    let _ = w.shutdown().await;
    eprintln!("sent {sent} events: {acked} acked, {nacked} nacked");
    Ok(ok && nacked == 0)
}

/// Prints a daemon line and does what it asks; `false` for a nack or an error.
async fn handle_answer<W: AsyncWrite + Unpin>(
    answer: &str,
    w: &mut W,
    outstanding: &mut HashSet<String>,
    acked: &mut u64,
    nacked: &mut u64,
) -> anyhow::Result<bool> {
    println!("{answer}");
    let v: serde_json::Value = match serde_json::from_str(answer) {
        Ok(v) => v,
        Err(_) => return Ok(false),
    };
    match v["op"].as_str() {
        Some("ack") => {
            if let Some(id) = v["id"].as_str() {
                outstanding.remove(id);
            }
            *acked += 1;
            Ok(true)
        }
        Some("nack") => {
            if let Some(id) = v["id"].as_str() {
                outstanding.remove(id);
            }
            *nacked += 1;
            Ok(false)
        }
        Some("command") => {
            if let Some(id) = v["command_id"].as_str() {
                let ack = serde_json::json!({"op": "ack", "command_id": id});
                w.write_all(format!("{ack}\n").as_bytes()).await?;
            }
            Ok(true)
        }
        Some("error") => Ok(false),
        _ => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_get_an_op() {
        let (line, id) = as_event_line(r#"{"id":"e1","type":"x.a"}"#).unwrap();
        assert_eq!(id.as_deref(), Some("e1"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["op"], "event");
        assert!(as_event_line(r#"{"type":"x.a"}"#).is_err());
        assert!(as_event_line("nope").is_err());
        let (_, id) = as_event_line(r#"{"op":"ping"}"#).unwrap();
        assert_eq!(id, None);
    }
}
