//! LISTEN for changes made by any process on the database (the CLI, the admin API,
//! another daemon): workflow changes, limit changes and dead-letter replays by chatbot
//! id, key revocations and rotations by key id, deleted chatbots, and the commands other nodes wrote or
//! had acked. Reconnects by itself; after a
//! (re)connect it reports `Resync`, because notifications sent while it was not
//! listening are lost (commands are then delivered on a reconnect or a retry).

use super::outbox::{Announcement, COMMANDS_CHANNEL};
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
    /// This API key was revoked or rotated: connections it opened may have to close.
    Key(Uuid),
    /// This chatbot's webhook secret was rotated.
    Secret(Uuid),
    /// This chatbot was deleted: its supervisor must stop.
    Deleted(Uuid),
    /// Another node (`node`) committed a pending command for `chatbot_id`.
    Command { node: Uuid, chatbot_id: Uuid, command_id: String },
    /// A client acked this command through some node, with a key of this account
    /// (`None`: an operator key). The node waiting for the ack checks the account.
    CommandAcked { command_id: String, account: Option<Uuid> },
    /// The listener was disconnected: anything may have changed.
    Resync,
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
                    "LISTEN {}; LISTEN {WAKE_CHANNEL}; LISTEN {COMMANDS_CHANNEL}; LISTEN {}; LISTEN {}; LISTEN {}; LISTEN {}",
                    super::workflows::WORKFLOWS_CHANNEL,
                    super::limits::LIMITS_CHANNEL,
                    super::keys::KEYS_CHANNEL,
                    super::secrets::SECRETS_CHANNEL,
                    super::deletion::CHATBOTS_CHANNEL
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
                                Some((channel, p)) if channel == COMMANDS_CHANNEL => match Announcement::parse(&p) {
                                    Some(Announcement::Command { node, chatbot_id, command_id }) => {
                                        let _ = tx.send(Change::Command { node, chatbot_id, command_id });
                                    }
                                    Some(Announcement::Acked { command_id, account }) => {
                                        let _ = tx.send(Change::CommandAcked { command_id, account });
                                    }
                                    None => tracing::warn!(payload = %p, "ignoring a malformed command notification"),
                                },
                                Some((channel, p)) => match p.parse::<Uuid>() {
                                    Ok(id) => {
                                        let change = match channel.as_str() {
                                            WAKE_CHANNEL => Change::Wake(id),
                                            super::limits::LIMITS_CHANNEL => Change::Limits(id),
                                            super::keys::KEYS_CHANNEL => Change::Key(id),
                                            super::secrets::SECRETS_CHANNEL => Change::Secret(id),
                                            super::deletion::CHATBOTS_CHANNEL => Change::Deleted(id),
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
