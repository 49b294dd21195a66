//! The ChatbotSupervisor actor: one per chatbot, owning that chatbot's compiled
//! `TriggerIndex` and its bounded executor pool.
//!
//! Events arrive from the Router in batches. An event whose type no workflow listens
//! to is acked at once without parsing its JSON; one with candidates is parsed and
//! matched, its executions are planned (ids chosen here) and sent to the chatbot's
//! journal lane, which acks the event after the commit and hands the committed ids
//! back. Only then are the steps run, at most `concurrency_per_chatbot` executions at
//! a time.
//!
//! Memory stays bounded: at most `queue_capacity` executions wait here for an
//! executor. Past that, new executions are written free (no lease) and wait as
//! `queued` rows, which this supervisor claims from PostgreSQL as executors free up.
//! The same claim takes over executions that are due and free (after a restart, a
//! replay, a long wait) or held by a dead node, when the scheduler wakes it.
//!
//! When an attempt ends the supervisor applies the workflow's retry policy: a retry or
//! a `delay` is written with its due time; short waits keep the lease and fire from a
//! timer here, long ones give it up and are claimed again when due. Executions that
//! used up their attempts become dead letters and are reported to the operators.
//!
//! Workflow changes rebuild the index in the background and swap it in; events keep
//! flowing against the old index meanwhile, so none is lost or matched twice. An
//! execution always runs the workflow version it was created with.

pub use super::deps::SupervisorDeps;
use super::actions::command::Parking;
use super::admission;
use super::executor::{self, ExecEnv, Job, RunEnd};
use super::limits::{Limiters, Limits, Usage};
use super::retry::{AfterFailure, Policy};
use super::triggers::TriggerIndex;
use crate::event::Event;
use crate::notify::{Kind, Report};
use crate::store::accounts::ChatbotRecord;
use crate::store::journal::{
    ExecutionsCommitted, LeaseLost, PendingEvent, RecordExecutions, RecordProgress,
    Status,
};
use crate::store::leases::{self, Claimed};
use crate::store::limits as limit_store;
use crate::store::{workflows, Store, StoreError};
use crate::telemetry::metrics as m;
use crate::wire::{BatchAnswers, Nack, NackCode, Outcome};
use crate::workflow::{CompiledWorkflow, WorkflowSpec};
use actix::prelude::*;
use chrono::Utc;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Waits up to this long keep their lease and fire from a timer here; longer ones are
/// given up and claimed again when due (by this node or any other).
const HOLD_WAIT_MAX: Duration = Duration::from_secs(30);

/// How long a step stopped by a late heartbeat waits before it is tried again.
const INTERRUPTED_RETRY: Duration = Duration::from_secs(1);

/// Sent by the Router: events of this chatbot in the order their connection sent them.
/// Every event is answered once: at once through `answers` (gathered with the rest of
/// its batch), or by the journal after its executions are committed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SupervisorEvents {
    /// Where the events came from (a connection, a request): one source's events for
    /// this chatbot share a journal lane, so their acks keep their order.
    pub source: u64,
    pub events: Vec<Event>,
    pub received_at: Instant,
    pub answers: Arc<BatchAnswers>,
}

/// Sent by the Router when this chatbot's workflows changed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reload;

/// Sent by the Router when this chatbot's rate limits changed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LimitsChanged;

/// The limits in force and what the chatbot uses of them now.
#[derive(Message)]
#[rtype(result = "(Limits, Usage)")]
pub struct GetUsage;

/// Sent by the Router for the admin API on this node: these limits were just saved;
/// apply them now (the NOTIFY that tells every node comes a moment later and finds them
/// applied). Answers the usage under them.
#[derive(Message)]
#[rtype(result = "(Limits, Usage)")]
pub struct ApplyLimits(pub Limits);

/// Sent by the Router (from the scheduler): executions of this chatbot are due at
/// `due_at`, free or held by a dead node. Claim them then.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WakeUp {
    pub due_at: chrono::DateTime<Utc>,
}

/// Sent by the Router to an idle supervisor: stop if nothing is in flight. `true`: stopped.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct StopIfIdle;

/// Sent by the Router when the chatbot was deleted: stop now. The events sent before
/// this were handled (the mailbox keeps order); running steps end with the actor, and
/// their writes are refused (the deletion took their leases).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

