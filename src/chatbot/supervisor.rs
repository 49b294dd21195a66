//! The ChatbotSupervisor actor: one per chatbot, owning that chatbot's compiled
//! `TriggerIndex` and its bounded executor pool.
//!
//! Events arrive from the Router in batches. An event whose type no workflow listens
//! to is acked at once without parsing its JSON; one with candidates is parsed and
//! matched, its executions are planned (ids chosen here) and sent to the chatbot's
//! journal lane, which acks the event after the commit and hands the committed ids
//! back. Only then are the steps run, at most `concurrency_per_chatbot` executions at
//! a time; committed executions waiting for an executor are bounded by
//! `queue_capacity`, past which matching events are nacked `overloaded`.
//!
//! Workflow changes rebuild the index in the background and swap it in; events keep
//! flowing against the old index meanwhile, so none is lost or matched twice.

use super::executor::{self, ExecEnv, Job};
use super::triggers::TriggerIndex;
use crate::event::Event;
use crate::ingest::connection::EventOutcomes;
use crate::ingest::protocol::{Nack, NackCode, Outcome};
use crate::outbox::Outbox;
use crate::store::accounts::ChatbotRecord;
use crate::store::journal::{ExecutionsCommitted, Journal, JournalLane, PendingEvent, PlannedExecution, RecordExecutions, RecordProgress};
use crate::store::{workflows, Store, StoreError};
use crate::telemetry::metrics as m;
use crate::workflow::{CompiledWorkflow, WorkflowSpec};
use actix::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// What every supervisor shares.
pub struct SupervisorDeps {
    pub store: Store,
    pub journal: Journal,
    pub outbox: Addr<Outbox>,
    pub http: reqwest::Client,
    pub concurrency: usize,
    pub queue_capacity: usize,
    pub unavailable_after: Duration,
    pub notify_url: Option<String>,
}

/// Sent by the Router: events of this chatbot in the order their connection sent them.
/// Every event is answered once on `reply_to` (here, or by the journal after commit).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SupervisorEvents {
    pub events: Vec<Event>,
    pub received_at: Instant,
    pub reply_to: Recipient<EventOutcomes>,
}

/// Sent by the Router when this chatbot's workflows changed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reload;

/// Sent by the Router to an idle supervisor: stop if nothing is in flight. `true`: stopped.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct StopIfIdle;

/// Whether executions are planned, waiting or running (for shutdown).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct IsBusy;

/// Internal: write the progress gathered during this turn of the mailbox.
#[derive(Message)]
#[rtype(result = "()")]
struct FlushProgress;

/// An execution between planning and the end of its steps.
struct Prepared {
    workflow: Arc<CompiledWorkflow>,
    event: Arc<serde_json::Value>,
    conversation_id: Arc<str>,
}

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
    lane: Addr<JournalLane>,
    index: Arc<TriggerIndex>,
    state: LoadState,
    reload_generation: u64,
    /// Planned, waiting for the journal's commit.
    awaiting_commit: HashMap<Uuid, Prepared>,
    /// Committed, waiting for an executor.
    ready: VecDeque<(Uuid, Prepared)>,
    running: usize,
    progress: RecordProgress,
    progress_scheduled: bool,
    matched: Vec<u32>,
}

impl ChatbotSupervisor {
    pub fn new(chatbot: Arc<ChatbotRecord>, deps: Arc<SupervisorDeps>) -> ChatbotSupervisor {
        let env = Arc::new(ExecEnv::from_deps(&deps, chatbot.clone()));
        ChatbotSupervisor {
            lane: deps.journal.lane_for(chatbot.id),
            chatbot,
            deps,
            env,
            index: Arc::new(TriggerIndex::empty()),
            state: LoadState::Loading,
            reload_generation: 0,
            awaiting_commit: HashMap::new(),
            ready: VecDeque::new(),
            running: 0,
            progress: RecordProgress::default(),
            progress_scheduled: false,
            matched: Vec::new(),
        }
    }

    fn busy(&self) -> bool {
        self.running > 0 || !self.ready.is_empty() || !self.awaiting_commit.is_empty() || self.progress_scheduled
    }

