//! Running one attempt of one execution: its steps in order from where it stands,
//! each rendered from the event and the outputs of earlier steps, each recorded (with
//! the execution's new resume point) as soon as it ends.
//!
//! This is a plain async function the supervisor spawns on its arbiter; the pool is
//! the supervisor's count of running executions. It ends when every step succeeded,
//! at a `delay` step (the supervisor makes the wait durable), at a failed step (the
//! supervisor applies the retry policy), or when the lease is gone. A step that panics
//! is caught and recorded as a failed step: a panic inside an actor's future would
//! otherwise take the whole arbiter down.

use super::actions;
use super::actions::command::Parking;
use super::deps::SupervisorDeps;
use crate::outbox::Outbox;
use crate::store::accounts::ChatbotRecord;
use crate::store::journal::{ExecutionUpdate, Journal, LeaseLost, RecordProgress, Status, StepRecord};
use crate::store::leases::LeaseHealth;
use crate::telemetry::metrics as m;
use crate::wire::{Command, CommandId, CommandKind};
use crate::workflow::{CompiledStep, CompiledWorkflow, Effects, StepError, StepInput, StepOutcome, TemplateContext, WebhookCall};
use actix::{Addr, Recipient};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use serde_json::{Map, Value};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// What steps need from the daemon, per chatbot.
pub struct ExecEnv {
    pub store: crate::store::Store,
    pub egress: crate::egress::Egress,
    pub outbox: Addr<Outbox>,
    pub chatbot: Arc<ChatbotRecord>,
    pub notify_url: Option<String>,
    pub notify_egress: crate::egress::Egress,
    pub journal: Journal,
    pub lease_lost: Recipient<LeaseLost>,
    /// Steps waiting for a client free their executor slot through this.
    pub slots: Recipient<Parking>,
    pub health: LeaseHealth,
    pub step_timeout: Duration,
    pub max_request_body_bytes: usize,
    pub stored_response_bytes: usize,
    pub ack_timeout: Duration,
    pub execution_timeout: Duration,
}

impl ExecEnv {
    pub fn new(deps: &SupervisorDeps, chatbot: Arc<ChatbotRecord>, lease_lost: Recipient<LeaseLost>, slots: Recipient<Parking>) -> ExecEnv {
        ExecEnv {
            store: deps.store.clone(),
            egress: deps.egress.clone(),
            outbox: deps.outbox.clone(),
            chatbot,
            notify_url: deps.notify_url.clone(),
            notify_egress: deps.notify_egress.clone(),
            journal: deps.journal.clone(),
            lease_lost,
            slots,
            health: deps.health.clone(),
            step_timeout: deps.step_timeout,
            max_request_body_bytes: deps.max_request_body_bytes,
            stored_response_bytes: deps.stored_response_bytes,
            ack_timeout: deps.ack_timeout,
            execution_timeout: deps.execution_timeout,
        }
    }

    /// Sends updates to the journal, asking to hear if the lease is gone.
    fn record(&self, update: ExecutionUpdate) {
        self.journal.lane_of(update.id).do_send(RecordProgress {
            updates: vec![update],
            lease_lost: Some(self.lease_lost.clone()),
            ..Default::default()
        });
    }
}

/// An execution this node holds the lease of, at its resume point.
#[derive(Debug, Clone)]
pub struct Job {
    pub execution_id: Uuid,
    pub epoch: i64,
    pub attempt: i32,
    pub workflow: Arc<CompiledWorkflow>,
    pub event: Arc<Value>,
    pub conversation_id: Arc<str>,
    /// The next step to run.
    pub step_index: usize,
    /// Outputs of the steps before `step_index`.
    pub outputs: Arc<Value>,
    /// The lease generation (`LeaseHealth`) this job was planned or claimed under.
    pub generation: u64,
    /// Claimed after an attempt that was `running` when its node stopped.
    pub interrupted: bool,
    /// This attempt already ran here and is run again (a step was interrupted by a late
    /// heartbeat): a command it sent may have been acked meanwhile.
    pub ran_before: bool,
}

impl Job {
    /// An update of this execution's state; the caller fills in the rest.
    pub fn update(&self, status: Status) -> ExecutionUpdate {
        ExecutionUpdate {
            id: self.execution_id,
            epoch: self.epoch,
            status,
            attempt: self.attempt,
            step_index: self.step_index as i32,
            outputs: None,
            run_after: None,
            started_at: None,
            finished_at: None,
            error: None,
            release: false,
            steps: Vec::new(),
        }
    }
}

/// How an attempt ended.
#[derive(Debug)]
pub enum RunEnd {
    Succeeded,
    /// At a `delay` step: the execution goes on at `until` (the step is recorded).
    Wait { until: DateTime<Utc> },
    /// A step failed; a retry may fix it when `retryable`, not before `retry_after`.
    Failed { error: String, retryable: bool, retry_after: Option<Duration> },
    /// This node's leases lapsed since the job started: another node may own it now.
    /// Nothing is written for it; its lease is given up.
    Abandoned,
    /// A step was stopped because this node's lease became doubtful (its heartbeat is
    /// late). Not the workflow's failure: tried again soon under the same attempt.
    Interrupted { error: String },
}