/// Whether executions are planned, waiting or running (for shutdown).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct IsBusy;

/// Sent at shutdown: finish what is in memory, claim nothing new.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

enum LoadState {
    Loading,
    Ready,
    /// The first load failed for longer than the unavailable deadline; events are
    /// nacked `unavailable` while it keeps trying.
    Unavailable,
}

pub struct ChatbotSupervisor {
    chatbot: Arc<ChatbotRecord>,
    deps: Arc<SupervisorDeps>,
    env: Arc<ExecEnv>,
    index: Arc<TriggerIndex>,
    state: LoadState,
    reload_generation: u64,
    /// Compiled workflow versions other than the current ones, for resumed executions.
    versions: HashMap<(Uuid, i32), Arc<CompiledWorkflow>>,
    /// Planned and leased, waiting for the journal's commit.
    awaiting_commit: HashMap<Uuid, Job>,
    /// Committed (or claimed), waiting for an executor.
    ready: VecDeque<Job>,
    /// Running jobs, with the epoch they run under.
    running: HashMap<Uuid, (SpawnHandle, i64)>,
    /// Running jobs waiting for a client's ack: they hold no executor slot.
    parked: HashSet<Uuid>,
    /// Running jobs done waiting, each given a slot (through its sender) when one frees.
    resuming: VecDeque<(Uuid, tokio::sync::oneshot::Sender<()>)>,
    /// Short waits (retries, delays) that keep their lease, with its epoch.
    timers: HashMap<Uuid, (SpawnHandle, i64)>,
    /// Executions of this chatbot may be waiting in PostgreSQL for a claim.
    backlog: bool,
    claiming: bool,
    claim_again: bool,
    wake_at: Option<chrono::DateTime<Utc>>,
    draining: bool,
    limiters: Limiters,
    watched: Option<m::Watched>,
    /// A pump is scheduled for when the execution rate lets the next one start.
    rate_wait: bool,
    matched: Vec<u32>,
}

impl ChatbotSupervisor {
    pub fn new(chatbot: Arc<ChatbotRecord>, deps: Arc<SupervisorDeps>, me: Addr<ChatbotSupervisor>) -> ChatbotSupervisor {
        let env = Arc::new(ExecEnv::new(&deps, chatbot.clone(), me.clone().recipient(), me.recipient()));
        let limit_defaults = deps.limit_defaults;
        let watched = deps.watchlist.contains(&chatbot.id).then(|| m::Watched::new(chatbot.id));
        ChatbotSupervisor {
            chatbot,
            deps,
            env,
            index: Arc::new(TriggerIndex::empty()),
            state: LoadState::Loading,
            reload_generation: 0,
            versions: HashMap::new(),
            awaiting_commit: HashMap::new(),
            ready: VecDeque::new(),
            running: HashMap::new(),
            parked: HashSet::new(),
            resuming: VecDeque::new(),
            timers: HashMap::new(),
            // Work left in PostgreSQL for this chatbot is found by the scheduler's scan,
            // which wakes the supervisor; a fresh one does not ask for it on its own
            // (ten thousand starting at once would each cost a query).
            backlog: false,
            claiming: false,
            claim_again: false,
            wake_at: None,
            draining: false,
            limiters: Limiters::new(limit_defaults.0),
            watched,
            rate_wait: false,
            matched: Vec::new(),
        }
    }

    fn busy(&self) -> bool {
        !self.running.is_empty()
            || !self.ready.is_empty()
            || !self.awaiting_commit.is_empty()
            || !self.timers.is_empty()
            || self.claiming
    }

    /// Executions held in memory without an executor (waiting for their commit, for
    /// an executor, or on a short timer).
    /// Jobs kept in memory that hold no executor slot.
    fn held(&self) -> usize {
        self.awaiting_commit.len() + self.ready.len() + self.timers.len() + self.parked.len() + self.resuming.len()
    }

    /// Running jobs that hold an executor slot.
    fn active(&self) -> usize {
        self.running.len().saturating_sub(self.parked.len() + self.resuming.len())
    }

