//! LISTEN for changes made by any process on the database (the CLI, the admin API,
//! another daemon): workflow changes, limit changes and dead-letter replays by chatbot
//! id, and the commands other nodes wrote or had acked. Reconnects by itself; after a
//! (re)connect it reports `Resync`, because notifications sent while it was not
//! listening are lost (commands are then delivered on a reconnect or a retry).

use super::Store;
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The workflows of this chatbot changed.
    Workflows(Uuid),
    /// Executions of this chatbot were made due (a dead-letter replay).
    Wake(Uuid),
    /// The rate limits of this chatbot changed.
    Limits(Uuid),
    /// Another node (`node`) committed a pending command for `chatbot_id`.
    Command { node: Uuid, chatbot_id: Uuid, command_id: String },
    /// A client acked this command through some node, with a key of this account
    /// (`None`: an operator key). The node waiting for the ack checks the account.
    CommandAcked { command_id: String, account: Option<Uuid> },
    /// The listener was disconnected: anything may have changed.
    Resync,
}

/// The channel commands are announced on: `cmd <node> <chatbot id> <command id>` by
/// the journal when it commits a pending command, `ack <account id or *> <command id>`
/// by a node that heard a client ack a command it was not waiting for (the node that
/// waits may not have committed the command's row yet, so the ack travels either way).
pub const COMMANDS_CHANNEL: &str = "botflow_commands";

/// Reads a notification of `COMMANDS_CHANNEL`.
fn command_change(payload: &str) -> Option<Change> {
    let mut parts = payload.splitn(4, ' ');
    match parts.next()? {
        "cmd" => {
            let node = parts.next()?.parse().ok()?;
            let chatbot_id = parts.next()?.parse().ok()?;
            let command_id = parts.next().filter(|c| !c.is_empty())?.to_string();
            Some(Change::Command { node, chatbot_id, command_id })
        }
        "ack" => {
            let first = parts.next()?;
            let rest: Vec<&str> = parts.collect();
            let (account, command_id) = match first {
                "*" => (None, rest.join(" ")),
                // A command id always holds a ':' and an account id never does.
                id if !id.contains(':') => (Some(id.parse().ok()?), rest.join(" ")),
                // `ack <command id>`, from a node of an earlier version: it acked the row
                // after checking the account itself.
                _ => (None, std::iter::once(first).chain(rest).collect::<Vec<_>>().join(" ")),
            };
            (!command_id.is_empty()).then_some(Change::CommandAcked { command_id, account })
        }
        _ => None,
    }
}

/// Runs until `cancel`; sends changes on `tx`.
/// The channel dead-letter replays notify on; the payload is the chatbot id.
pub const WAKE_CHANNEL: &str = "botflow_wake";

pub async fn run(store: Store, tx: mpsc::UnboundedSender<Change>, cancel: CancellationToken) {
    loop {
        if cancel.is_cancelled() {
            return;
        }
        match store.connect().await {
            Ok((client, mut connection)) => {
                let (ntx, mut nrx) = mpsc::unbounded_channel();
                // The connection must be polled for the client to work at all; this
                // stream drives it and hands notifications over.
                let driver = tokio::spawn(async move {
                    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(msg) = messages.next().await {
                        match msg {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                if ntx.send((n.channel().to_string(), n.payload().to_string())).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(error) => {
                                tracing::warn!(%error, "change listener lost its database connection");
                                break;
                            }
                        }
                    }
                });
                let listen = format!(
                    "LISTEN {}; LISTEN {WAKE_CHANNEL}; LISTEN {COMMANDS_CHANNEL}; LISTEN {}",
                    super::workflows::WORKFLOWS_CHANNEL,
                    super::limits::LIMITS_CHANNEL
                );
                if let Err(error) = client.batch_execute(&listen).await {
                    tracing::warn!(%error, "cannot LISTEN for workflow changes");
                    driver.abort();
                } else {
                    // Changes made before LISTEN took effect (at start, or while
                    // disconnected) were not heard: reload everything once.
                    let _ = tx.send(Change::Resync);
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => { driver.abort(); return; }
                            payload = nrx.recv() => match payload {
                                Some((channel, p)) if channel == COMMANDS_CHANNEL => match command_change(&p) {
                                    Some(change) => { let _ = tx.send(change); }
                                    None => tracing::warn!(payload = %p, "ignoring a malformed command notification"),
                                },
                                Some((channel, p)) => match p.parse::<Uuid>() {
                                    Ok(id) => {
                                        let change = match channel.as_str() {
                                            WAKE_CHANNEL => Change::Wake(id),
                                            super::limits::LIMITS_CHANNEL => Change::Limits(id),
                                            _ => Change::Workflows(id),
                                        };
                                        let _ = tx.send(change);
                                    }
                                    Err(_) => tracing::warn!(payload = %p, "ignoring a malformed change notification"),
                                },
                                None => break,
                            }
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "change listener cannot connect; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_notifications_are_read_whole_and_bad_ones_refused() {
        let (node, bot) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(
            command_change(&format!("cmd {node} {bot} 3f2a:say hi")),
            Some(Change::Command { node, chatbot_id: bot, command_id: "3f2a:say hi".into() })
        );
        assert_eq!(
            command_change("ack * 3f2a:say hi"),
            Some(Change::CommandAcked { command_id: "3f2a:say hi".into(), account: None })
        );
        assert_eq!(
            command_change(&format!("ack {bot} 3f2a:x")),
            Some(Change::CommandAcked { command_id: "3f2a:x".into(), account: Some(bot) })
        );
        assert_eq!(
            command_change("ack 3f2a:x"),
            Some(Change::CommandAcked { command_id: "3f2a:x".into(), account: None }),
            "the form of earlier versions"
        );
        for bad in ["", "cmd", "ack", "ack ", "ack * ", "ack nope 3f2a:x", "cmd x y z", &format!("cmd {node} {bot}"), &format!("cmd {node} {bot} "), "nope 1"] {
            assert_eq!(command_change(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_journal_announces_commands_on_the_channel_listened_to() {
        assert!(crate::store::journal::WRITE_SQL.contains(&format!("pg_notify('{COMMANDS_CHANNEL}'")));
    }
}
