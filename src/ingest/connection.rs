//! The Connection actor: one per client socket, owning the protocol state (hello,
//! key, subscriptions), the in-flight window and the output buffer.
//!
//! Each connection has two tasks beside the actor, on the same arbiter:
//! - the reader reads the socket into a buffer, cuts lines (`codec`), decodes them
//!   (`protocol`) and hands the actor one batch per read. It takes a window permit for
//!   every event before reading on: with `max_in_flight` events unanswered it stops
//!   reading, and TCP pushes back on the client. It also stops while the output
//!   buffer is over its high-water mark (a client that does not read its answers).
//! - the writer drains the output buffer to the socket, coalescing everything the
//!   actor appended since the last write into one syscall.
//!
//! Valid events of a batch go to the Router in one message; answers come back as
//! `EventOutcomes` (from the router, a supervisor or the journal). An answer's permit
//! is released by the writer once the answer is written to the socket, so a client
//! that does not read its acks has at most `max_in_flight` events in the daemon.

use super::budget::{ConnectionBudget, Refused, Slot};
use super::codec::{Frame, LineDecoder};
use super::protocol::{self, ClientFrame, FrameError, Hello, Refusal};
use super::sessions::{KeyWithdrawn, Sessions};
use crate::event::Event;
use crate::outbox::{ClientAck, DeliverCommand, Outbox, Subscribe, Unsubscribe};
use crate::router::{RouteEvents, Router};
use crate::store::accounts::{self, Principal, Role, Scope};
use crate::store::Store;
use crate::telemetry::metrics as m;
use crate::wire::{ErrorCode, EventOutcomes, Outcome};
use actix::prelude::*;
use bytes::BytesMut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// Output past this stops the reader until the client reads its answers.
const OUTPUT_HIGH_WATER: usize = 1024 * 1024;
/// Commands are refused for a connection whose output exceeds this.
const OUTPUT_COMMAND_LIMIT: usize = 16 * 1024 * 1024;
const READ_CHUNK: usize = 64 * 1024;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What every connection shares.
pub struct IngestDeps {
    pub store: Store,
    pub router: Addr<Router>,
    pub outbox: Addr<Outbox>,
    pub max_frame_bytes: usize,
    pub max_hello_bytes: usize,
    pub max_in_flight: usize,
    pub handshake_timeout: Duration,
    /// Connection caps and the buffer budget all connections share.
    pub budget: Arc<ConnectionBudget>,
    /// Open connections, for the shutdown drain.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    /// The connections of each key, closed when the key is revoked or expires.
    pub sessions: Arc<Sessions>,
}

/// One item the reader decoded.
#[derive(Debug)]
enum Incoming {
    Frame(Result<ClientFrame, FrameError>),
    TooLarge,
    /// The connection's unfinished line took all connections over the buffer budget.
    OverBudget,
}

/// Sent by the reader: the frames of one read, in order.
#[derive(Message)]
#[rtype(result = "()")]
struct Frames(Vec<Incoming>);

/// Sent by the reader when it stops: `leftover` bytes of an unfinished line.
#[derive(Message)]
#[rtype(result = "()")]
struct ReaderStopped {
    leftover: usize,
    error: Option<String>,
}

/// The output buffer shared by the actor and the writer task.
struct Outgoing {
    state: Mutex<OutState>,
    wake_writer: Notify,
    drained: Notify,
    /// The in-flight window, refilled as answers reach the socket.
    window: Arc<Semaphore>,
    /// Stops the reader once the client cannot be written to: it would only create
    /// work whose answers nobody receives.
    reader: CancellationToken,
}

struct OutState {
    buf: BytesMut,
    /// Window permits to give back once `buf` is written.
    release: usize,
    closed: bool,
    broken: bool,
}

impl Outgoing {
    fn new(window: Arc<Semaphore>, reader: CancellationToken) -> Outgoing {
        Outgoing {
            state: Mutex::new(OutState {
                buf: BytesMut::with_capacity(16 * 1024),
                release: 0,
                closed: false,
                broken: false,
            }),
            wake_writer: Notify::new(),
            drained: Notify::new(),
            window,
            reader,
        }
    }

    /// Appends what `f` writes and wakes the writer.
    fn push(&self, f: impl FnOnce(&mut BytesMut)) {
        self.push_answers(0, f);
    }