    /// Forgets a job that no longer runs here.
    fn stopped_running(&mut self, id: &Uuid) {
        self.running.remove(id);
        self.parked.remove(id);
        self.resuming.retain(|(r, _)| r != id);
    }

    fn generation(&self) -> u64 {
        self.deps.health.state().generation
    }

    /// Gives up the lease of a job this node will not run (its leases lapsed since the
    /// job was planned): any node may claim it again.
    fn release(&self, job: &Job) {
        leases::release_until_written(self.deps.store.clone(), self.deps.node, job.execution_id, job.epoch);
    }

    /// Starts executors while there is room, and claims from PostgreSQL when the
    /// memory queue runs dry but work may wait there.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if !matches!(self.state, LoadState::Ready) {
            return;
        }
        let concurrency = self.limiters.limits().max_concurrent as usize;
        // Steps done waiting for a client go on before new executions start.
        while self.active() < concurrency {
            let Some((_, go)) = self.resuming.pop_front() else { break };
            let _ = go.send(());
        }
        while self.active() < concurrency && !self.ready.is_empty() && !self.rate_wait {
            // Over the execution rate, executions wait (in memory or as queued rows)
            // and start when allowed; none is dropped.
            if let Err(wait) = if self.deps.limit_defaults.enabled() { self.limiters.check_execution() } else { Ok(()) } {
                m::hot().rate_limited_executions.increment(1);
                self.rate_wait = true;
                ctx.run_later(wait.max(Duration::from_millis(1)), |act, ctx| {
                    act.rate_wait = false;
                    act.pump(ctx);
                });
                break;
            }
            let Some(job) = self.ready.pop_front() else { break };
            self.start(job, ctx);
        }
        if self.backlog && !self.draining && self.ready.is_empty() && self.active() < concurrency {
            self.claim(ctx);
        }
    }

    fn start(&mut self, job: Job, ctx: &mut Context<Self>) {
        let id = job.execution_id;
        if job.generation != self.generation() {
            tracing::info!(execution_id = %id, "not starting an execution planned before this node's leases lapsed");
            self.release(&job);
            return;
        }
        // An execution whose runs keep being interrupted (its step crashes the
        // daemon, say) still comes to an end.
        let policy = Policy::resolve(job.workflow.spec.retry.as_ref(), &self.deps.retry);
        if let Some(error) = policy.gives_up_before(job.interrupted, job.attempt) {
            let mut u = job.update(Status::Dead);
            u.finished_at = Some(Utc::now());
            u.error = Some(error.clone());
            self.report_failure(&job, Status::Dead, &error);
            self.deps.journal.lane_of(id).do_send(RecordProgress { updates: vec![u], lease_lost: Some(ctx.address().recipient()), ..Default::default() });
            return;
        }
        let mut mark = job.update(Status::Running);
        mark.started_at = Some(Utc::now());
        self.deps.journal.lane_of(id).do_send(RecordProgress { updates: vec![mark], lease_lost: Some(ctx.address().recipient()), ..Default::default() });
        let started = Instant::now();
        let epoch = job.epoch;
        let fut = executor::run(job, self.env.clone());
        let handle = ctx.spawn(fut.into_actor(self).map(move |(job, end), act, ctx| {
            act.stopped_running(&job.execution_id);
            act.finish(job, end, started, ctx);
            act.pump(ctx);
        }));
        self.running.insert(id, (handle, epoch));
    }

    /// Writes how an attempt ended and what comes next.
    fn finish(&mut self, mut job: Job, end: RunEnd, started: Instant, ctx: &mut Context<Self>) {
        let now = Utc::now();
        let mut update = job.update(Status::Running);
        match end {
            RunEnd::Abandoned => {
                tracing::warn!(execution_id = %job.execution_id, "abandoned an execution: this node's leases lapsed");
                self.release(&job);
                return;
            }
            RunEnd::Succeeded => {
                update.status = Status::Succeeded;
                update.finished_at = Some(now);
                metrics::histogram!(m::EXECUTION_DURATION).record(started.elapsed().as_secs_f64());
            }
            RunEnd::Wait { until } => {
                update.status = Status::Waiting;
                update.run_after = Some(until);
                self.hold_or_release(job, &mut update, until, ctx);
            }
            RunEnd::Interrupted { error } => {
                // The same attempt again, once the heartbeat has had time to recover.
                job.ran_before = true;
                tracing::warn!(execution_id = %job.execution_id, %error, "step interrupted; trying it again under the same attempt");
                let due = now + chrono::Duration::from_std(INTERRUPTED_RETRY).unwrap_or_default();
                update.status = Status::Retrying;
                update.error = Some(error);
                update.run_after = Some(due);
                self.hold_or_release(job, &mut update, due, ctx);
            }
            RunEnd::Failed { error, retryable, retry_after } => {
                let policy = Policy::resolve(job.workflow.spec.retry.as_ref(), &self.deps.retry);
                update.error = Some(error.clone());
                match policy.after_failure(job.attempt, retryable, retry_after, now, &mut rand::thread_rng()) {
                    AfterFailure::Retry { attempt, due, wait } => {
                        metrics::counter!(m::RETRIES).increment(1);
                        tracing::info!(execution_id = %job.execution_id, attempt = job.attempt, wait_ms = wait.as_millis() as u64, "attempt failed; retrying");
                        job.attempt = attempt;
                        update.attempt = attempt;
                        update.status = Status::Retrying;
                        update.run_after = Some(due);
                        self.hold_or_release(job.clone(), &mut update, due, ctx);
                    }
                    AfterFailure::GiveUp(status) => {
                        update.status = status;
                        update.finished_at = Some(now);
                        metrics::histogram!(m::EXECUTION_DURATION).record(started.elapsed().as_secs_f64());
                        self.report_failure(&job, status, &error);
                    }
                }
            }
        }
        if let (Some(w), true) = (&self.watched, update.status.is_final()) {
            w.execution(update.status.as_str());
        }
        self.deps.journal.lane_of(update.id).do_send(RecordProgress { updates: vec![update], lease_lost: Some(ctx.address().recipient()), ..Default::default() });
    }

    /// A short wait keeps the lease and a timer here; a long one gives the lease up
    /// and is claimed again when due.
    fn hold_or_release(&mut self, job: Job, update: &mut crate::store::journal::ExecutionUpdate, due: chrono::DateTime<Utc>, ctx: &mut Context<Self>) {
        let wait = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if wait > HOLD_WAIT_MAX {
            update.release = true;
            return;
        }
        let (id, epoch) = (job.execution_id, job.epoch);
        let handle = ctx.run_later(wait, move |act, ctx| {
            if act.timers.remove(&id).is_some() {
                act.ready.push_back(job);
                act.pump(ctx);
            }
        });
        self.timers.insert(id, (handle, epoch));
    }

    fn report_failure(&self, job: &Job, status: Status, error: &str) {
        let base = Report {
            kind: Kind::Failing,
            workflow_id: Some(job.workflow.id),
            chatbot_id: Some(self.chatbot.id),
            execution_id: Some(job.execution_id),
            message: format!("workflow {:?} failed: {error}", job.workflow.spec.name),
        };
        if status == Status::Dead {
            self.deps.notifier.do_send(Report {
                kind: Kind::Dead,
                message: format!(
                    "execution {} of workflow {:?} is dead after {} attempts: {error}",
                    job.execution_id, job.workflow.spec.name, job.attempt
                ),
                ..base.clone()
            });
        }
        self.deps.notifier.do_send(base);
    }

    /// Claims due executions from PostgreSQL, as many as fit.
    fn claim(&mut self, ctx: &mut Context<Self>) {
        if self.claiming {
            self.claim_again = true;
            return;
        }
        let concurrency = self.limiters.limits().max_concurrent as usize;
        let room = self.deps.queue_capacity.saturating_sub(self.held()).min(concurrency * 2);
        if room == 0 {
            return;
        }
        self.claiming = true;
        self.claim_again = false;
        // Set again by anything that overflows to PostgreSQL while the claim runs.
        self.backlog = false;
        let (store, node, chatbot) = (self.deps.store.clone(), self.deps.node, self.chatbot.id);
        let ttl = self.deps.health.ttl();
        let generation = self.generation();
        let index = self.index.clone();
        let versions = self.versions.clone();
        let fut = async move {
            let claimed = leases::claim(&store, node, chatbot, ttl, room as i64).await?;
            let mut jobs = Vec::with_capacity(claimed.len());
            let mut failed = Vec::new();
            let mut compiled = versions;
            for c in claimed {
                match workflow_for(&store, &index, &mut compiled, c.workflow_id, c.workflow_version).await {
                    Ok(w) => jobs.push(job_from(c, w, generation)),
                    Err(WorkflowError::Transient(error)) => {
                        // Not the execution's fault: let it go, to be claimed again.
                        tracing::warn!(%error, execution_id = %c.id, "cannot load a workflow version now; releasing the execution");
                        leases::release_until_written(store.clone(), node, c.id, c.epoch);
                    }
                    Err(WorkflowError::Permanent(error)) => failed.push((c, error)),
                }
            }
            Ok::<_, StoreError>((jobs, failed, compiled, room))
        };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
            act.claiming = false;
            match res {
                Ok((jobs, failed, compiled, room)) => {
                    act.versions = compiled;
                    let n = jobs.len() + failed.len();
                    if n > 0 {
                        tracing::debug!(chatbot_id = %act.chatbot.id, claimed = n, "claimed executions");
                    }
                    // A full claim means more may be waiting.
                    act.backlog |= n >= room;
                    for (c, error) in failed {
                        tracing::error!(%error, execution_id = %c.id, "cannot load the workflow version of a claimed execution");
                        let mut u = crate::store::journal::ExecutionUpdate {
                            id: c.id,
                            epoch: c.epoch,
                            status: Status::Failed,
                            attempt: c.attempt,
                            step_index: c.step_index,
                            outputs: None,
                            run_after: None,
                            started_at: None,
                            finished_at: Some(Utc::now()),
                            error: Some(format!("the workflow version cannot be loaded: {error}")),
                            release: false,
                            steps: Vec::new(),
                        };
                        u.started_at = u.finished_at;
                        act.deps.journal.lane_of(u.id).do_send(RecordProgress { updates: vec![u], ..Default::default() });
                    }
                    act.ready.extend(jobs);
                }
                Err(error) => {
                    metrics::counter!(m::DB_ERRORS, "kind" => error.kind()).increment(1);
                    tracing::warn!(%error, chatbot_id = %act.chatbot.id, "cannot claim executions; trying again shortly");
                    act.backlog = true;
                    ctx.run_later(Duration::from_millis(500), |act, ctx| act.pump(ctx));
                }
            }
            if act.claim_again {
                act.backlog = true;
            }
            act.pump(ctx);
        }));
    }
}

