//! `notify`: a message for the operators, always logged, and POSTed to
//! `notify.webhook_url` when one is configured.

use super::StepError;
use crate::egress::{self, Egress};
use crate::store::accounts::ChatbotRecord;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

pub async fn send(
    egress: &Egress,
    url: Option<&str>,
    chatbot: &ChatbotRecord,
    execution_id: Uuid,
    message: &str,
) -> Result<Value, StepError> {
    tracing::warn!(chatbot_id = %chatbot.id, %execution_id, notification = %message, "workflow notification");
    let Some(url) = url else {
        return Ok(json!({ "logged": true, "sent": false }));
    };
    let body = json!({
        "kind": "workflow",
        "chatbot_id": chatbot.id,
        "chatbot": chatbot.name,
        "execution_id": execution_id,
        "message": message,
    });
    let http = egress.client_for(url).map_err(|refusal| StepError::new(refusal.to_string()))?;
    let response = http
        .post(url)
        .timeout(Duration::from_secs(10))
        .json(&body)
        .send()
        .await
        .map_err(|e| match egress::refusal_of(&e) {
            Some(refusal) => StepError::new(refusal.to_string()),
            None => StepError::retryable(format!("cannot send the notification: {e}")),
        })?;
    let status = response.status();
    if status.is_success() {
        Ok(json!({ "logged": true, "sent": true, "status": status.as_u16() }))
    } else {
        Err(StepError::retryable(format!("the notification channel answered {status}")))
    }
}