    /// Starts executors while there is room.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        while self.running < self.deps.concurrency {
            let Some((id, p)) = self.ready.pop_front() else { break };
            self.running += 1;
            let now = chrono::Utc::now();
            self.progress.started.push((id, now));
            let job = Job {
                execution_id: id,
                workflow: p.workflow,
                event: p.event,
                conversation_id: p.conversation_id,
                started_at: now,
            };
            let fut = executor::run(job, self.env.clone());
            ctx.spawn(fut.into_actor(self).map(|result, act, ctx| {
                act.running -= 1;
                act.progress.finished.push(result);
                act.schedule_progress(ctx);
                act.pump(ctx);
            }));
        }
        if !self.progress.started.is_empty() {
            self.schedule_progress(ctx);
        }
    }

    /// Coalesces the progress of everything handled before the flush message comes up.
    fn schedule_progress(&mut self, ctx: &mut Context<Self>) {
        if !self.progress_scheduled {
            self.progress_scheduled = true;
            ctx.notify(FlushProgress);
        }
    }
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
                match load_index(store.clone(), chatbot_id).await {
                    Ok(index) => return Some(index),
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
            Some(index) => {
                act.index = Arc::new(index);
                act.state = LoadState::Ready;
                tracing::debug!(chatbot_id = %act.chatbot.id, workflows = act.index.len(), "chatbot supervisor started");
            }
            None => {
                act.state = LoadState::Unavailable;
                ctx.notify_later(Reload, Duration::from_secs(1));
            }
        }));
    }

    fn stopping(&mut self, _ctx: &mut Context<Self>) -> Running {
        if !self.progress.started.is_empty() || !self.progress.finished.is_empty() {
            self.lane.do_send(std::mem::take(&mut self.progress));
        }
        Running::Stop
    }
}

impl Handler<SupervisorEvents> for ChatbotSupervisor {
    type Result = ();

    fn handle(&mut self, msg: SupervisorEvents, ctx: &mut Context<Self>) {
        let SupervisorEvents { events, received_at, reply_to } = msg;
        let hot = m::hot();
        if !matches!(self.state, LoadState::Ready) {
            let nack = Nack::new(NackCode::Unavailable, "the chatbot's workflows cannot be loaded (database unreachable); send the event again later");
            EventOutcomes::nack_all(&reply_to, events.into_iter().map(|e| (e.id, received_at)), &nack);
            return;
        }
        let mut answers = Vec::new();
        let mut pending = Vec::new();
        let mut matches = 0u64;
        let mut overloaded = 0u64;
        let index = self.index.clone();
        for event in events {
            if !index.has_candidates(&event.kind) {
                answers.push((event.id, Outcome::Ack { executions: Vec::new(), duplicate: false }, received_at));
                continue;
            }
            let doc = match event.document() {
                Ok(d) => d,
                Err(error) => {
                    // Cannot happen for a line the codec accepted; answer rather than panic.
                    tracing::error!(%error, event_id = %event.id, "accepted event does not parse");
                    answers.push((event.id, Outcome::Nack(Nack::new(NackCode::Internal, "the event could not be read")), received_at));
                    continue;
                }
            };
            index.match_event(&event.kind, &doc, &mut self.matched);
            if self.matched.is_empty() {
                answers.push((event.id, Outcome::Ack { executions: Vec::new(), duplicate: false }, received_at));
                continue;
            }
            // Bounded by executions waiting for an executor; an event is never refused
            // for its own number of matches alone.
            if !self.ready.is_empty() && self.ready.len() + self.matched.len() > self.deps.queue_capacity {
                overloaded += 1;
                let mut nack = Nack::new(
                    NackCode::Overloaded,
                    format!("chatbot {} has {} executions waiting; send the event again later", self.chatbot.id, self.ready.len()),
                );
                nack.retry_after_ms = Some(1000);
                answers.push((event.id, Outcome::Nack(nack), received_at));
                continue;
            }
            matches += self.matched.len() as u64;
            let doc = Arc::new(doc);
            let conversation_id: Arc<str> = Arc::from(&*event.conversation_id);
            let mut planned = Vec::with_capacity(self.matched.len());
            for &i in &self.matched {
                let workflow = index.workflow(i).clone();
                let execution_id = Uuid::now_v7();
                planned.push(PlannedExecution { execution_id, workflow_id: workflow.id, workflow_version: workflow.version });
                self.awaiting_commit.insert(
                    execution_id,
                    Prepared { workflow, event: doc.clone(), conversation_id: conversation_id.clone() },
                );
            }
            pending.push(PendingEvent { event, received_at, executions: planned, reply_to: reply_to.clone() });
        }
        if matches > 0 {
            hot.trigger_matches.increment(matches);
        }
        if overloaded > 0 {
            hot.rejected(NackCode::Overloaded).increment(overloaded);
        }
        if !answers.is_empty() {
            reply_to.do_send(EventOutcomes(answers));
        }
        if !pending.is_empty() {
            self.lane.do_send(RecordExecutions { events: pending, supervisor: ctx.address().recipient() });
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
            if let Some(p) = self.awaiting_commit.remove(&id) {
                self.ready.push_back((id, p));
            }
        }
        self.pump(ctx);
    }
}

impl Handler<FlushProgress> for ChatbotSupervisor {
    type Result = ();

    fn handle(&mut self, _msg: FlushProgress, _ctx: &mut Context<Self>) {
        self.progress_scheduled = false;
        if !self.progress.started.is_empty() || !self.progress.finished.is_empty() {
            self.lane.do_send(std::mem::take(&mut self.progress));
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

impl Handler<IsBusy> for ChatbotSupervisor {
    type Result = bool;

    fn handle(&mut self, _msg: IsBusy, _ctx: &mut Context<Self>) -> bool {
        self.busy()
    }
}
