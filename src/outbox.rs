//! The Outbox actor: commands for chat services (reply, tag, handoff), the connections
//! subscribed to each chatbot, and the steps waiting for a client's ack.
//!
//! A command's row in the `outbox` table is written by the journal lane in its next
//! batch; the command is written to every connection subscribed to its chatbot without
//! waiting for that commit, and stays `pending` until a client acks it
//! (`{"op":"ack","command_id":…}`): then the step waiting for it goes on and the row is
//! marked `acked`. A connection that subscribes gets every command still pending for
//! its chatbots, those in the table and those waiting here whose row may not be
//! committed yet, so nothing is lost to a disconnect or a restart; a client may see a
//! command twice and drops it by its id.
//!
//! Several daemons on one database: the journal announces each pending command at its
//! commit (`store::outbox::COMMANDS_CHANNEL`), and the other nodes write it to their own
//! subscribers; an ack a node was not waiting for is recorded in the table and
//! announced, so the node whose step waits for it goes on at once. Announcements
//! missed while the listener was disconnected are made up for when it is back: the
//! commands still pending for the chatbots subscribed here are written again, and the
//! steps waiting here for commands acked meanwhile go on.

use crate::store::accounts::Scope;
use crate::store::journal::{Journal, RecordProgress};
use crate::store::outbox as table;
use crate::store::Store;
use crate::telemetry::metrics as m;
use crate::wire::Command;
use actix::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::oneshot;
use uuid::Uuid;

/// Commands redelivered to a new subscriber at most (oldest first).
const REDELIVER_LIMIT: i64 = 10_000;

/// Announcements of other nodes' commands kept while a read is in flight, at most;
/// past it they are dropped (their clients get them on the next subscribe, or the steps
/// send them again).
const ANNOUNCED_LIMIT: usize = 10_000;

/// How long reading commands from the table (announced ones, or those pending after the
/// listener reconnected), and then writing them to the connections, may take: a hung
/// query must not stop the announcements that follow.
const ANNOUNCED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sent by the outbox to a connection: write this command to the client.
#[derive(Message, Clone)]
#[rtype(result = "bool")]
pub struct DeliverCommand(pub Arc<Command>);

/// Sent by a connection after its hello: it wants the commands of these chatbots
/// (ownership already checked), starting with those still pending.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    pub connection_id: u64,
    pub chatbots: Vec<Uuid>,
    pub recipient: Recipient<DeliverCommand>,
}

/// Sent by a connection when it closes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub connection_id: u64,
}

/// Sent by a step: write a command (already kept in PostgreSQL) to the subscribed
/// connections and resolve `acked` when a client acks it. Answers how many
/// connections it was written to.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Deliver {
    pub command: Arc<Command>,
    /// The account owning the command's chatbot: only its keys (or an operator's) ack it.
    pub account_id: Uuid,
    pub acked: oneshot::Sender<()>,
}

/// Sent by a step that gave up waiting for an ack.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Forget {
    pub command_id: String,
}

/// From the change listener: another node committed a pending command.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteCommand {
    pub node: Uuid,
    pub chatbot_id: Uuid,
    pub command_id: String,
}

/// From the change listener: a client with a key of `scope` acked this command
/// through another node.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteAck {
    pub command_id: String,
    pub scope: Scope,
}

/// From the change listener after it (re)connected: announcements sent while it was
/// away are lost, so the commands still pending for the chatbots subscribed here are
/// written to their subscribers again (clients drop the ones they already have), and
/// the commands waited for here that were acked through another node meanwhile let
/// their steps go on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RedeliverPending;

/// Sent by a connection: its client acked a command.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClientAck {
    pub command_id: String,
    pub scope: Scope,
}

struct Waiting {
    command: Arc<Command>,
    account_id: Uuid,
    acked: Vec<oneshot::Sender<()>>,
}

pub struct Outbox {
    store: Store,
    journal: Journal,
    /// This daemon's node id: its own commands need no announcement.
    node: Uuid,
    subscribers: HashMap<Uuid, Vec<(u64, Recipient<DeliverCommand>)>>,
    waiting: HashMap<String, Waiting>,
    /// Commands other nodes announced, (command id, chatbot id), to be read in one
    /// query once the read in flight (if any) ends.
    announced: Vec<(String, Uuid)>,
    reading_announced: bool,
    /// Announcements dropped over `ANNOUNCED_LIMIT` since the last read.
    announced_dropped: u64,
}

impl Outbox {
    pub fn new(store: Store, journal: Journal, node: Uuid) -> Outbox {
        Outbox {
            store,
            journal,
            node,
            subscribers: HashMap::new(),
            waiting: HashMap::new(),
            announced: Vec::new(),
            reading_announced: false,
            announced_dropped: 0,
        }
    }

    fn subscribers_of(&self, chatbot_id: &Uuid) -> Vec<Recipient<DeliverCommand>> {
        self.subscribers.get(chatbot_id).map(|l| l.iter().map(|(_, r)| r.clone()).collect()).unwrap_or_default()
    }
}