fn job_from(c: Claimed, workflow: Arc<CompiledWorkflow>, generation: u64) -> Job {
    Job {
        generation,
        interrupted: c.status == "running",
        ran_before: false,
        execution_id: c.id,
        epoch: c.epoch,
        attempt: c.attempt,
        workflow,
        event: Arc::new(c.event),
        conversation_id: Arc::from(c.conversation_id.as_str()),
        step_index: c.step_index.max(0) as usize,
        outputs: Arc::new(c.outputs),
    }
}

enum WorkflowError {
    /// The database failed to answer: the execution is fine, try later.
    Transient(String),
    /// The stored version cannot be read or compiled: the execution cannot run.
    Permanent(String),
}

/// The compiled workflow an execution runs: the current one when the version matches,
/// else the stored version (compiled once, then cached).
async fn workflow_for(
    store: &Store,
    index: &TriggerIndex,
    cache: &mut HashMap<(Uuid, i32), Arc<CompiledWorkflow>>,
    id: Uuid,
    version: i32,
) -> Result<Arc<CompiledWorkflow>, WorkflowError> {
    if let Some(w) = index.workflows().iter().find(|w| w.id == id && w.version == version) {
        return Ok(w.clone());
    }
    if let Some(w) = cache.get(&(id, version)) {
        return Ok(w.clone());
    }
    let definition = match leases::workflow_version(store, id, version).await {
        Ok(d) => d,
        Err(e) if e.is_transient() => return Err(WorkflowError::Transient(e.to_string())),
        Err(e) => return Err(WorkflowError::Permanent(e.to_string())),
    };
    let spec: WorkflowSpec = serde_json::from_value(definition).map_err(|e| WorkflowError::Permanent(e.to_string()))?;
    let w = Arc::new(CompiledWorkflow::compile(id, version, spec).map_err(|e| WorkflowError::Permanent(e.to_string()))?);
    cache.insert((id, version), w.clone());
    Ok(w)
}

