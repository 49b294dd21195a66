//! The Router actor: chatbot id → its `ChatbotSupervisor`.
//!
//! Connections send each batch of events here; the router splits it by chatbot,
//! checks that the connection's key may reach each chatbot, and forwards one message
//! per chatbot. Being the only sender of events to supervisors is what keeps the
//! protocol's ordering promise (events of one chatbot from one connection are matched
//! in the order sent) and lets it stop idle supervisors without losing an event:
//!
//! - first use: the chatbot row is loaded (events that arrive meanwhile wait in
//!   order); the supervisor is started on a worker arbiter by the first event the
//!   sender may send there, so another account's events never start one;
//! - idle: the router takes the supervisor out of service, asks it to stop, and holds
//!   that chatbot's new events until the answer (busy: back in service; stopped: a new
//!   supervisor takes the held events);
//! - workflow changes (LISTEN/NOTIFY) are passed to the running supervisor; a rotated
//!   webhook secret is put into the chatbot's record, which its supervisor shares;
//! - deleted (by the admin API here, or announced by NOTIFY): the supervisor is told to
//!   stop after the events already sent to it, and the chatbot is answered as unknown.
//!
//! Forwarding costs a hash lookup per chatbot per batch, not per event.

use crate::chatbot::limits::{Limits, Usage};
use crate::chatbot::supervisor::{
    ApplyLimits, ChatbotSupervisor, GetUsage, LimitsChanged, Reload, Retire, StopIfIdle, SupervisorDeps, SupervisorEvents,
    WakeUp,
};
use crate::event::Event;
use crate::store::accounts::{self, ChatbotRecord, Scope};
use crate::store::listen::Change;
use crate::telemetry::metrics as m;
use crate::wire::{BatchAnswers, EventOutcomes, Nack, NackCode};
use actix::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Sent by a connection: events in the order read. Each event is answered exactly once
/// with an `EventOutcomes` to `reply_to` (by the router, a supervisor or the journal).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RouteEvents {
    pub scope: Scope,
    /// The connection (or request) the events came from; see `SupervisorEvents::source`.
    pub source: u64,
    pub events: Vec<Event>,
    pub received_at: Instant,
    pub reply_to: Recipient<EventOutcomes>,
}

/// Sent by the scheduler (and the change listener, for replays): this chatbot has
/// executions due at `due_at` that no live node holds. The supervisor is started if
/// none runs.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Wake {
    pub chatbot_id: Uuid,
    pub due_at: chrono::DateTime<chrono::Utc>,
}

/// Sent by the change listener: reload the workflows of one chatbot, or of all.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkflowsChanged(pub Change);

/// Sent by the daemon at shutdown: how many supervisors have work in flight now. The
/// first one also tells every supervisor to claim nothing new.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct BusySupervisors;

/// One chatbot's share of a batch, on its way (or held while its chatbot's
/// supervisor starts or stops).
struct Held {
    scope: Scope,
    source: u64,
    events: Vec<Event>,
    received_at: Instant,
    answers: Arc<BatchAnswers>,
}

enum Slot {
    /// The chatbot row is being read (by load `gen`); batches wait in order.
    Loading { waiting: Vec<Held>, gen: u64 },
    /// The chatbot exists; no supervisor runs for it.
    Known { record: Arc<ChatbotRecord>, since: Instant },
    Ready { record: Arc<ChatbotRecord>, addr: Addr<ChatbotSupervisor>, last_event: Instant },
    /// Asked to stop because idle; batches wait for the answer, and a workflow change
    /// that arrives meanwhile is passed on if it stays (a deletion: it is retired).
    Stopping { held: Vec<Held>, reload: bool, deleted: bool },
    /// No such chatbot, remembered briefly so a flood of bad ids costs no queries.
    Missing { until: Instant },
}

pub struct Router {
    deps: Arc<SupervisorDeps>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    slots: HashMap<Uuid, Slot>,
    /// Wakes for chatbots being loaded, delivered once they are.
    wakes: HashMap<Uuid, Wake>,
    /// Shutting down: no supervisor is started for wakes.
    draining: bool,
    idle_after: Duration,
    /// Numbers loads, so a load that answers after its slot was given up (the chatbot
    /// deleted meanwhile) cannot fill a later load's slot.
    loads: u64,
}