impl Actor for Outbox {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(0);
    }
}

impl Handler<Subscribe> for Outbox {
    type Result = ();
    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) {
        for chatbot in &msg.chatbots {
            let list = self.subscribers.entry(*chatbot).or_default();
            if !list.iter().any(|(id, _)| *id == msg.connection_id) {
                list.push((msg.connection_id, msg.recipient.clone()));
            }
        }
        // What is still pending for these chatbots goes to the new subscriber: the rows
        // in the table, then the commands waited for here that the query did not
        // return (their rows may not be committed yet).
        let store = self.store.clone();
        let recipient = msg.recipient;
        let chatbots = msg.chatbots;
        let in_memory: Vec<Arc<Command>> =
            self.waiting.values().filter(|w| chatbots.contains(&w.command.chatbot_id)).map(|w| w.command.clone()).collect();
        ctx.spawn(
            async move {
                match table::pending(&store, &chatbots, REDELIVER_LIMIT).await {
                    Ok(commands) => {
                        let from_table: std::collections::HashSet<String> =
                            commands.iter().map(|c| c.command_id.clone()).collect();
                        let uncommitted: Vec<Arc<Command>> =
                            in_memory.into_iter().filter(|c| !from_table.contains(&c.command_id)).collect();
                        let n = commands.len() + uncommitted.len();
                        for c in commands.into_iter().map(Arc::new).chain(uncommitted) {
                            recipient.do_send(DeliverCommand(c));
                        }
                        if n > 0 {
                            tracing::info!(commands = n, "redelivered pending commands to a new subscriber");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "cannot read pending commands for a new subscriber"),
                }
            }
            .into_actor(self),
        );
    }
}

impl Handler<RedeliverPending> for Outbox {
    type Result = ();
    fn handle(&mut self, _: RedeliverPending, ctx: &mut Context<Self>) {
        self.accept_missed_acks(ctx);
        let chatbots: Vec<Uuid> = self.subscribers.keys().copied().collect();
        if chatbots.is_empty() {
            return;
        }
        let store = self.store.clone();
        let read = async move { table::pending(&store, &chatbots, REDELIVER_LIMIT).await };
        self.write_from_table(ctx, "the commands pending when the change listener reconnected", read, |_, _| {});
    }
}

impl Handler<Unsubscribe> for Outbox {
    type Result = ();
    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Context<Self>) {
        self.subscribers.retain(|_, list| {
            list.retain(|(id, _)| *id != msg.connection_id);
            !list.is_empty()
        });
    }
}

impl Handler<Deliver> for Outbox {
    type Result = ResponseFuture<usize>;
    fn handle(&mut self, msg: Deliver, _ctx: &mut Context<Self>) -> Self::Result {
        let Deliver { command, account_id, acked } = msg;
        self.waiting
            .entry(command.command_id.clone())
            .or_insert_with(|| Waiting { command: command.clone(), account_id, acked: Vec::new() })
            .acked
            .push(acked);
        let targets = self.subscribers_of(&command.chatbot_id);
        Box::pin(write_to(targets, command))
    }
}

/// Writes a command to these connections; answers to how many it was written.
async fn write_to(targets: Vec<Recipient<DeliverCommand>>, command: Arc<Command>) -> usize {
    let mut delivered = 0;
    for t in targets {
        // A connection refuses (false) when its output is over its limit; the
        // command stays pending and comes back when it subscribes again.
        if let Ok(true) = t.send(DeliverCommand(command.clone())).await {
            delivered += 1;
        }
    }
    metrics::counter!(m::COMMANDS_SENT, "kind" => command.kind.as_str()).increment(delivered as u64);
    delivered
}

impl Handler<RemoteCommand> for Outbox {
    type Result = ();
    fn handle(&mut self, msg: RemoteCommand, ctx: &mut Context<Self>) {
        // Ours were written to our subscribers already; nobody here wants the others.
        if msg.node == self.node || !self.subscribers.contains_key(&msg.chatbot_id) || self.waiting.contains_key(&msg.command_id) {
            return;
        }
        if self.announced.len() >= ANNOUNCED_LIMIT {
            self.announced_dropped += 1;
            return;
        }
        self.announced.push((msg.command_id, msg.chatbot_id));
        self.read_announced(ctx);
    }
}

impl Outbox {
    /// Reads the announced commands in one query and writes them to the subscribers of
    /// their chatbots; announcements that come meanwhile wait for the next read, which
    /// starts once these are written (so they reach a client in the order announced).
    /// A burst of commands from another node costs a few queries, not one each.
    fn read_announced(&mut self, ctx: &mut Context<Self>) {
        if self.reading_announced || self.announced.is_empty() {
            return;
        }
        if self.announced_dropped > 0 {
            tracing::warn!(
                dropped = std::mem::take(&mut self.announced_dropped),
                "too many commands announced by other nodes while a read was slow; their clients get them on the next subscribe or retry"
            );
        }
        self.reading_announced = true;
        let mut announced = std::mem::take(&mut self.announced);
        // A step retried on another node announces its command again.
        let mut seen = std::collections::HashSet::new();
        announced.retain(|(id, _)| seen.insert(id.clone()));
        let store = self.store.clone();
        let read = async move { table::announced(&store, &announced).await };
        self.write_from_table(ctx, "the commands another node announced", read, |act, ctx| {
            act.reading_announced = false;
            act.read_announced(ctx);
        });
    }