/// Reads and compiles a chatbot's enabled workflows. A stored workflow this binary
/// cannot compile is skipped with an error in the log rather than blocking the others.
async fn load_index(store: Store, chatbot_id: Uuid) -> Result<TriggerIndex, StoreError> {
    let stored = workflows::load_enabled(&store, chatbot_id).await?;
    // Compiling thousands of workflows (regexes, the keyword automaton) takes a while:
    // off the worker thread that serves connections.
    tokio::task::spawn_blocking(move || compile_index(stored))
        .await
        .map_err(|e| StoreError::Invalid(format!("building the trigger index failed: {e}")))
}

fn compile_index(stored: Vec<workflows::StoredWorkflow>) -> TriggerIndex {
    let mut compiled = Vec::with_capacity(stored.len());
    for w in stored {
        let spec: WorkflowSpec = match serde_json::from_value(w.definition) {
            Ok(s) => s,
            Err(error) => {
                tracing::error!(%error, workflow_id = %w.id, "stored workflow cannot be read; skipping it");
                continue;
            }
        };
        match CompiledWorkflow::compile(w.id, w.version, spec) {
            Ok(c) => compiled.push(Arc::new(c)),
            Err(error) => tracing::error!(%error, workflow_id = %w.id, "stored workflow is invalid; skipping it"),
        }
    }
    TriggerIndex::build(compiled)
}