/// Runs the job from its resume point. Every step's outcome, with the new resume
/// point and outputs, is sent to the journal as soon as the step ends.
pub async fn run(mut job: Job, env: Arc<ExecEnv>) -> (Job, RunEnd) {
    let timeout = job.workflow.spec.timeout_ms.map(Duration::from_millis).unwrap_or(env.execution_timeout);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut outputs: Map<String, Value> = job.outputs.as_object().cloned().unwrap_or_default();
    let mut lease = env.health.subscribe();
    let generation = job.generation;
    while job.step_index < job.workflow.steps.len() {
        // Never start a step while another node may be taking this execution over.
        lease.borrow_and_update();
        let state = env.health.state();
        if state.generation != generation {
            return (job, RunEnd::Abandoned);
        }
        if !state.healthy {
            tracing::warn!(execution_id = %job.execution_id, "lease heartbeat late; waiting before the next step");
            // The heartbeat task may not have noticed yet (the process was paused, say):
            // wait for its word, at most the execution's time.
            let ok = tokio::time::timeout_at(deadline, async {
                loop {
                    let s = env.health.state();
                    if s.healthy || s.generation != generation {
                        return s;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(100), lease.changed()).await;
                }
            })
            .await;
            match ok {
                Ok(s) if s.generation == generation => continue,
                Ok(_) => return (job, RunEnd::Abandoned),
                Err(_) => {
                    let error = format!("the execution timed out after {} ms waiting for the database", timeout.as_millis());
                    return (job, RunEnd::Failed { error, retryable: true, retry_after: None });
                }
            }
        }
        let index = job.step_index;
        let step = &job.workflow.steps[index];
        let started_at = Utc::now();
        let clock = Instant::now();
        let result = {
            let work = panic_as_error(run_step(&job, &env, step, &outputs, started_at));
            let bounded = tokio::time::timeout_at(deadline, tokio::time::timeout(env.step_timeout, work));
            // A step in flight stops when the lease becomes doubtful: another node
            // may start the same step any moment.
            let outcome = tokio::select! {
                biased;
                r = bounded => Some(r),
                _ = lease.wait_for(|s| !s.healthy || s.generation != generation) => None,
            };
            let Some(outcome) = outcome else {
                if lease.borrow().generation != generation {
                    return (job, RunEnd::Abandoned);
                }
                let error = format!("step {:?} was stopped: this node's lease heartbeat is late", step.id);
                return (job, RunEnd::Interrupted { error });
            };
            match outcome {
                Err(_) => Err(StepError::retryable(format!("the execution timed out after {} ms", timeout.as_millis()))),
                Ok(Err(_)) => Err(StepError::retryable(format!("the step timed out after {} ms", env.step_timeout.as_millis()))),
                Ok(Ok(Ok(r))) => r,
                Ok(Ok(Err(what))) => {
                    tracing::error!(execution_id = %job.execution_id, step = %step.id, panic = %what, "step panicked");
                    Err(StepError::new(format!("step panicked: {what}")))
                }
            }
        };
        let action = step.action.name();
        metrics::histogram!(m::STEP_DURATION, "action" => action).record(clock.elapsed().as_secs_f64());
        let record = |succeeded: bool, output: Option<Value>, error: Option<String>| StepRecord {
            index: index as i32,
            attempt: job.attempt,
            step_id: step.id.clone(),
            action,
            succeeded,
            started_at,
            finished_at: Utc::now(),
            output,
            error,
        };
        match result {
            Ok(StepOutcome::Output(output)) => {
                metrics::counter!(m::STEPS, "action" => action, "outcome" => "succeeded").increment(1);
                // Later steps of this run see the whole output; the database keeps an
                // excerpt of a long response (a resumed run sees that excerpt).
                let stored = for_storage(&output, env.stored_response_bytes);
                outputs.insert(step.id.clone(), output);
                let step_record = record(true, Some(stored.clone()), None);
                job.step_index += 1;
                let mut kept = job.outputs.as_object().cloned().unwrap_or_default();
                kept.insert(step.id.clone(), stored);
                job.outputs = Arc::new(Value::Object(kept));
                let mut u = job.update(Status::Running);
                u.outputs = Some(job.outputs.clone());
                u.steps.push(step_record);
                env.record(u);
            }
            Ok(StepOutcome::Delay(due)) => {
                metrics::counter!(m::STEPS, "action" => action, "outcome" => "succeeded").increment(1);
                let step_record = record(true, Some(serde_json::json!({ "until": due })), None);
                job.step_index += 1;
                if due > Utc::now() {
                    // The supervisor writes the wait with this step's record.
                    let mut u = job.update(Status::Running);
                    u.steps.push(step_record);
                    env.record(u);
                    return (job, RunEnd::Wait { until: due });
                }
                let mut u = job.update(Status::Running);
                u.steps.push(step_record);
                env.record(u);
            }
            Err(e) => {
                metrics::counter!(m::STEPS, "action" => action, "outcome" => "failed").increment(1);
                tracing::info!(execution_id = %job.execution_id, step = %step.id, attempt = job.attempt, error = %e.message, "step failed");
                let mut u = job.update(Status::Running);
                u.steps.push(record(false, e.output.as_ref().map(|o| for_storage(o, env.stored_response_bytes)), Some(e.message.clone())));
                env.record(u);
                let error = format!("step {:?} ({action}) failed: {}", step.id, e.message);
                return (job, RunEnd::Failed { error, retryable: e.retryable, retry_after: e.retry_after });
            }
        }
    }
    (job, RunEnd::Succeeded)
}

