//! One device connection, from `hello` to close.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde_bytes::ByteBuf;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warbler_actors::{MailboxError, Mailboxes, OutSender, Session};
use warbler_client::codec::CodecError;
use warbler_client::{DecodeError, ErrorCode, Frame, PROTOCOL_VERSION};
use warbler_config::LimitsConfig;

use crate::auth::{Auth, AuthError, Claims, Scope};
use crate::rate::ConnectionLimits;

/// Longest user, device or message id, in bytes (ids are stored with a one-byte length).
pub const ID_BYTES_MAX: usize = 128;
/// Frames queued for a connection's writer beyond the delivery window (welcome, published,
/// pong, errors).
const WRITER_QUEUE_EXTRA: usize = 64;
/// How long a client is told to wait before reconnecting when the node drains.
const BYE_RETRY_MS: u64 = 1000;
/// Users a connection remembers its last publish to before it forgets the answered ones.
const CHAINS_PRUNE_AT: usize = 4096;

/// A publish's answer as the next publish to the same user sees it: its seq, or the error
/// and the id the publisher must resend from (the first of the refused publishes in a row).
type Outcome = Result<u64, (MailboxError, String)>;
type Answer = watch::Receiver<Option<Outcome>>;

/// Per user, the last publish this connection handed on: the wait for its hand-over to
/// the mailbox, and for its answer (see [`Gateway::publish`]).
#[derive(Default)]
struct Chains {
    users: HashMap<String, Link>,
}

struct Link {
    id: String,
    /// Dropped when the publish was handed to the mailbox (`None`: at once).
    handed: Option<oneshot::Receiver<()>>,
    answered: Answer,
}

/// What a new publish to a user must respect.
enum Before {
    /// Nothing: the last publish to the user was taken (or there was none).
    Free,
    /// The last publish, still unanswered: hand over after it, be taken after it.
    Follow {
        handed: Option<oneshot::Receiver<()>>,
        id: String,
        answered: Answer,
    },
    /// Publishes to the user were refused from this id on: it must come again first.
    Blocked(String),
}

impl Chains {
    /// What a new publish `id` to `user` must respect.
    fn before(&mut self, user: &str, id: &str) -> Before {
        let answer = match self.users.get(user) {
            None => return Before::Free,
            Some(link) => link.answered.borrow().clone(),
        };
        match answer {
            Some(Ok(_)) => Before::Free,
            Some(Err((_, from))) if from == id => Before::Free,
            Some(Err((_, from))) => Before::Blocked(from),
            None => {
                let link = self.users.remove(user).expect("looked up above");
                let handed = link.handed.and_then(|mut rx| {
                    matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)).then_some(rx)
                });
                Before::Follow {
                    handed,
                    id: link.id,
                    answered: link.answered,
                }
            }
        }
    }

    /// A publish to `user` was refused before it reached the mailbox: later ones to that
    /// user wait for it to come again, as after a refusal by the mailbox.
    fn refused(&mut self, user: &str, id: &str, why: MailboxError) {
        let (_, answered) = watch::channel(Some(Err((why, id.to_string()))));
        let link = Link {
            id: id.to_string(),
            handed: None,
            answered,
        };
        self.push(user.to_string(), link);
    }

    fn push(&mut self, user: String, link: Link) {
        self.users.insert(user, link);
        if self.users.len() > CHAINS_PRUNE_AT {
            // Taken ones only: a refused user stays blocked until its publish comes again.
            self.users
                .retain(|_, l| !matches!(*l.answered.borrow(), Some(Ok(_))));
        }
    }
}

/// Everything a connection needs; one per node.
pub struct Gateway {
    pub node_id: String,
    pub auth: Arc<Auth>,
    pub mailboxes: Mailboxes,
    pub limits: LimitsConfig,
    /// Publish rate limits per token subject.
    pub rates: crate::rate::PublishLimits,
    /// Free space of the data directory's disk.
    pub disk: Arc<crate::disk::DiskSpace>,
    /// One permit per open connection (`limits.connections_max`).
    pub slots: Arc<Semaphore>,
    /// Cancelled when the node starts draining: no new connections, `/readyz` fails.
    pub shutdown: CancellationToken,
    /// Cancelled once the node has handed its leaderships over: each connection then says
    /// `bye` at a random moment within `limits.lame_duck_ms`, so devices reconnect elsewhere
    /// spread out rather than all at once.
    pub bye: CancellationToken,
}