impl Router {
    pub fn new(deps: Arc<SupervisorDeps>, arbiters: Vec<ArbiterHandle>, idle_after: Duration) -> Router {
        Router {
            deps,
            arbiters,
            next_arbiter: 0,
            slots: HashMap::new(),
            wakes: HashMap::new(),
            draining: false,
            idle_after,
            loads: 0,
        }
    }

    fn supervisors_active(&self) -> usize {
        self.slots.values().filter(|s| matches!(s, Slot::Ready { .. } | Slot::Stopping { .. })).count()
    }

    fn publish_gauge(&self) {
        metrics::gauge!(m::SUPERVISORS_ACTIVE).set(self.supervisors_active() as f64);
    }

    /// Routes one chatbot's share of a batch.
    fn route(&mut self, chatbot_id: Uuid, held: Held, ctx: &mut Context<Self>) {
        // A supervisor whose thread died cannot answer: start a new one.
        if let Some(Slot::Ready { record, addr, .. }) = self.slots.get(&chatbot_id) {
            if !addr.connected() {
                tracing::error!(%chatbot_id, "chatbot supervisor is gone; starting a new one");
                let record = record.clone();
                self.slots.insert(chatbot_id, Slot::Known { record, since: Instant::now() });
            }
        }
        if let Some(Slot::Known { record, .. }) = self.slots.get(&chatbot_id) {
            if held.scope.allows(record.account_id) {
                let record = record.clone();
                let addr = self.start_supervisor(record.clone());
                self.slots.insert(chatbot_id, Slot::Ready { record, addr, last_event: Instant::now() });
                self.publish_gauge();
            }
        }
        match self.slots.get_mut(&chatbot_id) {
            Some(Slot::Known { .. }) => nack_all(held, not_yours(chatbot_id)),
            Some(Slot::Ready { record, addr, last_event }) => {
                if held.scope.allows(record.account_id) {
                    // Only the owner's events keep a supervisor from being reaped as idle.
                    *last_event = Instant::now();
                    addr.do_send(SupervisorEvents {
                        source: held.source,
                        events: held.events,
                        received_at: held.received_at,
                        answers: held.answers,
                    });
                } else {
                    nack_all(held, not_yours(chatbot_id));
                }
            }
            Some(Slot::Loading { waiting, .. }) => waiting.push(held.detached()),
            Some(Slot::Stopping { held: waiting, .. }) => waiting.push(held.detached()),
            Some(Slot::Missing { until }) if *until > Instant::now() => nack_all(held, unknown(chatbot_id)),
            Some(Slot::Missing { .. }) | None => self.load(chatbot_id, vec![held.detached()], ctx),
        }
    }