    /// Reads commands from the table and writes each to the subscribers its chatbot has
    /// then (a command waited for here is left out: it went to them already); the read
    /// and the writes are bounded by `ANNOUNCED_TIMEOUT`, and `then` runs after either
    /// way. Commands that could not be read reach their clients on the next subscribe,
    /// or when their steps send them again.
    fn write_from_table(
        &mut self,
        ctx: &mut Context<Self>,
        what: &'static str,
        read: impl std::future::Future<Output = Result<Vec<Command>, crate::store::StoreError>> + 'static,
        then: impl FnOnce(&mut Self, &mut Context<Self>) + 'static,
    ) {
        let read = async move { tokio::time::timeout(ANNOUNCED_TIMEOUT, read).await };
        ctx.spawn(read.into_actor(self).then(move |read, act, _ctx| {
            let writes: Vec<_> = match read {
                Ok(Ok(commands)) => commands
                    .into_iter()
                    .filter(|c| !act.waiting.contains_key(&c.command_id))
                    .map(|c| (act.subscribers_of(&c.chatbot_id), Arc::new(c)))
                    .collect(),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot read {what}");
                    Vec::new()
                }
                Err(_) => {
                    tracing::warn!("reading {what} timed out");
                    Vec::new()
                }
            };
            let write = async move {
                for (targets, command) in writes {
                    write_to(targets, command).await;
                }
            };
            async move { tokio::time::timeout(ANNOUNCED_TIMEOUT, write).await }.into_actor(act).map(move |_, act, ctx| then(act, ctx))
        }));
    }
}

impl Handler<RemoteAck> for Outbox {
    type Result = ();
    fn handle(&mut self, msg: RemoteAck, _ctx: &mut Context<Self>) {
        // The other node could not check the account if our row was not committed yet.
        if self.waiting.get(&msg.command_id).is_some_and(|w| msg.scope.allows(w.account_id)) {
            self.accept_ack(msg.command_id);
        }
    }
}

impl Handler<Forget> for Outbox {
    type Result = ();
    fn handle(&mut self, msg: Forget, _ctx: &mut Context<Self>) {
        if let Some(w) = self.waiting.get_mut(&msg.command_id) {
            w.acked.retain(|tx| !tx.is_closed());
            if w.acked.is_empty() {
                self.waiting.remove(&msg.command_id);
            }
        }
    }
}

impl Handler<ClientAck> for Outbox {
    type Result = ();
    fn handle(&mut self, msg: ClientAck, ctx: &mut Context<Self>) {
        match self.waiting.get(&msg.command_id) {
            Some(w) if msg.scope.allows(w.account_id) => {}
            Some(_) => {
                // Not this client's to ack; leave it pending.
                return;
            }
            None => {
                // Not waited for here (sent before a restart, or by another node):
                // mark it acked if it is the client's.
                let store = self.store.clone();
                ctx.spawn(
                    async move {
                        if let Err(error) = table::ack_unwaited(&store, &msg.command_id, msg.scope).await {
                            tracing::warn!(%error, command_id = %msg.command_id, "cannot record a command ack");
                        }
                    }
                    .into_actor(self),
                );
                return;
            }
        }
        self.accept_ack(msg.command_id);
    }
}

impl Outbox {
    /// Reads which of the commands waited for here were acked in the table (their
    /// announcements were missed) and wakes their steps.
    fn accept_missed_acks(&mut self, ctx: &mut Context<Self>) {
        let ids: Vec<String> = self.waiting.keys().cloned().collect();
        if ids.is_empty() {
            return;
        }
        let store = self.store.clone();
        let read = async move { tokio::time::timeout(ANNOUNCED_TIMEOUT, table::acked_among(&store, &ids)).await };
        ctx.spawn(read.into_actor(self).map(|read, act, _| match read {
            Ok(Ok(acked)) => acked.into_iter().for_each(|id| act.accept_ack(id)),
            Ok(Err(error)) => tracing::warn!(%error, "cannot read the acks missed while the change listener was away"),
            Err(_) => tracing::warn!("reading the acks missed while the change listener was away timed out"),
        }));
    }

    /// Records the ack of a command this node waits for and wakes its step.
    fn accept_ack(&mut self, command_id: String) {
        if let Some(w) = self.waiting.remove(&command_id) {
            // The ack is queued on the lane (after the command's own row) before the
            // step goes on, so the step's later writes (which expire commands left
            // pending) come after it.
            self.journal.lane_of(w.command.execution_id).do_send(RecordProgress {
                acked_commands: vec![command_id],
                ..Default::default()
            });
            for tx in w.acked {
                let _ = tx.send(());
            }
        }
    }
}