/// A step's output as the database keeps it: a webhook's `response` longer than
/// `limit` bytes (as JSON) becomes the first `limit` bytes of its text, and
/// `response_cut` says how long it was.
fn for_storage(output: &Value, limit: usize) -> Value {
    let Some(response) = output.get("response") else { return output.clone() };
    let text = response.to_string();
    if text.len() <= limit {
        return output.clone();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut stored = output.clone();
    stored["response"] = Value::String(text[..end].to_string());
    stored["response_cut"] = serde_json::json!({ "bytes": text.len(), "kept": end });
    stored
}

/// Runs one step's action, its effects going through this execution's `StepEffects`.
async fn run_step(
    job: &Job,
    env: &ExecEnv,
    step: &CompiledStep,
    outputs: &Map<String, Value>,
    started_at: DateTime<Utc>,
) -> Result<StepOutcome, StepError> {
    let input = StepInput { templates: TemplateContext { event: &job.event, steps: outputs }, started_at };
    step.action.run(&input, &StepEffects { job, env, step_id: &step.id }).await
}

/// What a step of this execution does to the world: webhooks signed with the
/// chatbot's secret, commands through the journal and the outbox, notifications.
struct StepEffects<'a> {
    job: &'a Job,
    env: &'a ExecEnv,
    step_id: &'a str,
}

impl Effects for StepEffects<'_> {
    async fn call_webhook(&self, call: WebhookCall) -> Result<Value, StepError> {
        let job = self.job;
        let request = actions::webhook::Request {
            url: call.url,
            body: call.body,
            headers: call.headers,
            timeout: call.timeout,
            // The same on every attempt, so a receiver can drop repeats.
            idempotency_key: format!("{}:{}", job.execution_id, self.step_id),
            execution_id: job.execution_id,
            event_id: job.event.get("id").and_then(Value::as_str).unwrap_or_default().to_string(),
            attempt: job.attempt,
            lease_epoch: job.epoch,
            max_body_bytes: self.env.max_request_body_bytes,
        };
        let secrets = self.env.chatbot.signing().secrets(chrono::Utc::now());
        actions::webhook::call(&self.env.egress, &secrets, request).await
    }

    async fn send_command(&self, kind: CommandKind, payload: Value) -> Result<Value, StepError> {
        let (job, env) = (self.job, self.env);
        let command = Command {
            // Stable across attempts, so a client can drop repeats.
            command_id: CommandId::new(job.execution_id, self.step_id).to_string(),
            chatbot_id: env.chatbot.id,
            conversation_id: job.conversation_id.to_string(),
            kind,
            payload,
            execution_id: job.execution_id,
        };
        let lane = env.journal.lane_of(job.execution_id);
        let route = actions::command::Route {
            lane: &lane,
            outbox: &env.outbox,
            store: &env.store,
            ack_timeout: env.ack_timeout,
            slots: &env.slots,
        };
        // A later attempt, a run resumed under a new lease (epoch 1 is an execution's
        // first) or an attempt run again: a client may have acked the command sent before.
        let sent_before = job.attempt > 1 || job.epoch > 1 || job.ran_before;
        actions::command::send(route, Arc::new(command), env.chatbot.account_id, job.epoch, sent_before).await
    }

    async fn notify(&self, message: String) -> Result<Value, StepError> {
        let env = self.env;
        actions::notify::send(&env.notify_egress, env.notify_url.as_deref(), &env.chatbot, self.job.execution_id, &message).await
    }
}

/// Runs a step's future and turns a panic inside it into its message: a panic that
/// reached the actor's future would stop the arbiter and every chatbot on it.
async fn panic_as_error<T>(work: impl std::future::Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(work).catch_unwind().await.map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into())
    })
}

#[cfg(test)]
mod tests {
    use super::panic_as_error;

    #[actix_rt::test]
    async fn a_panicking_step_becomes_its_message() {
        let r = panic_as_error(async { panic!("boom") }).await;
        assert_eq!(r, Err::<(), _>("boom".to_string()));
        let field = "customer";
        let r = panic_as_error(async move {
            tokio::task::yield_now().await;
            panic!("no field {field}");
        })
        .await;
        assert_eq!(r, Err::<(), _>("no field customer".to_string()));
        let r = panic_as_error(async { std::panic::panic_any(7_u8) }).await;
        assert_eq!(r, Err::<(), _>("unknown panic".to_string()));
        assert_eq!(panic_as_error(async { 5 }).await, Ok(5));
    }
}