impl Actor for ChatbotSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Events must not be matched before the index exists: `wait` holds the mailbox.
        let store = self.deps.store.clone();
        let chatbot_id = self.chatbot.id;
        let deadline = self.deps.unavailable_after;
        let fut = async move {
            let start = Instant::now();
            loop {
                let loaded = match load_index(store.clone(), chatbot_id).await {
                    Ok(index) => limit_store::get(&store, chatbot_id).await.map(|o| (index, o)),
                    Err(e) => Err(e),
                };
                match loaded {
                    Ok(loaded) => return Some(loaded),
                    Err(error) if error.is_transient() && start.elapsed() < deadline => {
                        tracing::debug!(%error, %chatbot_id, "cannot load workflows yet");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(error) => {
                        metrics::counter!(m::DB_ERRORS, "kind" => error.kind()).increment(1);
                        tracing::warn!(%error, %chatbot_id, "cannot load workflows; nacking events until it can");
                        return None;
                    }
                }
            }
        };
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
            Some((index, overrides)) => {
                act.limiters.update(act.deps.limit_defaults.resolve(&overrides));
                act.index = Arc::new(index);
                act.state = LoadState::Ready;
                tracing::debug!(chatbot_id = %act.chatbot.id, workflows = act.index.len(), "chatbot supervisor started");
                act.pump(ctx);
            }
            None => {
                act.state = LoadState::Unavailable;
                ctx.notify_later(Reload, Duration::from_secs(1));
            }
        }));
    }
}

impl Handler<SupervisorEvents> for ChatbotSupervisor {
    type Result = ();

