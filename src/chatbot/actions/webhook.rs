//! The `webhook` action: an HTTP POST of a JSON body, signed so the receiver can tell
//! it came from botflow, carrying an idempotency key so it can drop repeats.
//!
//! Headers sent:
//! - `X-Botflow-Timestamp`: Unix seconds when the request was signed;
//! - `X-Botflow-Signature`: `v1=<hex HMAC-SHA256 of "<timestamp>.<body>">` with the
//!   chatbot's webhook secret (the timestamp is signed so a captured request cannot
//!   be replayed later unnoticed). During the grace period of a secret rotation the
//!   header carries two signatures, the new secret's first, separated by a comma:
//!   `v1=<new>,v1=<old>`. A receiver splits the header on `,` and accepts the request
//!   when any `v1=` value matches its secret, so it keeps working with either secret
//!   while it is switched over;
//! - `Idempotency-Key`: `<execution id>:<step id>`, the same on every attempt;
//! - `X-Botflow-Execution`, `X-Botflow-Event`, `X-Botflow-Attempt` (the execution's
//!   attempt) and `X-Botflow-Lease-Epoch` (which claim of the execution sent it).
//!
//! 5xx answers, 408, 429, timeouts and connection errors are worth retrying; other
//! 4xx are not. A `Retry-After` (seconds or an HTTP date) sets the least wait before
//! the next attempt. A destination the egress policy refuses fails the step at once:
//! the same URL is refused again on every attempt. Redirects are not followed (a 3xx
//! fails the step, naming where it pointed).
//!
//! The output is `{"status": <code>, "response": <JSON body, or the text if not JSON>}`.

use super::StepError;
use crate::egress::{self, Egress};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::time::Duration;
use uuid::Uuid;

/// Largest response body read; the rest is not kept.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

pub struct Request {
    pub url: String,
    pub body: Value,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub idempotency_key: String,
    pub execution_id: Uuid,
    pub event_id: String,
    pub attempt: i32,
    pub lease_epoch: i64,
    /// `executor.max_request_body_bytes`.
    pub max_body_bytes: usize,
}

/// `v1=<hex>`: the signature over `"<timestamp>.<body>"`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The signature header's value: one `v1=` signature per secret, comma-separated.
pub fn signature_header(secrets: &[String], timestamp: i64, body: &[u8]) -> String {
    secrets.iter().map(|s| sign(s, timestamp, body)).collect::<Vec<_>>().join(",")
}

/// Sends the request signed with each of `secrets` (the current one first).
pub async fn call(egress: &Egress, secrets: &[String], req: Request) -> Result<Value, StepError> {
    let http = egress.client_for(&req.url).map_err(|refusal| StepError::new(refusal.to_string()))?;
    let body = serde_json::to_vec(&req.body).map_err(|e| StepError::new(format!("cannot encode the body: {e}")))?;
    if body.len() > req.max_body_bytes {
        // The same event renders the same body: no retry helps.
        return Err(StepError::new(format!(
            "the rendered request body is {} bytes, over executor.max_request_body_bytes ({}); nothing was sent",
            body.len(),
            req.max_body_bytes
        )));
    }
    let timestamp = chrono::Utc::now().timestamp();
    let mut builder = http
        .post(&req.url)
        .timeout(req.timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Botflow-Timestamp", timestamp.to_string())
        .header("X-Botflow-Signature", signature_header(secrets, timestamp, &body))
        .header("Idempotency-Key", &req.idempotency_key)
        .header("X-Botflow-Execution", req.execution_id.to_string())
        .header("X-Botflow-Event", &req.event_id)
        .header("X-Botflow-Attempt", req.attempt.to_string())
        .header("X-Botflow-Lease-Epoch", req.lease_epoch.to_string());
    for (name, value) in &req.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let timeout_ms = req.timeout.as_millis();
    let mut response = builder.body(body).send().await.map_err(|e| describe(e, timeout_ms))?;
    let status = response.status();
    let location = status
        .is_redirection()
        .then(|| response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("").to_string());
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let mut bytes = Vec::new();
    let mut truncated = false;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    truncated = true;
                    break;
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(describe(e, timeout_ms)),
        }
    }
    let response_value = if truncated {
        Value::Null
    } else {
        serde_json::from_slice::<Value>(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    let mut output = json!({ "status": status.as_u16(), "response": response_value });
    if truncated {
        output["truncated"] = Value::Bool(true);
    }
    if status.is_success() {
        Ok(output)
    } else if let Some(location) = location {
        Err(StepError {
            message: format!("webhook answered {status} to {location:?}; redirects are not followed (set the step's url to where it points)"),
            output: Some(output),
            retryable: false,
            retry_after: None,
        })
    } else {
        // 5xx, 408 and 429 may pass; other 4xx will fail the same way again.
        let retryable = status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429;
        Err(StepError {
            message: format!("webhook answered {status}"),
            output: Some(output),
            retryable,
            retry_after: if retryable { retry_after } else { None },
        })
    }
}

/// `Retry-After: 120` or `Retry-After: Wed, 21 Oct 2026 07:28:00 GMT`, capped at a day.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(Duration::from_secs(86_400)))
}

fn describe(e: reqwest::Error, timeout_ms: u128) -> StepError {
    if let Some(refusal) = egress::refusal_of(&e) {
        // The name resolves to a refused address: it will again on the next attempt.
        StepError::new(refusal.to_string())
    } else if e.is_timeout() {
        StepError::retryable(format!("webhook timed out after {timeout_ms} ms"))
    } else if e.is_connect() {
        StepError::retryable(format!("cannot connect to the webhook: {}", root_cause(&e)))
    } else if e.is_builder() {
        StepError::new(format!("invalid webhook request: {}", root_cause(&e)))
    } else {
        StepError::retryable(format!("webhook request failed: {}", root_cause(&e)))
    }
}

/// reqwest's Display stops at the outermost error; the cause is what helps.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_reference_hmac() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret -hex
        assert_eq!(
            sign("secret", 1_700_000_000, br#"{"a":1}"#),
            "v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
        assert_ne!(sign("secret", 1, b"x"), sign("other", 1, b"x"));
        assert_ne!(sign("secret", 1, b"x"), sign("secret", 2, b"x"));
        let both = signature_header(&["new".into(), "old".into()], 1, b"x");
        assert_eq!(both, format!("{},{}", sign("new", 1, b"x"), sign("old", 1, b"x")));
        assert_eq!(signature_header(&["new".into()], 1, b"x"), sign("new", 1, b"x"));
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("9999999"), Some(Duration::from_secs(86_400)));
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let wait = parse_retry_after(&soon).unwrap();
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30), "{wait:?}");
        assert_eq!(parse_retry_after("Mon, 01 Jan 2001 00:00:00 +0000"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
