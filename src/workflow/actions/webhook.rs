//! `webhook`: an HTTP POST of a JSON body to the URL the workflow names (the executor
//! signs it and sends it). 5xx, 408, 429, timeouts and connection errors are retried;
//! other 4xx are not. The output is `{"status": <code>, "response": <body>}`.

use super::{Effects, Scope, StepError, StepField, StepInput, StepOutcome, WebhookCall};
use crate::workflow::error::ValidationError;
use crate::workflow::fields::{is_token_char, present_value};
use crate::workflow::template::{push_key, JsonTemplate, Template};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// Used when a webhook step does not set `timeout_ms`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_TIMEOUT_MS: u64 = 300_000;

/// Headers the HTTP client derives from the request itself; letting a workflow set
/// them would produce malformed or misrouted requests.
const RESERVED_HEADERS: [&str; 4] = ["host", "content-length", "transfer-encoding", "connection"];

// The fields of a `webhook` step (documented through `Step`'s schema).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub id: String,
    pub url: String,
    #[serde(default, deserialize_with = "present_value", skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Compiled {
    pub url: Template,
    /// `None`: the event document is the body.
    pub body: Option<JsonTemplate>,
    pub headers: Vec<(String, Template)>,
    pub timeout: Duration,
}

impl Spec {
    pub(crate) fn compile(&self, at: &StepField, scope: &Scope<'_>) -> Result<Compiled, ValidationError> {
        let url_field = at.at("url");
        let url = scope.template(&url_field, &self.url)?;
        check_url(&url_field, &url)?;
        let body = match &self.body {
            None => None,
            Some(value) => {
                let body = JsonTemplate::compile(value).map_err(|e| {
                    ValidationError::new(format!("{}{}", at.at("body"), e.path), format!("invalid template: {}", e.error))
                })?;
                for (path, template) in body.templates() {
                    scope.check_references(&format!("{}{path}", at.at("body")), template)?;
                }
                Some(body)
            }
        };
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            let mut field = at.at("headers");
            push_key(&mut field, name);
            if name.is_empty() || !name.chars().all(is_token_char) {
                return Err(ValidationError::new(field, format!("invalid header name \"{name}\"")));
            }
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(ValidationError::new(
                    field,
                    format!("header \"{name}\" is set by the http client and cannot be overridden"),
                ));
            }
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(ValidationError::new(field, "must not contain control characters"));
            }
            headers.push((name.clone(), scope.template(&field, value)?));
        }
        let timeout = match self.timeout_ms {
            None => DEFAULT_TIMEOUT,
            Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Duration::from_millis(ms),
            Some(_) => return Err(ValidationError::new(at.at("timeout_ms"), format!("must be within 1..{MAX_TIMEOUT_MS}"))),
        };
        Ok(Compiled { url, body, headers, timeout })
    }
}

impl Compiled {
    pub(crate) async fn run<E: Effects>(&self, input: &StepInput<'_>, fx: &E) -> Result<StepOutcome, StepError> {
        let ctx = &input.templates;
        let call = WebhookCall {
            // Event data fills a segment or a query value, never more of the URL.
            url: self.url.render_url(ctx)?,
            body: match &self.body {
                Some(b) => b.render(ctx)?,
                None => ctx.event.clone(),
            },
            headers: self
                .headers
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.render_string(ctx)?)))
                .collect::<Result<Vec<_>, StepError>>()?,
            timeout: self.timeout,
        };
        fx.call_webhook(call).await.map(StepOutcome::Output)
    }
}

/// A webhook URL must be absolute http(s) with a host. Templates may fill the path,
/// query or fragment but not the scheme, host or port: the destination of a request
/// must not be chosen by event data.
fn check_url(field: &str, template: &Template) -> Result<(), ValidationError> {
    let probe = if template.is_literal() {
        template.source().to_string()
    } else {
        let prefix = template.literal_prefix();
        let authority_is_literal = prefix.find("://").is_some_and(|at| prefix[at + 3..].contains(['/', '?', '#']));
        if !authority_is_literal {
            return Err(ValidationError::new(
                field,
                "templates may only fill the path, query or fragment of a url, not its scheme or host",
            ));
        }
        template.with_placeholders("x")
    };
    let url = url::Url::parse(&probe)
        .map_err(|e| ValidationError::new(field, format!("must be an absolute http or https url ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ValidationError::new(
            field,
            format!("scheme \"{}\" is not allowed (expected http or https)", url.scheme()),
        ));
    }
    if url.host_str().is_none_or(|host| host.is_empty()) {
        return Err(ValidationError::new(field, "must have a host"));
    }
    Ok(())
}