    fn handle(&mut self, msg: SupervisorEvents, ctx: &mut Context<Self>) {
        let SupervisorEvents { source, events, received_at, answers: batch } = msg;
        let reply_to = batch.reply_to().clone();
        let received = events.len() as u64;
        if !matches!(self.state, LoadState::Ready) {
            let nack = Nack::new(NackCode::Unavailable, "the chatbot's workflows cannot be loaded (database unreachable); send the event again later");
            let n = batch.nack_all(events.into_iter().map(|e| (e.id, received_at)), &nack);
            m::hot().rejected(nack.code).increment(n as u64);
            return;
        }
        let mut answers = Vec::new();
        let mut pending = Vec::new();
        let mut matches = 0u64;
        let mut limited = 0u64;
        let index = self.index.clone();
        let mut room = self.deps.queue_capacity.saturating_sub(self.held());
        let generation = self.generation();
        let lane = self.deps.journal.lane_for(self.chatbot.id, source);
        for event in events {
            if let Err(wait) = if self.deps.limit_defaults.enabled() { self.limiters.check_event() } else { Ok(()) } {
                limited += 1;
                let nack = admission::rate_limited(self.chatbot.id, &self.limiters.limits(), wait);
                answers.push((event.id, Outcome::Nack(nack), received_at));
                continue;
            }
            let doc = match admission::admit(&index, &event, &mut self.matched) {
                Ok(doc) => doc,
                Err(outcome) => {
                    if let Outcome::Nack(nack) = &outcome {
                        m::hot().rejected(nack.code).increment(1);
                    }
                    answers.push((event.id, outcome, received_at));
                    continue;
                }
            };
            matches += self.matched.len() as u64;
            let new_id = || self.deps.journal.new_execution_id(lane);
            let (planned, jobs) = admission::plan(&index, &self.matched, doc, &event.conversation_id, &mut room, generation, new_id);
            // Past the memory bound, executions wait in PostgreSQL, unleased.
            self.backlog |= jobs.len() < planned.len();
            for job in jobs {
                self.awaiting_commit.insert(job.execution_id, job);
            }
            pending.push(PendingEvent { event, received_at, executions: planned, reply_to: reply_to.clone() });
        }
        if matches > 0 {
            m::hot().trigger_matches.increment(matches);
        }
        if limited > 0 {
            let hot = m::hot();
            hot.rate_limited_events.increment(limited);
            hot.rejected(NackCode::RateLimited).increment(limited);
        }
        if let Some(w) = &self.watched {
            w.events.increment(received);
            w.rate_limited.increment(limited);
        }
        batch.add(answers);
        if !pending.is_empty() {
            self.deps.journal.lane(lane).do_send(RecordExecutions { events: pending, supervisor: ctx.address().recipient() });
        }
    }
}

impl Handler<ExecutionsCommitted> for ChatbotSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ExecutionsCommitted, ctx: &mut Context<Self>) {
        for id in msg.dropped {
            self.awaiting_commit.remove(&id);
        }
        for id in msg.committed {
            if let Some(job) = self.awaiting_commit.remove(&id) {
                self.ready.push_back(job);
            }
        }
        self.pump(ctx);
    }
}

impl Handler<Parking> for ChatbotSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Parking, ctx: &mut Context<Self>) {
        match msg {
            Parking::Parked(id) if self.running.contains_key(&id) => {
                self.parked.insert(id);
            }
            Parking::Resume(id, go) if self.running.contains_key(&id) => {
                self.parked.remove(&id);
                self.resuming.push_back((id, go));
            }
            // Not running here any more (stopped meanwhile): nothing to give.
            Parking::Parked(_) | Parking::Resume(..) => return,
        }
        self.pump(ctx);
    }
}

impl Handler<LeaseLost> for ChatbotSupervisor {
    type Result = ();

    fn handle(&mut self, msg: LeaseLost, ctx: &mut Context<Self>) {
        for (id, epoch) in msg.0 {
            // Only what runs under that epoch; a later claim of ours stands.
            if self.running.get(&id).is_some_and(|(_, e)| *e == epoch) {
                if let Some((h, _)) = self.running.get(&id).copied() {
                    self.stopped_running(&id);
                    ctx.cancel_future(h);
                    tracing::warn!(execution_id = %id, "stopped an execution another node took over");
                }
            }
            if self.timers.get(&id).is_some_and(|(_, e)| *e == epoch) {
                if let Some((h, _)) = self.timers.remove(&id) {
                    ctx.cancel_future(h);
                }
            }
            self.ready.retain(|j| !(j.execution_id == id && j.epoch == epoch));
        }
        self.pump(ctx);
    }
}

impl Handler<WakeUp> for ChatbotSupervisor {
    type Result = ();

    fn handle(&mut self, msg: WakeUp, ctx: &mut Context<Self>) {
        self.backlog = true;
        let wait = (msg.due_at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if wait.is_zero() {
            self.pump(ctx);
        } else if self.wake_at.is_none_or(|at| msg.due_at < at) {
            self.wake_at = Some(msg.due_at);
            ctx.run_later(wait, |act, ctx| {
                act.wake_at = None;
                act.backlog = true;
                act.pump(ctx);
            });
        }
    }
}

impl Handler<Reload> for ChatbotSupervisor {
    type Result = ();