    /// Appends `answers` event answers; their permits return when they are written.
    fn push_answers(&self, answers: usize, f: impl FnOnce(&mut BytesMut)) {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.closed || s.broken {
                drop(s);
                // Never to be written: the reader must not wait for them.
                self.window.add_permits(answers);
                return;
            }
            f(&mut s.buf);
            s.release += answers;
        }
        self.wake_writer.notify_one();
    }

    fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).buf.len()
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.wake_writer.notify_one();
    }

    /// Waits until the buffer is below the high-water mark.
    async fn wait_for_room(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if s.buf.len() <= OUTPUT_HIGH_WATER || s.broken || s.closed {
                    return;
                }
            }
            notified.await;
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut w: W, out: Arc<Outgoing>) {
    loop {
        let chunk = {
            let mut s = out.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.buf.is_empty() {
                if s.closed {
                    break;
                }
                None
            } else {
                Some((s.buf.split().freeze(), std::mem::take(&mut s.release)))
            }
        };
        match chunk {
            None => out.wake_writer.notified().await,
            Some((chunk, release)) => {
                let written = w.write_all(&chunk).await;
                out.window.add_permits(release);
                if let Err(error) = written {
                    tracing::debug!(%error, "client stopped reading; dropping its output");
                    let mut s = out.state.lock().unwrap_or_else(|p| p.into_inner());
                    s.broken = true;
                    s.buf.clear();
                    let pending = std::mem::take(&mut s.release);
                    drop(s);
                    out.window.add_permits(pending);
                    out.drained.notify_waiters();
                    out.reader.cancel();
                    return;
                }
                out.drained.notify_waiters();
            }
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

#[allow(clippy::too_many_arguments)]
async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    addr: Addr<Connection>,
    window: Arc<Semaphore>,
    out: Arc<Outgoing>,
    (max_hello_bytes, max_frame_bytes): (usize, usize),
    mut slot: Slot,
    cancel: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK.min(max_hello_bytes + 1));
    // Until a hello is read, a line may be only as long as a hello: a client that
    // has not said who it is cannot make the daemon buffer more.
    let mut decoder = LineDecoder::new(max_hello_bytes);
    let mut hello_read = false;
    let mut error = None;
    'read: loop {
        tokio::select! {
            _ = cancel.cancelled() => break 'read,
            _ = out.wait_for_room() => {}
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let n = tokio::select! {
            _ = cancel.cancelled() => break 'read,
            r = rd.read_buf(&mut buf) => r,
        };
        match n {
            Ok(0) => break 'read,
            Ok(_) => {}
            Err(e) => {
                error = Some(e.to_string());
                break 'read;
            }
        }
        let mut frames = Vec::new();
        while let Some(frame) = decoder.decode(&mut buf) {
            let item = match frame {
                Frame::Line(line) => Incoming::Frame(protocol::decode(&line)),
                Frame::TooLarge => Incoming::TooLarge,
            };
            if !hello_read && matches!(item, Incoming::Frame(Ok(ClientFrame::Hello(_)))) {
                // The hello's key is checked before any later line is used, and a
                // wrong one closes the connection.
                hello_read = true;
                decoder.set_max(max_frame_bytes);
            }
            if matches!(item, Incoming::Frame(Ok(ClientFrame::Event(_)))) {
                match window.clone().try_acquire_owned() {
                    Ok(p) => p.forget(),
                    Err(_) => {
                        // The window is full: hand over what we have, then wait for answers.
                        if !frames.is_empty() && addr.send(Frames(std::mem::take(&mut frames))).await.is_err() {
                            return;
                        }
                        tokio::select! {
                            _ = cancel.cancelled() => break 'read,
                            p = window.clone().acquire_owned() => match p {
                                Ok(p) => p.forget(),
                                Err(_) => return,
                            },
                        }
                    }
                }
            }
            frames.push(item);
        }
        // What is left is a line not finished yet: it counts against the budget.
        if !slot.hold(buf.len()) {
            frames.push(Incoming::OverBudget);
            let _ = addr.send(Frames(frames)).await;
            break 'read;
        }
        if !frames.is_empty() && addr.send(Frames(frames)).await.is_err() {
            return;
        }
    }
    addr.do_send(ReaderStopped { leftover: decoder.leftover(&buf), error });
}

pub struct Connection {
    id: u64,
    /// Refused by the connection caps: told why, then closed.
    refused: Option<Refused>,
    peer: String,
    deps: Arc<IngestDeps>,
    principal: Option<Principal>,
    scope: Option<Scope>,
    out: Arc<Outgoing>,
    window: Arc<Semaphore>,
    /// Events handed to the router and not answered yet.
    unanswered: usize,
    cancel: CancellationToken,
    /// Frames read after a hello, held until the key is checked.
    backlog: Vec<Incoming>,
    reader_stopped: bool,
    subscribed: bool,
    opened_at: Instant,
}

impl Connection {
    /// Starts a connection actor on the current arbiter for a socket's two halves.
    /// A connection refused by the connection caps gets its error line and is closed.
    pub fn start<R, W>(
        reader: R,
        writer: W,
        peer: String,
        slot: Result<Slot, Refused>,
        deps: Arc<IngestDeps>,
        shutdown: &CancellationToken,
    ) -> Addr<Connection>
    where
        R: AsyncRead + Unpin + 'static,
        W: AsyncWrite + Unpin + 'static,
    {
        let window = Arc::new(Semaphore::new(deps.max_in_flight));
        let cancel = shutdown.child_token();
        let out = Arc::new(Outgoing::new(window.clone(), cancel.clone()));
        actix_rt::spawn(write_loop(writer, out.clone()));
        let limits = (deps.max_hello_bytes, deps.max_frame_bytes);
        let (slot, refused) = match slot {
            Ok(slot) => (Some(slot), None),
            Err(refused) => (None, Some(refused)),
        };
        let conn = Connection {
            refused,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            peer,
            deps,
            principal: None,
            scope: None,
            out: out.clone(),
            window: window.clone(),
            unanswered: 0,
            cancel: cancel.clone(),
            backlog: Vec::new(),
            reader_stopped: false,
            subscribed: false,
            opened_at: Instant::now(),
        };
        Connection::create(move |ctx| {
            ctx.set_mailbox_capacity(0);
            if let Some(slot) = slot {
                actix_rt::spawn(read_loop(reader, ctx.address(), window, out, limits, slot, cancel));
            }
            conn
        })
    }

    fn error(&self, code: ErrorCode, message: &str) {
        metrics::counter!(m::FRAMES_REJECTED, "reason" => code.as_str()).increment(1);
        self.out.push(|b| protocol::write_error(b, code, message));
    }

    /// Writes a last error, stops reading and closes once the error is written.
    fn fatal(&mut self, code: ErrorCode, message: &str, ctx: &mut Context<Self>) {
        tracing::info!(connection = self.id, peer = %self.peer, code = code.as_str(), message, "closing connection");
        self.error(code, message);
        self.cancel.cancel();
        self.backlog.clear();
        ctx.stop();
    }

    /// Closes after an error line already written (for frames refused before hello).
    fn fatal_after_error(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(connection = self.id, peer = %self.peer, "closing connection: the hello cannot be read");
        self.cancel.cancel();
        self.backlog.clear();
        ctx.stop();
    }

    fn maybe_finish(&mut self, ctx: &mut Context<Self>) {
        if self.reader_stopped && self.unanswered == 0 {
            ctx.stop();
        }
    }

    /// Handles frames in order; stops at a hello, whose check must finish first.
    fn process(&mut self, items: Vec<Incoming>, ctx: &mut Context<Self>) {
        let mut events: Vec<Event> = Vec::new();
        let mut items = items.into_iter();
        while let Some(item) = items.next() {
            match item {
                Incoming::TooLarge if self.principal.is_none() => {
                    let message = format!("the first line must be a hello of at most {} bytes (ingest.max_hello_bytes)", self.deps.max_hello_bytes);
                    self.fatal(ErrorCode::FrameTooLarge, &message, ctx);
                    return;
                }
                Incoming::TooLarge => self.error(
                    ErrorCode::FrameTooLarge,
                    &format!("the line is longer than max_frame_bytes ({}) and was skipped", self.deps.max_frame_bytes),
                ),
                Incoming::OverBudget => {
                    let message = format!(
                        "the daemon's buffers for unfinished lines are full (ingest.buffer_budget_bytes, {} bytes); \
                         this connection's line was dropped; send it again",
                        self.deps.budget.buffer_bytes()
                    );
                    self.fatal(ErrorCode::Overloaded, &message, ctx);
                    return;
                }
                Incoming::Frame(Err(e @ FrameError::InvalidFrame { op: "hello", .. })) if self.principal.is_none() => {
                    // A hello that cannot be read is as good as a wrong token. Other bad
                    // lines before it get their error and the handshake deadline applies.
                    self.frame_error(e);
                    self.fatal_after_error(ctx);
                    return;
                }
                Incoming::Frame(Err(e)) => self.frame_error(e),
                Incoming::Frame(Ok(ClientFrame::Ping)) => self.out.push(protocol::write_pong),
                Incoming::Frame(Ok(ClientFrame::Hello(hello))) => {
                    if self.principal.is_some() {
                        self.error(ErrorCode::ProtocolError, "hello was already received on this connection");
                        continue;
                    }
                    self.backlog = items.collect();
                    self.authenticate(hello, ctx);
                    return;
                }
                Incoming::Frame(Ok(frame)) if self.scope.is_none() => {
                    if matches!(frame, ClientFrame::Event(_)) {
                        self.window.add_permits(1);
                    }
                    self.fatal(ErrorCode::Unauthenticated, "the first frame must be a hello with a valid token", ctx);
                    return;
                }
                Incoming::Frame(Ok(ClientFrame::Event(e))) => {
                    events.push(e);
                }
                Incoming::Frame(Ok(ClientFrame::CommandAck { command_id })) => {
                    if let Some(scope) = self.scope {
                        self.deps.outbox.do_send(ClientAck { command_id, scope });
                    }
                }
            }
        }
        if let (false, Some(scope)) = (events.is_empty(), self.scope) {
            self.unanswered += events.len();
            let hot = m::hot();
            hot.count_received(&events);
            hot.in_flight.increment(events.len() as f64);
            hot.connection_in_flight.record(self.unanswered as f64);
            self.deps.router.do_send(RouteEvents {
                scope,
                source: self.id,
                events,
                received_at: Instant::now(),
                reply_to: ctx.address().recipient(),
            });
        }
    }

    fn frame_error(&self, e: FrameError) {
        match e.refusal() {
            Refusal::Error(code, message) => self.error(code, &message),
            Refusal::Nack { id, nack } => {
                m::hot().rejected(nack.code).increment(1);
                self.out.push(|b| protocol::write_nack(b, id.as_deref(), &nack));
            }
        }
    }

    /// Checks the key, subscribes, says welcome, then handles the frames held meanwhile.
    fn authenticate(&mut self, hello: Hello, ctx: &mut Context<Self>) {
        if hello.version != protocol::PROTOCOL_VERSION {
            let msg = format!("protocol version {} is not supported; this daemon speaks version 1", hello.version);
            self.fatal(ErrorCode::UnsupportedVersion, &msg, ctx);
            return;
        }
        let store = self.deps.store.clone();
        let fut = async move {
            let principal = match accounts::authenticate(&store, &hello.token).await {
                Ok(p) => p,
                Err(e) => return Err((ErrorCode::Unavailable, format!("cannot check the token now: {e}"))),
            };
            let Some(principal) = principal else {
                return Err((ErrorCode::Unauthenticated, "the token is not valid".to_string()));
            };
            if principal.role == Role::Admin {
                return Err((
                    ErrorCode::Forbidden,
                    "an admin key cannot stream events; use an ingest key".to_string(),
                ));
            }
            let scope = principal.scope();
            // Each subscription is checked like an event: unknown or another account's
            // chatbot gets an error line (the same for both: a key must not learn which
            // ids exist elsewhere), the others are kept. One query for all.
            let mut allowed = Vec::new();
            let mut refused = Vec::new();
            if !hello.subscribe.is_empty() {
                let owners = match accounts::chatbot_owners(&store, &hello.subscribe).await {
                    Ok(o) => o,
                    Err(e) => return Err((ErrorCode::Unavailable, format!("cannot check the subscriptions now: {e}"))),
                };
                for chatbot in hello.subscribe {
                    match owners.get(&chatbot) {
                        Some(owner) if scope.allows(*owner) => allowed.push(chatbot),
                        Some(_) | None => refused.push((
                            ErrorCode::UnknownChatbot,
                            format!("cannot subscribe to chatbot {chatbot}: it does not exist"),
                        )),
                    }
                }
            }
            Ok((principal, scope, hello.client, allowed, refused))
        };
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
            Err((code, message)) => act.fatal(code, &message, ctx),
            Ok((principal, scope, client, allowed, refused)) => {
                if let Err(why) = act.deps.sessions.add(principal.key_id, act.id, ctx.address().recipient()) {
                    act.fatal(ErrorCode::Unauthenticated, why, ctx);
                    return;
                }
                tracing::info!(
                    connection = act.id,
                    peer = %act.peer,
                    client = client.as_deref().unwrap_or(""),
                    account_id = %principal.account_id,
                    role = %principal.role,
                    subscriptions = allowed.len(),
                    "client connected"
                );
                act.principal = Some(principal);
                act.scope = Some(scope);
                let (max_in_flight, max_frame) = (act.deps.max_in_flight, act.deps.max_frame_bytes);
                act.out.push(|b| protocol::write_welcome(b, max_in_flight, max_frame));
                for (code, message) in refused {
                    act.error(code, &message);
                }
                if !allowed.is_empty() {
                    act.subscribed = true;
                    act.deps.outbox.do_send(Subscribe {
                        connection_id: act.id,
                        chatbots: allowed,
                        recipient: ctx.address().recipient(),
                    });
                }
                let backlog = std::mem::take(&mut act.backlog);
                act.process(backlog, ctx);
            }
        }));
    }
}