/// How long a silent connection waits for the server's `ping`: `limits.ping_interval_ms`,
/// an eighth more, and one look of the quiet thread ([`super::io::QUIET_POLL`]), which may
/// read a quiet device's ping that much later than it arrived. A client that pings at that
/// same interval itself (as the protocol advises) is then always heard first, so its
/// connection costs one ping and one pong per interval instead of two of each when the two
/// timers race.
pub fn server_ping_after(ping_interval_ms: u64) -> Duration {
    Duration::from_millis(ping_interval_ms + ping_interval_ms / 8) + super::io::QUIET_POLL
}

/// A uniformly random delay within the lame-duck window.
fn lame_duck_delay(window_ms: u64) -> Duration {
    use rand::Rng;
    if window_ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::thread_rng().gen_range(0..window_ms))
}

/// An id that [`check_id`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be 1..={ID_BYTES_MAX} bytes without control characters, got {len} bytes")]
pub struct BadId {
    pub what: String,
    pub len: usize,
}

/// Checks an id (user, device, message): 1..=128 bytes, no control characters.
pub fn check_id(what: &str, id: &str) -> Result<(), BadId> {
    if id.is_empty() || id.len() > ID_BYTES_MAX || id.chars().any(char::is_control) {
        return Err(BadId {
            what: what.to_string(),
            len: id.len(),
        });
    }
    Ok(())
}

impl Gateway {
    /// The writer queue size of a connection.
    pub fn writer_queue(&self) -> usize {
        self.limits.inflight_max as usize + WRITER_QUEUE_EXTRA
    }

    /// Runs one connection. `frames` yields what the client sends; `out` is the
    /// connection's writer queue (the caller's writer task drains it to the socket and
    /// closes the socket once every sender is gone).
    pub async fn run<S>(
        self: Arc<Self>,
        mut frames: S,
        out: OutSender,
        transport: &'static str,
        slot: Option<OwnedSemaphorePermit>,
    ) where
        S: Stream<Item = Result<Frame, CodecError>> + Unpin,
    {
        let Some(_slot) = slot.or_else(|| self.slots.clone().try_acquire_owned().ok()) else {
            send_error(&out, ErrorCode::Overloaded, self.full_message(), None).await;
            return;
        };
        metrics::counter!("warbler_connections_total", "transport" => transport).increment(1);
        let gauge = metrics::gauge!("warbler_connections", "transport" => transport);
        gauge.increment(1.0);
        // The futures of rare steps (the handshake, a re-subscribe, a publish) are boxed
        // while they run: the connection's task, held for as long as the device stays
        // connected, keeps room only for what an idle connection waits on.
        if let Some((claims, mut session)) = Box::pin(self.accept(&mut frames, &out)).await {
            self.serve(frames, &out, &claims, session.as_mut()).await;
            // Dropping the session unsubscribes it, after the acks it forwarded.
            drop(session);
        }
        gauge.decrement(1.0);
    }

    /// What a connection over `limits.connections_max` is told.
    pub fn full_message(&self) -> String {
        format!(
            "this node holds its maximum of {} connections; connect to another node or retry later",
            self.limits.connections_max
        )
    }

    /// The client's `hello`: (token, device, protocol version). `None`: no hello came (the
    /// error frame, if any is due, is queued).
    async fn read_hello<S>(&self, frames: &mut S, out: &OutSender) -> Option<(String, String, u32)>
    where
        S: Stream<Item = Result<Frame, CodecError>> + Unpin,
    {
        let wait = Duration::from_millis(self.limits.hello_timeout_ms);
        match tokio::time::timeout(wait, frames.next()).await {
            Ok(Some(Ok(Frame::Hello { token, device, v }))) => Some((token, device, v)),
            Ok(Some(Ok(other))) => {
                let msg = format!("the first frame must be hello, got {}", other.type_name());
                send_error(out, ErrorCode::HelloRequired, msg, None).await;
                None
            }
            Ok(Some(Err(CodecError::Decode(e)))) => {
                send_decode_error(out, &e).await;
                None
            }
            Ok(Some(Err(CodecError::Io(_)))) | Ok(None) => None,
            Err(_) => {
                let msg = format!(
                    "no hello within {} ms; send hello first",
                    self.limits.hello_timeout_ms
                );
                send_error(out, ErrorCode::HelloRequired, msg, None).await;
                None
            }
        }
    }