    fn handle(&mut self, _msg: Reload, ctx: &mut Context<Self>) {
        self.reload_generation += 1;
        let generation = self.reload_generation;
        let store = self.deps.store.clone();
        let chatbot_id = self.chatbot.id;
        ctx.spawn(load_index(store, chatbot_id).into_actor(self).map(move |res, act, ctx| {
            // A newer reload was asked for meanwhile; its result wins.
            if generation != act.reload_generation {
                return;
            }
            match res {
                Ok(index) => {
                    metrics::counter!(m::WORKFLOW_RELOADS).increment(1);
                    tracing::info!(%chatbot_id, workflows = index.len(), "workflows reloaded");
                    act.index = Arc::new(index);
                    act.state = LoadState::Ready;
                    act.pump(ctx);
                }
                Err(error) => {
                    metrics::counter!(m::DB_ERRORS, "kind" => error.kind()).increment(1);
                    tracing::warn!(%error, %chatbot_id, "cannot reload workflows; retrying");
                    ctx.notify_later(Reload, Duration::from_secs(1));
                }
            }
        }));
    }
}

impl Handler<LimitsChanged> for ChatbotSupervisor {
    type Result = ();

    fn handle(&mut self, _msg: LimitsChanged, ctx: &mut Context<Self>) {
        let store = self.deps.store.clone();
        let chatbot_id = self.chatbot.id;
        ctx.spawn(async move { limit_store::get(&store, chatbot_id).await }.into_actor(self).map(move |res, act, ctx| {
            match res {
                Ok(overrides) => {
                    let limits = act.deps.limit_defaults.resolve(&overrides);
                    // The admin API of this node may have applied them already.
                    if act.limiters.limits() != limits {
                        tracing::info!(%chatbot_id, ?limits, "rate limits changed");
                        metrics::counter!(m::LIMIT_CHANGES).increment(1);
                        act.limiters.update(limits);
                        act.pump(ctx);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, %chatbot_id, "cannot read changed rate limits; retrying");
                    ctx.notify_later(LimitsChanged, Duration::from_secs(1));
                }
            }
        }));
    }
}

impl Handler<GetUsage> for ChatbotSupervisor {
    type Result = MessageResult<GetUsage>;

    fn handle(&mut self, _msg: GetUsage, _ctx: &mut Context<Self>) -> Self::Result {
        let usage = self.limiters.usage(self.running.len() as u32, self.held() as u32);
        MessageResult((self.limiters.limits(), usage))
    }
}

impl Handler<ApplyLimits> for ChatbotSupervisor {
    type Result = MessageResult<ApplyLimits>;

    fn handle(&mut self, msg: ApplyLimits, ctx: &mut Context<Self>) -> Self::Result {
        if self.limiters.limits() != msg.0 {
            tracing::info!(chatbot_id = %self.chatbot.id, limits = ?msg.0, "rate limits changed");
            metrics::counter!(m::LIMIT_CHANGES).increment(1);
            self.limiters.update(msg.0);
            self.pump(ctx);
        }
        let usage = self.limiters.usage(self.running.len() as u32, self.held() as u32);
        MessageResult((self.limiters.limits(), usage))
    }
}

impl Handler<StopIfIdle> for ChatbotSupervisor {
    type Result = bool;

    fn handle(&mut self, _msg: StopIfIdle, ctx: &mut Context<Self>) -> bool {
        if self.busy() {
            return false;
        }
        ctx.stop();
        true
    }
}

impl Handler<Retire> for ChatbotSupervisor {
    type Result = ();

    fn handle(&mut self, _msg: Retire, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Drain> for ChatbotSupervisor {
    type Result = ();

    fn handle(&mut self, _msg: Drain, _ctx: &mut Context<Self>) {
        self.draining = true;
    }
}

impl Handler<IsBusy> for ChatbotSupervisor {
    type Result = bool;

    fn handle(&mut self, _msg: IsBusy, _ctx: &mut Context<Self>) -> bool {
        // Short waits are not work in flight: they are in the database and are
        // claimed again after a restart.
        !self.running.is_empty() || !self.ready.is_empty() || !self.awaiting_commit.is_empty() || self.claiming
    }
}