impl Actor for Connection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        metrics::gauge!(m::CONNECTIONS_ACTIVE).increment(1.0);
        self.deps.connections.fetch_add(1, Ordering::SeqCst);
        if let Some(Refused(message)) = self.refused.take() {
            tracing::warn!(peer = %self.peer, %message, "refused a connection");
            self.fatal(ErrorCode::TooManyConnections, &message, ctx);
            return;
        }
        ctx.run_later(self.deps.handshake_timeout, |act, ctx| {
            if act.principal.is_none() {
                let ms = act.deps.handshake_timeout.as_millis();
                act.fatal(ErrorCode::HandshakeTimeout, &format!("no hello within {ms} ms"), ctx);
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        metrics::gauge!(m::CONNECTIONS_ACTIVE).decrement(1.0);
        self.deps.connections.fetch_sub(1, Ordering::SeqCst);
        self.cancel.cancel();
        self.out.close();
        if self.subscribed {
            self.deps.outbox.do_send(Unsubscribe { connection_id: self.id });
        }
        if let Some(p) = &self.principal {
            self.deps.sessions.remove(p.key_id, self.id);
        }
        tracing::debug!(connection = self.id, peer = %self.peer, lasted_ms = self.opened_at.elapsed().as_millis() as u64, "connection closed");
    }
}

impl Handler<Frames> for Connection {
    type Result = ();
    fn handle(&mut self, msg: Frames, ctx: &mut Context<Self>) {
        self.process(msg.0, ctx);
    }
}

impl Handler<EventOutcomes> for Connection {
    type Result = ();
    fn handle(&mut self, msg: EventOutcomes, ctx: &mut Context<Self>) {
        let hot = m::hot();
        let now = Instant::now();
        let n = msg.0.len();
        let mut acked = 0u64;
        self.out.push_answers(n, |b| {
            // One latency sample per batch read (answers of one batch share its time).
            let mut last: Option<Instant> = None;
            for (id, outcome, received_at) in &msg.0 {
                protocol::write_outcome(b, id, outcome);
                if last != Some(*received_at) {
                    hot.ack_latency.record(now.duration_since(*received_at).as_secs_f64());
                    last = Some(*received_at);
                }
                if matches!(outcome, Outcome::Ack { .. }) {
                    acked += 1;
                }
            }
        });
        hot.acked.increment(acked);
        hot.in_flight.decrement(n as f64);
        self.unanswered = self.unanswered.saturating_sub(n);
        self.maybe_finish(ctx);
    }
}

impl Handler<KeyWithdrawn> for Connection {
    type Result = ();
    fn handle(&mut self, msg: KeyWithdrawn, ctx: &mut Context<Self>) {
        // Events in flight are not answered: the key that sent them no longer counts.
        self.fatal(ErrorCode::Unauthenticated, msg.0, ctx);
    }
}

impl Handler<DeliverCommand> for Connection {
    type Result = bool;
    fn handle(&mut self, msg: DeliverCommand, _ctx: &mut Context<Self>) -> bool {
        if self.out.len() > OUTPUT_COMMAND_LIMIT {
            tracing::warn!(connection = self.id, command_id = %msg.0.command_id, "client is not reading; command not delivered");
            return false;
        }
        self.out.push(|b| protocol::write_command(b, &msg.0));
        true
    }
}

impl Handler<ReaderStopped> for Connection {
    type Result = ();
    fn handle(&mut self, msg: ReaderStopped, ctx: &mut Context<Self>) {
        self.reader_stopped = true;
        if let Some(error) = msg.error {
            tracing::debug!(connection = self.id, %error, "read failed");
        } else if msg.leftover > 0 && !self.cancel.is_cancelled() {
            // The peer closed in the middle of a line; the half line is dropped.
            tracing::info!(connection = self.id, peer = %self.peer, bytes = msg.leftover, "client closed in the middle of a line");
            self.error(ErrorCode::IncompleteFrame, "the connection closed in the middle of a line; that line was ignored");
        }
        self.maybe_finish(ctx);
    }
}