    /// Reads the chatbot row; `waiting` are answered once it is read.
    fn load(&mut self, chatbot_id: Uuid, waiting: Vec<Held>, ctx: &mut Context<Self>) {
        self.loads += 1;
        let gen = self.loads;
        self.slots.insert(chatbot_id, Slot::Loading { waiting, gen });
        let store = self.deps.store.clone();
        let fut = async move { accounts::get_chatbot(&store, chatbot_id).await };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let waiting = match act.slots.remove(&chatbot_id) {
                Some(Slot::Loading { waiting, gen: g }) if g == gen => waiting,
                Some(other) => {
                    act.slots.insert(chatbot_id, other);
                    return;
                }
                None => return,
            };
            match res {
                Ok(Some(record)) => {
                    act.slots.insert(chatbot_id, Slot::Known { record: Arc::new(record), since: Instant::now() });
                    for held in waiting {
                        act.route(chatbot_id, held, ctx);
                    }
                    if let Some(wake) = act.wakes.remove(&chatbot_id) {
                        act.wake(wake, ctx);
                    }
                }
                Ok(None) => {
                    act.wakes.remove(&chatbot_id);
                    act.slots.insert(chatbot_id, Slot::Missing { until: Instant::now() + Duration::from_secs(1) });
                    for held in waiting {
                        nack_all(held, unknown(chatbot_id));
                    }
                }
                Err(error) => {
                    metrics::counter!(m::DB_ERRORS, "kind" => error.kind()).increment(1);
                    tracing::warn!(%error, %chatbot_id, "cannot load chatbot");
                    for held in waiting {
                        nack_all(
                            held,
                            Nack::new(NackCode::Unavailable, "the database is unreachable; send the event again later"),
                        );
                    }
                }
            }
        }));
    }

    /// Passes a wake to the chatbot's supervisor, starting one if needed.
    fn wake(&mut self, wake: Wake, ctx: &mut Context<Self>) {
        let chatbot_id = wake.chatbot_id;
        if let Some(Slot::Known { record, .. }) = self.slots.get(&chatbot_id) {
            let record = record.clone();
            let addr = self.start_supervisor(record.clone());
            self.slots.insert(chatbot_id, Slot::Ready { record, addr, last_event: Instant::now() });
            self.publish_gauge();
        }
        match self.slots.get_mut(&chatbot_id) {
            Some(Slot::Ready { addr, last_event, .. }) => {
                *last_event = Instant::now();
                addr.do_send(WakeUp { due_at: wake.due_at });
            }
            Some(Slot::Loading { .. }) => {
                self.wakes.insert(chatbot_id, wake);
            }
            // The next scan wakes it again once the stop is settled.
            Some(Slot::Stopping { .. }) | Some(Slot::Missing { .. }) | Some(Slot::Known { .. }) => {}
            None => {
                self.wakes.insert(chatbot_id, wake);
                self.load(chatbot_id, Vec::new(), ctx);
            }
        }
    }

    fn start_supervisor(&mut self, record: Arc<ChatbotRecord>) -> Addr<ChatbotSupervisor> {
        let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
        self.next_arbiter = self.next_arbiter.wrapping_add(1);
        let deps = self.deps.clone();
        ChatbotSupervisor::start_in_arbiter(arbiter, move |ctx| {
            // The router is the only sender and every event it sends is bounded by a
            // connection's in-flight window, so the mailbox need not be.
            ctx.set_mailbox_capacity(0);
            ChatbotSupervisor::new(record, deps, ctx.address())
        })
    }

    /// Takes idle supervisors out of service and asks them to stop.
    fn reap_idle(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let idle: Vec<Uuid> = self
            .slots
            .iter()
            .filter_map(|(id, s)| match s {
                Slot::Ready { last_event, .. } if now.duration_since(*last_event) >= self.idle_after => Some(*id),
                Slot::Known { since, .. } if now.duration_since(*since) >= self.idle_after => Some(*id),
                Slot::Missing { until } if *until <= now => Some(*id),
                _ => None,
            })
            .collect();
        for chatbot_id in idle {
            let Some(slot) = self.slots.remove(&chatbot_id) else { continue };
            let Slot::Ready { record, addr, .. } = slot else { continue };
            self.slots.insert(chatbot_id, Slot::Stopping { held: Vec::new(), reload: false, deleted: false });
            let fut = addr.send(StopIfIdle);
            ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
                let (held, reload, deleted) = match act.slots.remove(&chatbot_id) {
                    Some(Slot::Stopping { held, reload, deleted }) => (held, reload, deleted),
                    Some(other) => {
                        act.slots.insert(chatbot_id, other);
                        return;
                    }
                    None => (Vec::new(), false, false),
                };
                if deleted {
                    addr.do_send(Retire);
                    act.slots.insert(chatbot_id, Slot::Missing { until: Instant::now() + Duration::from_secs(1) });
                    for h in held {
                        nack_all(h, unknown(chatbot_id));
                    }
                    act.publish_gauge();
                    return;
                }
                match res {
                    Ok(false) => {
                        if reload {
                            addr.do_send(Reload);
                        }
                        act.slots.insert(chatbot_id, Slot::Ready { record, addr, last_event: Instant::now() });
                    }
                    // Stopped (or already gone): the next event starts a fresh one,
                    // which reads the workflows as they are then.
                    Ok(true) | Err(_) => {
                        tracing::debug!(%chatbot_id, "stopped idle chatbot supervisor");
                        act.slots.insert(chatbot_id, Slot::Known { record, since: Instant::now() });
                    }
                }
                for h in held {
                    act.route(chatbot_id, h, ctx);
                }
                act.publish_gauge();
            }));
        }
    }
}

