//! `reply`, `tag` and `handoff`: commands for the chat service, handed to the outbox,
//! which writes them to the connections subscribed to the chatbot.

use super::StepError;
use crate::ingest::protocol::Command;
use crate::outbox::{Deliver, Outbox};
use actix::Addr;
use serde_json::{json, Value};
use uuid::Uuid;

pub struct Request {
    pub kind: &'static str,
    pub payload: Value,
    pub chatbot_id: Uuid,
    pub conversation_id: String,
    pub execution_id: Uuid,
    pub step_id: String,
}

/// The output is `{"command_id": …, "delivered": <connections that took it>}`.
pub async fn send(outbox: &Addr<Outbox>, req: Request) -> Result<Value, StepError> {
    // Stable across attempts of the same step, so a client can drop repeats.
    let command_id = format!("{}:{}", req.execution_id, req.step_id);
    let command = Command {
        command_id: command_id.clone(),
        chatbot_id: req.chatbot_id,
        conversation_id: req.conversation_id,
        kind: req.kind,
        payload: req.payload,
        execution_id: req.execution_id,
    };
    let delivered = outbox
        .send(Deliver(command))
        .await
        .map_err(|e| StepError::retryable(format!("the outbox is not running: {e}")))?;
    Ok(json!({ "command_id": command_id, "delivered": delivered }))
}
