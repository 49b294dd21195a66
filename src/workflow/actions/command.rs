//! `reply`, `tag` and `handoff`: commands for the chat service, through the outbox.
//!
//! A command is kept in PostgreSQL (so it survives a crash and is redelivered to
//! clients that reconnect) and written to the connections subscribed to the chatbot;
//! the step succeeds once a client acks it, and fails (to be retried) if none does
//! within the ack timeout. The command id, `<execution id>:<step id>`, is the same
//! on every attempt, so a client drops repeats.

use super::StepError;
use crate::ingest::protocol::Command;
use crate::outbox::{Deliver, Forget, Outbox};
use crate::store::journal::{CommandRow, JournalLane, RecordProgress};
use actix::Addr;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The output is `{"command_id": …, "delivered": <connections written to>, "acked": true}`.
pub async fn send(
    lane: &Addr<JournalLane>,
    outbox: &Addr<Outbox>,
    ack_timeout: Duration,
    command: Arc<Command>,
    account_id: uuid::Uuid,
    epoch: i64,
) -> Result<Value, StepError> {
    // Written to the connections without waiting for the row's commit: the client's
    // ack goes through the same journal lane, after the row; and if the daemon dies
    // before the commit, the step runs again and sends the same command id.
    lane.do_send(RecordProgress { commands: vec![CommandRow { command: command.clone(), epoch }], ..Default::default() });
    let (acked_tx, acked_rx) = tokio::sync::oneshot::channel();
    let delivered = outbox
        .send(Deliver { command: command.clone(), account_id, acked: acked_tx })
        .await
        .map_err(|e| StepError::retryable(format!("the outbox is not running: {e}")))?;
    match tokio::time::timeout(ack_timeout, acked_rx).await {
        Ok(Ok(())) => Ok(json!({ "command_id": command.command_id, "delivered": delivered, "acked": true })),
        _ => {
            outbox.do_send(Forget { command_id: command.command_id.clone() });
            Err(StepError::retryable(format!(
                "no client acked command {} within {} ms (written to {delivered} connection{})",
                command.command_id,
                ack_timeout.as_millis(),
                if delivered == 1 { "" } else { "s" }
            )))
        }
    }
}
