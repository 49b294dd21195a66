//! Running one execution: its steps in order, each rendered from the event and the
//! outputs of earlier steps, each recorded with its timing and outcome.
//!
//! This is a plain async function the supervisor spawns on its arbiter; the pool is
//! the supervisor's count of running executions. A step that panics is caught and
//! recorded as a failed step (a panic inside an actor's future would otherwise take
//! the whole arbiter down), and the execution stops at the first failed step.

use crate::chatbot::supervisor::SupervisorDeps;
use crate::outbox::Outbox;
use crate::store::accounts::ChatbotRecord;
use crate::store::journal::{ExecutionResult, FinalStatus, StepRecord};
use crate::telemetry::metrics as m;
use crate::workflow::actions::{self, StepError};
use crate::workflow::{CompiledAction, CompiledStep, CompiledWorkflow, TemplateContext};
use actix::Addr;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use serde_json::{Map, Value};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use uuid::Uuid;

/// What steps need from the daemon.
pub struct ExecEnv {
    pub http: reqwest::Client,
    pub outbox: Addr<Outbox>,
    pub chatbot: Arc<ChatbotRecord>,
    pub notify_url: Option<String>,
}

impl ExecEnv {
    pub fn from_deps(deps: &SupervisorDeps, chatbot: Arc<ChatbotRecord>) -> ExecEnv {
        ExecEnv { http: deps.http.clone(), outbox: deps.outbox.clone(), chatbot, notify_url: deps.notify_url.clone() }
    }
}

/// One committed execution, ready to run.
pub struct Job {
    pub execution_id: Uuid,
    pub workflow: Arc<CompiledWorkflow>,
    pub event: Arc<Value>,
    pub conversation_id: Arc<str>,
    pub started_at: DateTime<Utc>,
}

pub async fn run(job: Job, env: Arc<ExecEnv>) -> ExecutionResult {
    let clock = std::time::Instant::now();
    let mut outputs = Map::new();
    let mut records = Vec::with_capacity(job.workflow.steps.len());
    let mut error = None;
    for (index, step) in job.workflow.steps.iter().enumerate() {
        let started_at = Utc::now();
        let step_clock = std::time::Instant::now();
        let result = AssertUnwindSafe(run_step(&job, &env, step, &outputs)).catch_unwind().await;
        let result = match result {
            Ok(r) => r,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(execution_id = %job.execution_id, step = %step.id, panic = %what, "step panicked");
                Err(StepError::new(format!("step panicked: {what}")))
            }
        };
        let action = step.action.name();
        let seconds = step_clock.elapsed().as_secs_f64();
        metrics::histogram!(m::STEP_DURATION, "action" => action).record(seconds);
        let finished_at = Utc::now();
        match result {
            Ok(output) => {
                metrics::counter!(m::STEPS, "action" => action, "outcome" => "succeeded").increment(1);
                records.push(StepRecord {
                    index: index as i32,
                    attempt: 1,
                    step_id: step.id.clone(),
                    action,
                    succeeded: true,
                    started_at,
                    finished_at,
                    output: Some(output.clone()),
                    error: None,
                });
                outputs.insert(step.id.clone(), output);
            }
            Err(e) => {
                metrics::counter!(m::STEPS, "action" => action, "outcome" => "failed").increment(1);
                tracing::info!(execution_id = %job.execution_id, step = %step.id, error = %e.message, "step failed");
                records.push(StepRecord {
                    index: index as i32,
                    attempt: 1,
                    step_id: step.id.clone(),
                    action,
                    succeeded: false,
                    started_at,
                    finished_at,
                    output: e.output,
                    error: Some(e.message.clone()),
                });
                error = Some(format!("step {:?} ({action}) failed: {}", step.id, e.message));
                break;
            }
        }
    }
    metrics::histogram!(m::EXECUTION_DURATION).record(clock.elapsed().as_secs_f64());
    ExecutionResult {
        id: job.execution_id,
        status: if error.is_none() { FinalStatus::Succeeded } else { FinalStatus::Failed },
        started_at: job.started_at,
        finished_at: Utc::now(),
        error,
        steps: records,
    }
}

async fn run_step(job: &Job, env: &ExecEnv, step: &CompiledStep, outputs: &Map<String, Value>) -> Result<Value, StepError> {
    let ctx = TemplateContext { event: &job.event, steps: outputs };
    let command = |kind: &'static str, payload: Value| actions::command::Request {
        kind,
        payload,
        chatbot_id: env.chatbot.id,
        conversation_id: job.conversation_id.to_string(),
        execution_id: job.execution_id,
        step_id: step.id.clone(),
    };
    match &step.action {
        CompiledAction::Webhook { url, body, headers, timeout } => {
            let request = actions::webhook::Request {
                url: url.render_string(&ctx)?,
                body: match body {
                    Some(b) => b.render(&ctx)?,
                    None => job.event.as_ref().clone(),
                },
                headers: headers
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.render_string(&ctx)?)))
                    .collect::<Result<Vec<_>, StepError>>()?,
                timeout: *timeout,
                idempotency_key: format!("{}:{}", job.execution_id, step.id),
                execution_id: job.execution_id,
                event_id: job.event.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
            };
            actions::webhook::call(&env.http, &env.chatbot.webhook_secret, request).await
        }
        CompiledAction::Reply { text } => {
            let payload = serde_json::json!({ "text": text.render_string(&ctx)? });
            actions::command::send(&env.outbox, command("reply", payload)).await
        }
        CompiledAction::Tag { tags } => {
            let tags = tags.iter().map(|t| t.render_string(&ctx)).collect::<Result<Vec<_>, _>>()?;
            actions::command::send(&env.outbox, command("tag", serde_json::json!({ "tags": tags }))).await
        }
        CompiledAction::Handoff { queue } => {
            let payload = serde_json::json!({ "queue": queue.render_string(&ctx)? });
            actions::command::send(&env.outbox, command("handoff", payload)).await
        }
        CompiledAction::Notify { message } => {
            let message = message.render_string(&ctx)?;
            actions::notify::send(&env.http, env.notify_url.as_deref(), &env.chatbot, job.execution_id, &message).await
        }
        CompiledAction::Delay { .. } => Err(StepError::new(
            "delay steps need the durable timer, which this version of botflow does not have yet",
        )),
    }
}