    /// Waits for `hello`, authenticates, starts the session. `None`: refused (the error
    /// frame is queued).
    async fn accept<S>(&self, frames: &mut S, out: &OutSender) -> Option<(Claims, Option<Session>)>
    where
        S: Stream<Item = Result<Frame, CodecError>> + Unpin,
    {
        let (token, device, v) = self.read_hello(frames, out).await?;
        if v != PROTOCOL_VERSION {
            let msg = format!(
                "protocol version {v} is not supported; this server speaks v={PROTOCOL_VERSION}"
            );
            send_error(out, ErrorCode::BadRequest, msg, None).await;
            return None;
        }
        let claims = match self.auth.verify(&token) {
            Ok(c) => c,
            Err(e) => {
                send_error(out, ErrorCode::Unauthorized, e.to_string(), None).await;
                return None;
            }
        };
        if let Err(msg) =
            check_id("device", &device).and_then(|_| check_id("user (token sub)", &claims.sub))
        {
            send_error(out, ErrorCode::BadRequest, msg.to_string(), None).await;
            return None;
        }
        if claims.device.as_ref().is_some_and(|d| *d != device) {
            let msg = format!(
                "this token is for device {:?}, not {device:?}",
                claims.device.as_deref().unwrap_or("")
            );
            send_error(out, ErrorCode::Forbidden, msg, None).await;
            return None;
        }
        if claims.allows(Scope::Device) {
            let (user, mailboxes) = (claims.sub.clone(), self.mailboxes.clone());
            match Session::start(user, device, &self.node_id, mailboxes, out).await {
                Ok(session) => Some((claims, Some(session))),
                Err(e) => {
                    tracing::warn!(error = %e, "session start failed");
                    let msg =
                        "the user's mailbox is not available on this node right now; retry shortly";
                    send_error(out, ErrorCode::Unavailable, msg, None).await;
                    None
                }
            }
        } else if claims.allows(Scope::Publish) {
            // A publish-only connection: no deliveries, no cursor.
            let welcome = Frame::Welcome {
                user: claims.sub.clone(),
                device,
                node: self.node_id.clone(),
                acked: 0,
            };
            out.send(welcome).await.ok()?;
            Some((claims, None))
        } else {
            let msg = format!(
                "the token's scope {:?} allows neither device nor publish",
                claims.scope
            );
            send_error(out, ErrorCode::Forbidden, msg, None).await;
            None
        }
    }