/// Splits a batch by chatbot, keeping each chatbot's events in the order sent (which
/// is what the protocol promises), chatbots in the order they first appear.
fn by_chatbot(events: Vec<Event>) -> Vec<(Uuid, Vec<Event>)> {
    let mut groups: Vec<(Uuid, Vec<Event>)> = Vec::new();
    for e in events {
        // A batch names few chatbots: a scan beats hashing.
        match groups.iter_mut().find(|(id, _)| *id == e.chatbot_id) {
            Some((_, v)) => v.push(e),
            None => groups.push((e.chatbot_id, vec![e])),
        }
    }
    groups
}

impl Router {
    /// Asks a chatbot's running supervisor; `None` when none runs (or it is gone).
    fn ask_running<M>(&self, chatbot_id: Uuid, msg: M) -> ResponseFuture<Option<M::Result>>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        ChatbotSupervisor: Handler<M>,
    {
        let addr = match self.slots.get(&chatbot_id) {
            Some(Slot::Ready { addr, .. }) => Some(addr.clone()),
            _ => None,
        };
        Box::pin(async move {
            match addr {
                Some(a) => a.send(msg).await.ok(),
                None => None,
            }
        })
    }
}

impl Router {
    /// The record of a chatbot this router knows, if it holds one.
    fn record(&self, chatbot_id: Uuid) -> Option<Arc<ChatbotRecord>> {
        match self.slots.get(&chatbot_id)? {
            Slot::Known { record, .. } | Slot::Ready { record, .. } => Some(record.clone()),
            Slot::Loading { .. } | Slot::Stopping { .. } | Slot::Missing { .. } => None,
        }
    }
}

/// Sent by the admin API after it rotated a chatbot's webhook secret: the next webhook
/// on this daemon is signed with the new secrets (other daemons hear of it by NOTIFY).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetSigning(pub Uuid, pub accounts::Signing);

impl Handler<SetSigning> for Router {
    type Result = ();

    fn handle(&mut self, msg: SetSigning, _ctx: &mut Context<Self>) {
        if let Some(record) = self.record(msg.0) {
            record.set_signing(msg.1);
        }
    }
}

/// Sent by the admin API after it deleted a chatbot: its supervisor on this daemon
/// stops before the answer (other daemons hear of it by NOTIFY).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ChatbotDeleted(pub Uuid);

impl Handler<ChatbotDeleted> for Router {
    type Result = ();

    fn handle(&mut self, msg: ChatbotDeleted, _ctx: &mut Context<Self>) {
        self.forget(msg.0);
    }
}

impl Router {
    /// A deleted chatbot: its supervisor is retired after the events already sent to it
    /// (the mailbox keeps their order), events waiting here and from now on are answered
    /// `unknown_chatbot`, and its record is dropped (a later load finds it deleted).
    fn forget(&mut self, chatbot_id: Uuid) {
        self.wakes.remove(&chatbot_id);
        let missing = Slot::Missing { until: Instant::now() + Duration::from_secs(1) };
        match self.slots.remove(&chatbot_id) {
            Some(Slot::Ready { addr, .. }) => {
                addr.do_send(Retire);
                self.slots.insert(chatbot_id, missing);
                tracing::info!(%chatbot_id, "chatbot deleted; its supervisor stops");
            }
            Some(Slot::Known { .. }) => {
                self.slots.insert(chatbot_id, missing);
            }
            Some(Slot::Loading { waiting, .. }) => {
                // The load may have read the row before the deletion committed; its
                // answer finds this slot (or a later load's) and leaves it.
                self.slots.insert(chatbot_id, missing);
                for held in waiting {
                    nack_all(held, unknown(chatbot_id));
                }
            }
            Some(Slot::Stopping { held, reload, .. }) => {
                self.slots.insert(chatbot_id, Slot::Stopping { held, reload, deleted: true });
            }
            Some(m @ Slot::Missing { .. }) => {
                self.slots.insert(chatbot_id, m);
            }
            None => {}
        }
        self.publish_gauge();
    }

