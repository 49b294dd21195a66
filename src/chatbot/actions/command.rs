//! `reply`, `tag` and `handoff`: commands for the chat service, through the outbox.
//!
//! A command is kept in PostgreSQL (so it survives a crash and is redelivered to
//! clients that reconnect) and written to the connections subscribed to the chatbot;
//! the step succeeds once a client acks it, and fails (to be retried) if none does
//! within the ack timeout. The command id, `<execution id>:<step id>`, is the same
//! on every attempt, so a client drops repeats. While it waits for a client the step
//! holds none of the chatbot's executor slots: replies nobody acks must not stall the
//! chatbot's other workflows.

use super::StepError;
use crate::outbox::{Deliver, Forget, Outbox};
use crate::store::journal::{CommandRow, JournalLane, RecordProgress};
use crate::store::outbox::is_acked;
use crate::store::Store;
use crate::wire::Command;
use actix::{Addr, Message, Recipient};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Where a command goes: the journal keeps it, the outbox delivers it and hears the ack.
pub struct Route<'a> {
    pub lane: &'a Addr<JournalLane>,
    pub outbox: &'a Addr<Outbox>,
    pub store: &'a Store,
    pub ack_timeout: Duration,
    /// The chatbot's supervisor, told when the step waits (and frees its slot).
    pub slots: &'a Recipient<Parking>,
}

/// Sent to the chatbot's supervisor by a step that waits for a client's ack: while it
/// waits it holds no executor slot (`Parked`); before it goes on it asks for one again
/// (`Resume`, answered through the sender once a slot is free).
#[derive(Message)]
#[rtype(result = "()")]
pub enum Parking {
    Parked(Uuid),
    Resume(Uuid, tokio::sync::oneshot::Sender<()>),
}

/// How long a step waits for an ack while holding its slot: most clients ack within
/// it, and then the slot is never given up and asked for again.
const ACK_GRACE: Duration = Duration::from_millis(20);

/// The output is `{"command_id": …, "delivered": <connections written to>, "acked": true}`.
/// `sent_before`: this step may have sent the command already (a later attempt, a run
/// resumed or run again); a command a client acked is then not sent again.
pub async fn send(
    Route { lane, outbox, store, ack_timeout, slots }: Route<'_>,
    command: Arc<Command>,
    account_id: uuid::Uuid,
    epoch: i64,
    sent_before: bool,
) -> Result<Value, StepError> {
    let acked = |delivered: usize| Ok(json!({ "command_id": command.command_id, "delivered": delivered, "acked": true }));
    if sent_before && acked_in_database(store, &command.command_id, ack_timeout).await? {
        return acked(0);
    }
    // Written to the connections without waiting for the row's commit: the client's
    // ack goes through the same journal lane, after the row; and if the daemon dies
    // before the commit, the step runs again and sends the same command id.
    lane.do_send(RecordProgress { commands: vec![CommandRow { command: command.clone(), epoch }], ..Default::default() });
    let (acked_tx, acked_rx) = tokio::sync::oneshot::channel();
    let delivered = outbox
        .send(Deliver { command: command.clone(), account_id, acked: acked_tx })
        .await
        .map_err(|e| StepError::retryable(format!("the outbox is not running: {e}")))?;
    // However this step ends (acked, timed out, cancelled), the outbox stops waiting.
    let _forget = ForgetOnDrop { outbox: outbox.clone(), command_id: command.command_id.clone() };
    let mut acked_rx = acked_rx;
    let waited = match tokio::time::timeout(ACK_GRACE.min(ack_timeout), &mut acked_rx).await {
        Ok(r) => Ok(r),
        Err(_) => {
            let id = command.execution_id;
            slots.do_send(Parking::Parked(id));
            let waited = tokio::time::timeout(ack_timeout.saturating_sub(ACK_GRACE), &mut acked_rx).await;
            let (go, slot) = tokio::sync::oneshot::channel();
            slots.do_send(Parking::Resume(id, go));
            // A supervisor that went away drops the sender: go on all the same.
            let _ = slot.await;
            waited
        }
    };
    match waited {
        Ok(Ok(())) => acked(delivered),
        // Acked on another node, or through the database. (When the database cannot
        // say, the next attempt asks again before it sends.)
        _ if is_acked(store, &command.command_id).await.unwrap_or(false) => acked(delivered),
        _ => Err(StepError::retryable(format!(
            "no client acked command {} within {} ms (written to {delivered} connection{})",
            command.command_id,
            ack_timeout.as_millis(),
            if delivered == 1 { "" } else { "s" }
        ))),
    }
}

/// Whether a client acked the command, asked until the database answers (within
/// `patience`): taking "cannot tell" for "no" would send an acked command again.
async fn acked_in_database(store: &Store, command_id: &str, patience: Duration) -> Result<bool, StepError> {
    let start = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        match is_acked(store, command_id).await {
            Ok(acked) => return Ok(acked),
            Err(e) if start.elapsed() + wait > patience => {
                return Err(StepError::retryable(format!("cannot tell whether command {command_id} was acked: {e}")))
            }
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
        }
    }
}

struct ForgetOnDrop {
    outbox: Addr<Outbox>,
    command_id: String,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        self.outbox.do_send(Forget { command_id: std::mem::take(&mut self.command_id) });
    }
}