    /// The authenticated part: acks, publishes, pings, until either side closes. `device`
    /// is the session of a device connection and the highest seq it handed to the writer.
    ///
    /// A connection silent for `limits.ping_interval_ms` (and a little more, see
    /// [`server_ping_after`]) is sent a `ping`; one silent for `limits.idle_timeout_ms` is
    /// closed with `idle_timeout`.
    async fn serve<S>(
        &self,
        mut frames: S,
        out: &OutSender,
        claims: &Claims,
        mut device: Option<&mut Session>,
    ) where
        S: Stream<Item = Result<Frame, CodecError>> + Unpin,
    {
        // Made at the first publish: most device connections never publish.
        let mut publishing: Option<(Arc<Semaphore>, Option<ConnectionLimits>)> = None;
        let mut chains = Chains::default();
        let ping_after = server_ping_after(self.limits.ping_interval_ms);
        let idle_after = Duration::from_millis(self.limits.idle_timeout_ms);
        let mut heard = Instant::now();
        let mut pinged = false;
        // The highest ack handed to the session: repeats are dropped here.
        let mut forwarded = 0u64;
        // When this connection says bye: a random point of the lame-duck window.
        let mut bye_at: Option<Instant> = None;
        // What the loop waits on lives across its rounds: a frame (a ping, an ack) then
        // moves one deadline forward instead of making and dropping a timer and three
        // waiter registrations each time round.
        let closed = out.closed();
        let bye = self.bye.cancelled();
        let signals = out.signals();
        let timer = tokio::time::sleep_until(heard + ping_after);
        tokio::pin!(closed, bye, signals, timer);
        // A device that has just connected waits for messages: quiet until it says
        // something or is delivered to. A connection that may only publish came to
        // publish: its first publish is read at once, not at the quiet watcher's next look.
        out.set_quiet(device.is_some());
        loop {
            // The one timer serves the ping, the idle timeout and the bye.
            let mut wake_at = heard + if pinged { idle_after } else { ping_after };
            if let Some(at) = bye_at {
                wake_at = wake_at.min(at);
            }
            if timer.deadline() != wake_at {
                timer.as_mut().reset(wake_at);
            }
            let frame = tokio::select! {
                biased;
                // The writer gave up (a slow consumer, or the socket failed).
                _ = &mut closed => return,
                raised = &mut signals, if device.is_some() => {
                    signals.set(out.signals());
                    let session = device.as_mut().expect("checked by the guard");
                    if let Some(last) = Box::pin(session.on_signals(raised)).await {
                        let _ = out.send(last).await;
                        return;
                    }
                    continue;
                }
                _ = &mut bye, if bye_at.is_none() => {
                    bye_at = Some(Instant::now() + lame_duck_delay(self.limits.lame_duck_ms));
                    continue;
                }
                _ = &mut timer => {
                    if bye_at.is_some_and(|at| at <= Instant::now()) {
                        let bye = Frame::Bye { reason: "node is shutting down; reconnect to another node".into(), retry_ms: BYE_RETRY_MS };
                        let _ = out.send(bye).await;
                        metrics::counter!("warbler_drain_byes_total").increment(1);
                        return;
                    }
                    if pinged {
                        let msg = format!("nothing received for {} ms; send a ping (or answer the server's) at least every {} ms", self.limits.idle_timeout_ms, self.limits.ping_interval_ms);
                        let _ = out.try_send(Frame::error(ErrorCode::IdleTimeout, msg, None));
                        metrics::counter!("warbler_idle_connections_closed_total").increment(1);
                        return;
                    }
                    // Never waits: a client that reads nothing has no room for pings either.
                    let _ = out.try_send(Frame::Ping { n: 0 });
                    pinged = true;
                    continue;
                }
                f = frames.next() => f,
            };
            heard = Instant::now();
            pinged = false;
            // Only pings since the last sign of life: the socket is watched with the other
            // quiet ones (see `gateway::io`); anything else moves it back.
            out.set_quiet(matches!(
                frame,
                Some(Ok(Frame::Ping { .. } | Frame::Pong { .. }))
            ));
            match frame {
                None | Some(Err(CodecError::Io(_))) => return,
                Some(Err(CodecError::Decode(e))) => {
                    send_decode_error(out, &e).await;
                    if matches!(e, DecodeError::TooLarge { .. } | DecodeError::Malformed(_)) {
                        return;
                    }
                }
                Some(Ok(Frame::Ack { seq })) => match device.as_mut() {
                    Some(session) => {
                        if seq <= forwarded {
                            continue;
                        }
                        let last = out.sent();
                        if seq > last {
                            // Answered here: the session's queue never holds a flood of them.
                            let msg = format!("ack {seq} is beyond the last delivered seq {last}; ack only seqs you received");
                            send_error(out, ErrorCode::BadRequest, msg, None).await;
                            continue;
                        }
                        forwarded = seq;
                        session.ack(seq);
                    }
                    None => send_error(out, ErrorCode::Forbidden, "this connection receives no messages (its token has no device scope), so it has nothing to ack", None).await,
                },
                Some(Ok(Frame::Ping { n })) => {
                    if out.send(Frame::Pong { n }).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Frame::Pong { .. })) => {}
                Some(Ok(Frame::Publish { id, to, body })) => {
                    let (slots, own_rates) = publishing.get_or_insert_with(|| {
                        let slots = Semaphore::new(self.limits.publish_inflight_max as usize);
                        (Arc::new(slots), self.rates.for_connection())
                    });
                    let Ok(permit) = slots.clone().acquire_owned().await else { return };
                    match self.check_publish(claims, own_rates.as_ref(), (&id, &to), &body) {
                        Err((code, msg)) => {
                            if matches!(code, ErrorCode::RateLimited | ErrorCode::StorageFull) {
                                chains.refused(&to, &id, MailboxError::Overloaded(msg.clone()));
                            }
                            send_error(out, code, msg, Some(id)).await
                        }
                        Ok(()) => Box::pin(self.publish(claims, (id, to, body), out, &mut chains, permit)).await,
                    }
                }
                Some(Ok(Frame::Hello { .. })) => {
                    send_error(out, ErrorCode::BadRequest, "already authenticated; hello is sent once per connection", None).await
                }
                Some(Ok(other)) => {
                    let msg = format!("{} frames are sent by the server, not by clients", other.type_name());
                    send_error(out, ErrorCode::BadRequest, msg, None).await
                }
            }
        }
    }

    /// Hands a checked publish to its user's mailbox and answers `published` (or an error)
    /// once it is durable; `permit` holds one of the connection's publish slots until then.
    ///
    /// Publishes to one user keep the order they came in. Each is handed to the mailbox only
    /// once the one before it to the same user was (then they wait for their fsync
    /// together), and names that one while it is unanswered, so the leader takes it only
    /// after that one. Refused for that reason, it waits for the earlier one's answer: taken,
    /// it goes again; refused, it is refused too. Once a publish to a user is refused, every
    /// later one to that user on this connection is refused until the refused one comes
    /// again (same id). So a publisher that resends from the first refusal, in order, never
    /// has its messages reordered or skipped.
    async fn publish(
        &self,
        claims: &Claims,
        (id, to, body): (String, String, ByteBuf),
        out: &OutSender,
        chains: &mut Chains,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let (mailboxes, out, from) = (self.mailboxes.clone(), out.clone(), claims.sub.clone());
        let chained = !warbler_actors::bugs::on(warbler_actors::bugs::Bug::UnchainedPublishes);
        let order = if chained {
            chains.before(&to, &id)
        } else {
            Before::Free
        };
        let (before, prev) = match order {
            Before::Blocked(first) => {
                let _ = out
                    .send(mailbox_error_frame(&MailboxError::OutOfOrder(first), id))
                    .await;
                return;
            }
            Before::Free => (None, None),
            Before::Follow {
                handed,
                id,
                answered,
            } => (handed, Some((id, answered))),
        };
        // Kept only to send it again after the publish it follows (no copy otherwise).
        let resend = prev.as_ref().map(|_| (body.clone(), from.clone()));
        let after = prev.as_ref().map(|(prev_id, _)| prev_id.clone());
        let (answer_tx, answer_rx) = watch::channel(None);
        // The hand-over yields the wait for the seq, awaited on its own task below.
        #[allow(clippy::async_yields_async)]
        let mut submit = {
            let (mailboxes, to, id) = (mailboxes.clone(), to.clone(), id.clone());
            Box::pin(async move {
                if let Some(before) = before {
                    let _ = before.await;
                }
                mailboxes
                    .publish_submit(to, id, body, Some(from), after)
                    .await
            })
        };
        // Usually the mailbox runs here and is known: the hand-over is done now.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let (handover, handed) = match submit.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(pending) => (Err(pending), None),
            std::task::Poll::Pending => {
                let (handed_over, handed_rx) = oneshot::channel::<()>();
                (Ok((submit, handed_over)), Some(handed_rx))
            }
        };
        let link = Link {
            id: id.clone(),
            handed,
            answered: answer_rx,
        };
        chains.push(to.clone(), link);
        tokio::spawn(async move {
            let pending = match handover {
                Err(pending) => pending,
                Ok((submit, handed_over)) => {
                    let pending = submit.await;
                    drop(handed_over);
                    pending
                }
            };
            let first = pending.await;
            // What each publish followed and got, to trace an order question (debug only).
            let traced = tracing::enabled!(tracing::Level::DEBUG)
                .then(|| (first.clone(), prev.as_ref().map(|(p, _)| p.clone())));
            let outcome = after_previous(first, prev.zip(resend), &mailboxes, (&id, &to)).await;
            if let Some((first, after)) = traced {
                tracing::debug!(%to, %id, after = after.as_deref(), ?first, ?outcome, "publish answered");
            }
            let reply = match &outcome {
                Ok(seq) => Frame::Published { id, to, seq: *seq },
                Err((e, _)) => mailbox_error_frame(e, id),
            };
            // The answer goes out before the next publish to the user learns it.
            let _ = out.send(reply).await;
            let _ = answer_tx.send(Some(outcome));
            drop(permit);
        });
    }

    fn check_publish(
        &self,
        claims: &Claims,
        own_rates: Option<&ConnectionLimits>,
        (id, to): (&str, &str),
        body: &ByteBuf,
    ) -> Result<(), (ErrorCode, String)> {
        if !claims.allows(Scope::Publish) {
            let e = AuthError::Forbidden {
                have: claims.scope.clone(),
                need: Scope::Publish.as_str(),
            };
            return Err((ErrorCode::Forbidden, e.to_string()));
        }
        check_id("id", id).map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
        check_id("to", to).map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
        if body.len() > self.limits.max_body_bytes {
            let msg = format!(
                "body of {} bytes exceeds the limit of {} bytes",
                body.len(),
                self.limits.max_body_bytes
            );
            return Err((ErrorCode::BodyTooLarge, msg));
        }
        self.disk
            .check()
            .map_err(|why| (ErrorCode::StorageFull, why))?;
        if let Some(own) = own_rates {
            own.check(1, body.len())
                .map_err(|e| (ErrorCode::RateLimited, e.to_string()))?;
        }
        self.rates
            .check(&claims.sub, 1, body.len())
            .map_err(|e| (ErrorCode::RateLimited, e.to_string()))
    }
}