    /// After the change listener reconnected: a deletion announced meanwhile was not
    /// heard, so ask the database which of the chatbots known here are deleted.
    fn forget_deleted(&mut self, ctx: &mut Context<Self>) {
        let ids: Vec<Uuid> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Ready { .. } | Slot::Known { .. } | Slot::Stopping { .. }))
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return;
        }
        let store = self.deps.store.clone();
        let fut = async move { crate::store::deletion::deleted_among(&store, &ids).await };
        ctx.spawn(fut.into_actor(self).map(|res, act, _ctx| match res {
            Ok(deleted) => deleted.into_iter().for_each(|id| act.forget(id)),
            Err(error) => tracing::warn!(%error, "cannot check for deleted chatbots after a reconnect"),
        }));
    }
}

/// Passes a workflow change to the slot's supervisor, now or when it stays.
fn reload(slot: &mut Slot) {
    match slot {
        Slot::Ready { addr, .. } => addr.do_send(Reload),
        Slot::Stopping { reload, .. } => *reload = true,
        Slot::Loading { .. } | Slot::Known { .. } | Slot::Missing { .. } => {}
    }
}

fn unknown(chatbot_id: Uuid) -> Nack {
    Nack::new(NackCode::UnknownChatbot, format!("chatbot {chatbot_id} does not exist"))
}

/// Another account's chatbot is answered as one that does not exist, word for word: a
/// key must not learn which chatbot ids exist elsewhere.
fn not_yours(chatbot_id: Uuid) -> Nack {
    unknown(chatbot_id)
}

fn nack_all(held: Held, nack: Nack) {
    let at = held.received_at;
    let n = held.answers.nack_all(held.events.into_iter().map(|e| (e.id, at)), &nack);
    m::hot().rejected(nack.code).increment(n as u64);
}

impl Held {
    /// A share that must wait (its chatbot is loading or stopping) answers on its own,
    /// so the rest of its batch is not held up: it leaves the batch's collector.
    fn detached(self) -> Held {
        let own = BatchAnswers::new(self.answers.reply_to().clone(), 1);
        self.answers.add(Vec::new());
        Held { answers: own, ..self }
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(0);
        let every = (self.idle_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        ctx.run_interval(every, |act, ctx| act.reap_idle(ctx));
        self.publish_gauge();
    }
}

impl Handler<RouteEvents> for Router {
    type Result = ();

    fn handle(&mut self, msg: RouteEvents, ctx: &mut Context<Self>) {
        let RouteEvents { scope, source, events, received_at, reply_to } = msg;
        // Most batches carry one chatbot: forward the vector as is.
        let first = events.first().map(|e| e.chatbot_id);
        if let Some(first) = first {
            if events.iter().all(|e| e.chatbot_id == first) {
                let answers = BatchAnswers::new(reply_to, 1);
                self.route(first, Held { scope, source, events, received_at, answers }, ctx);
                return;
            }
        }
        let groups = by_chatbot(events);
        let answers = BatchAnswers::new(reply_to, groups.len());
        for (chatbot_id, events) in groups {
            self.route(chatbot_id, Held { scope, source, events, received_at, answers: answers.clone() }, ctx);
        }
    }
}

impl Handler<Wake> for Router {
    type Result = ();

    fn handle(&mut self, msg: Wake, ctx: &mut Context<Self>) {
        if !self.draining {
            self.wake(msg, ctx);
        }
    }
}

impl Handler<WorkflowsChanged> for Router {
    type Result = ();

