//! The Outbox actor: commands for chat services (reply, tag, handoff) and the
//! connections subscribed to each chatbot.
//!
//! A connection subscribes in its `hello`; a command for a chatbot goes to every
//! connection subscribed to it. Commands are not persisted yet: one sent while nobody
//! is subscribed reaches nobody (the step records `delivered: 0`), and a client's
//! `ack` of a command is accepted but not tracked. Durable delivery with redelivery
//! until acked belongs here once the outbox table exists.

use crate::ingest::protocol::Command;
use crate::telemetry::metrics as m;
use actix::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// Sent by the outbox to a connection: write this command to the client.
#[derive(Message, Clone)]
#[rtype(result = "bool")]
pub struct DeliverCommand(pub Arc<Command>);

/// Sent by a connection after its hello: it wants the commands of these chatbots
/// (ownership already checked).
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

/// Sent by an executor: deliver a command; answers how many connections took it.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Deliver(pub Command);

#[derive(Default)]
pub struct Outbox {
    subscribers: HashMap<Uuid, Vec<(u64, Recipient<DeliverCommand>)>>,
}

impl Actor for Outbox {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(0);
    }
}

impl Handler<Subscribe> for Outbox {
    type Result = ();
    fn handle(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) {
        for chatbot in msg.chatbots {
            let list = self.subscribers.entry(chatbot).or_default();
            if !list.iter().any(|(id, _)| *id == msg.connection_id) {
                list.push((msg.connection_id, msg.recipient.clone()));
            }
        }
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
        let targets: Vec<Recipient<DeliverCommand>> = self
            .subscribers
            .get(&msg.0.chatbot_id)
            .map(|l| l.iter().map(|(_, r)| r.clone()).collect())
            .unwrap_or_default();
        let kind = msg.0.kind;
        let command = Arc::new(msg.0);
        Box::pin(async move {
            let mut delivered = 0;
            for t in targets {
                // A connection refuses (false) when its output is over its limit.
                if let Ok(true) = t.send(DeliverCommand(command.clone())).await {
                    delivered += 1;
                }
            }
            metrics::counter!(m::COMMANDS_SENT, "kind" => kind).increment(delivered as u64);
            delivered
        })
    }
}