/// A publish's outcome given the one before it to the same user (`prev`, if it was
/// unanswered when this one was handed over). Taken, it stands (the leader took it only
/// after `prev`). Refused, it waits for `prev`'s answer: refused as out of order while
/// `prev` was taken, it goes again after it; if `prev` was refused too, it keeps `prev`'s
/// resend point, so the publisher resends from the first refusal of the run.
async fn after_previous(
    first: Result<u64, MailboxError>,
    prev: Option<((String, Answer), (ByteBuf, String))>,
    mailboxes: &Mailboxes,
    (id, to): (&str, &str),
) -> Outcome {
    let (Err(e), Some(((prev_id, mut prev), (body, from)))) = (first.clone(), prev) else {
        return first.map_err(|e| (e, id.to_string()));
    };
    let prev_answer = match prev.wait_for(Option::is_some).await {
        Ok(answer) => answer.clone(),
        Err(_) => None,
    };
    match (e, prev_answer) {
        (MailboxError::OutOfOrder(_), Some(Ok(_))) => mailboxes
            .publish_after(to, id, body, Some(from), Some(prev_id))
            .await
            .map_err(|e| (e, id.to_string())),
        (e, Some(Ok(_))) => Err((e, id.to_string())),
        (MailboxError::OutOfOrder(_), Some(Err((_, resend_from)))) => {
            Err((MailboxError::OutOfOrder(resend_from.clone()), resend_from))
        }
        (e, Some(Err((_, resend_from)))) => Err((e, resend_from)),
        (e, None) => Err((e, prev_id)),
    }
}