    fn handle(&mut self, msg: WorkflowsChanged, ctx: &mut Context<Self>) {
        match msg.0 {
            Change::Secret(id) => {
                // Another process rotated it: read the secrets it saved.
                if let Some(record) = self.record(id) {
                    let store = self.deps.store.clone();
                    ctx.spawn(
                        async move {
                            match accounts::get_chatbot(&store, id).await {
                                Ok(Some(fresh)) => record.set_signing(fresh.signing()),
                                Ok(None) => {}
                                Err(error) => tracing::warn!(%error, chatbot_id = %id, "cannot read a rotated webhook secret"),
                            }
                        }
                        .into_actor(self),
                    );
                }
            }
            Change::Workflows(id) => {
                if let Some(slot) = self.slots.get_mut(&id) {
                    reload(slot);
                }
                // A chatbot without a supervisor reads its workflows when one starts.
            }
            Change::Resync => {
                self.slots.values_mut().for_each(reload);
                self.forget_deleted(ctx);
            }
            Change::Deleted(id) => self.forget(id),
            // Delivered as a `Wake`, or to the outbox, by the daemon; nothing to reload.
            Change::Wake(_) | Change::Command { .. } | Change::CommandAcked { .. } | Change::Key(_) => {}
            // A supervisor that is not running reads its limits when it starts.
            Change::Limits(id) => {
                if let Some(Slot::Ready { addr, .. }) = self.slots.get(&id) {
                    addr.do_send(LimitsChanged);
                }
            }
        }
    }
}

/// Asked by the admin API: a chatbot's limits in force and usage, when its supervisor
/// runs (`None`: it is idle, using nothing).
#[derive(Message)]
#[rtype(result = "Option<(Limits, Usage)>")]
pub struct ChatbotUsage(pub Uuid);

impl Handler<ChatbotUsage> for Router {
    type Result = ResponseFuture<Option<(Limits, Usage)>>;

    fn handle(&mut self, msg: ChatbotUsage, _ctx: &mut Context<Self>) -> Self::Result {
        self.ask_running(msg.0, GetUsage)
    }
}

/// Asked by the admin API after it saved a chatbot's limits: applies them to the
/// chatbot's supervisor on this node now, and answers the usage under them (`None`:
/// idle; a supervisor that starts later reads the saved limits).
#[derive(Message)]
#[rtype(result = "Option<(Limits, Usage)>")]
pub struct ApplyChatbotLimits(pub Uuid, pub Limits);

impl Handler<ApplyChatbotLimits> for Router {
    type Result = ResponseFuture<Option<(Limits, Usage)>>;

    fn handle(&mut self, msg: ApplyChatbotLimits, _ctx: &mut Context<Self>) -> Self::Result {
        self.ask_running(msg.0, ApplyLimits(msg.1))
    }
}

impl Handler<BusySupervisors> for Router {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, _msg: BusySupervisors, _ctx: &mut Context<Self>) -> Self::Result {
        // One being asked to stop may still answer that it is busy.
        let stopping = self.slots.values().filter(|s| matches!(s, Slot::Stopping { .. })).count();
        self.draining = true;
        let addrs: Vec<Addr<ChatbotSupervisor>> = self
            .slots
            .values()
            .filter_map(|s| match s {
                Slot::Ready { addr, .. } => Some(addr.clone()),
                _ => None,
            })
            .collect();
        Box::pin(async move {
            let mut busy = stopping;
            for a in addrs {
                a.do_send(crate::chatbot::supervisor::Drain);
                if let Ok(true) = a.send(crate::chatbot::supervisor::IsBusy).await {
                    busy += 1;
                }
            }
            busy
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;

    fn event(id: &str, chatbot_id: Uuid) -> Event {
        Event { id: id.into(), chatbot_id, kind: EventType::MessageReceived, conversation_id: "c".into(), raw: bytes::Bytes::new() }
    }

    #[test]
    fn a_batch_splits_by_chatbot_keeping_each_chatbots_order() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let groups = by_chatbot(vec![event("1", a), event("2", b), event("3", a), event("4", b), event("5", a)]);
        let shown: Vec<(Uuid, Vec<&str>)> = groups.iter().map(|(id, v)| (*id, v.iter().map(|e| &*e.id).collect())).collect();
        assert_eq!(shown, vec![(a, vec!["1", "3", "5"]), (b, vec!["2", "4"])]);
    }

    #[test]
    fn a_key_reaches_its_own_accounts_chatbots_and_an_operators_all() {
        let (mine, theirs) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(Scope::Account(mine).allows(mine));
        assert!(!Scope::Account(mine).allows(theirs));
        assert!(Scope::All.allows(theirs));
    }
}