pub fn mailbox_error_frame(e: &MailboxError, id: String) -> Frame {
    metrics::counter!("warbler_publish_errors_total").increment(1);
    let code = match e {
        MailboxError::Overloaded(_) => ErrorCode::Overloaded,
        MailboxError::Full(_) => ErrorCode::MailboxFull,
        MailboxError::StorageFull(_) => ErrorCode::StorageFull,
        _ => ErrorCode::Unavailable,
    };
    Frame::error(code, e.to_string(), Some(id))
}

async fn send_error(
    out: &OutSender,
    code: ErrorCode,
    message: impl Into<String>,
    id: Option<String>,
) {
    metrics::counter!("warbler_protocol_errors_total", "code" => code.as_str()).increment(1);
    let _ = out.send(Frame::error(code, message, id)).await;
}

async fn send_decode_error(out: &OutSender, e: &DecodeError) {
    let advice = match e {
        DecodeError::TooLarge { .. } => "; the connection is closed (split the message, or raise limits.max_frame_bytes)",
        DecodeError::Malformed(_) => "; the connection is closed (on TCP each frame is a 4-byte big-endian length and a MessagePack map with a string \"t\"; on a WebSocket each message is one frame: binary MessagePack or a text JSON object)",
        DecodeError::UnknownType(_) => "; known types: hello, ack, publish, ping, pong",
        DecodeError::BadFields { .. } => "; see docs/protocol.md for the fields of each frame",
    };
    send_error(out, e.code(), format!("{e}{advice}"), None).await;
}
