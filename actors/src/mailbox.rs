//! Bounded, counted mailboxes and the guarded handler shell every phase
//! actor uses.
//!
//! actix does not expose mailbox depth (TECH-NOTES), so [`PhaseAddr`] counts
//! it: +1 when a message is handed to the mailbox, −1 when its handler
//! starts ([`Inbox::received`]). All sends to a phase go through a
//! `PhaseAddr`, never through the raw `Addr`, so the count is exact.
//!
//! Two delivery modes, chosen per message by what losing it would mean:
//! - [`PhaseAddr::send`] waits for room (backpressure) — for messages that
//!   must not be lost (approved policies, executions, audit records);
//! - [`PhaseAddr::offer`] sheds when the mailbox is full and counts it — for
//!   level-triggered messages that the next cycle supersedes (violation
//!   snapshots, analyses).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use actix::dev::ToEnvelope;
use actix::prelude::*;

use crate::events::{EventBus, LoopEvent};
use crate::metrics::{ActorKind, ActorLabels, ActorMessageLabels, Metrics};

/// Mailbox capacity when none is configured.
pub const DEFAULT_CAPACITY: usize = 64;

/// A message with a stable name for metrics and logs.
pub trait Named {
    /// Message type name (`ViolationsDetected`).
    const NAME: &'static str;
}

/// Fault injection for chaos tests: called at the start of every handler,
/// inside the panic guard. Production passes none.
pub trait FaultInjector: Send + Sync + 'static {
    /// May panic to simulate a crashing handler.
    fn before_handle(&self, actor: ActorKind, message: &'static str);
}

/// The counting side of one actor's mailbox, shared by its [`PhaseAddr`]s
/// and the actor itself.
#[derive(Clone)]
pub struct Inbox {
    kind: ActorKind,
    depth: Arc<AtomicI64>,
    metrics: Arc<Metrics>,
    chaos: Option<Arc<dyn FaultInjector>>,
    events: EventBus,
    up: Arc<AtomicBool>,
    crashed: Arc<AtomicBool>,
    slots: Arc<tokio::sync::Semaphore>,
    overdraft: Arc<std::sync::atomic::AtomicUsize>,
    last_crash: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    grace: std::time::Duration,
}

impl Inbox {
    /// A new inbox for `kind`.
    pub fn new(
        kind: ActorKind,
        metrics: Arc<Metrics>,
        chaos: Option<Arc<dyn FaultInjector>>,
        events: EventBus,
    ) -> Self {
        Inbox {
            kind,
            depth: Arc::new(AtomicI64::new(0)),
            metrics,
            chaos,
            events,
            up: Arc::new(AtomicBool::new(false)),
            crashed: Arc::new(AtomicBool::new(false)),
            slots: Arc::new(tokio::sync::Semaphore::new(DEFAULT_CAPACITY)),
            overdraft: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            last_crash: Arc::new(std::sync::Mutex::new(None)),
            grace: std::time::Duration::from_secs(60),
        }
    }

    /// Bounds the mailbox to `capacity` messages (default 64).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.slots = Arc::new(tokio::sync::Semaphore::new(capacity.max(1)));
        self
    }

    /// Frees one mailbox slot (a message left the mailbox), or pays back
    /// one overdrawn slot.
    fn release_slot(&self) {
        let paid = self
            .overdraft
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !paid {
            self.slots.add_permits(1);
        }
    }

    /// How long after a crash an actor that has not handled a message
    /// successfully since still counts as down (the restart period).
    pub fn with_grace(mut self, grace: std::time::Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Whether the actor runs and is not failing: after a crash it counts
    /// as down until a handler succeeds again, or until `grace` passes
    /// without another crash. An actor in a crash loop stays down; an idle
    /// one that crashed once comes back up.
    pub fn is_up(&self) -> bool {
        if self.up.load(Ordering::SeqCst) {
            return true;
        }
        let last = *self.last_crash.lock().unwrap_or_else(|p| p.into_inner());
        last.is_some_and(|t| t.elapsed() > self.grace)
    }

    /// Called from `started()`: up on the first start; after a restart the
    /// actor stays down until a handler succeeds.
    pub fn started(&self) {
        if !self.crashed.swap(false, Ordering::SeqCst) {
            self.mark_up();
        }
    }

    /// Publishes a loop event (never blocks).
    pub fn emit(&self, event: LoopEvent) {
        let _ = self.events.send(event);
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Which actor it belongs to.
    pub fn kind(&self) -> ActorKind {
        self.kind
    }

    /// Messages waiting now.
    pub fn depth(&self) -> i64 {
        self.depth.load(Ordering::SeqCst)
    }

    /// Shared metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn set_gauge(&self, depth: i64) {
        self.metrics
            .mailbox_depth
            .get_or_create(&ActorLabels {
                actor: self.kind.as_str(),
            })
            .set(depth);
    }

    fn enqueued(&self) {
        let d = self.depth.fetch_add(1, Ordering::SeqCst) + 1;
        self.set_gauge(d);
    }

    fn unqueued(&self) {
        let d = self.depth.fetch_sub(1, Ordering::SeqCst) - 1;
        self.set_gauge(d);
    }

    fn shed(&self, message: &'static str) {
        self.metrics
            .messages_shed
            .get_or_create(&ActorMessageLabels {
                actor: self.kind.as_str(),
                message,
            })
            .inc();
    }

    /// Called by the actor when a handler starts: counts the message as
    /// taken out of the mailbox and handled; the returned guard records the
    /// handler's duration when dropped.
    pub fn received(&self, message: &'static str) -> HandlerTimer {
        self.unqueued();
        self.release_slot();
        self.metrics
            .messages_handled
            .get_or_create(&ActorMessageLabels {
                actor: self.kind.as_str(),
                message,
            })
            .inc();
        HandlerTimer {
            metrics: self.metrics.clone(),
            labels: ActorMessageLabels {
                actor: self.kind.as_str(),
                message,
            },
            started: std::time::Instant::now(),
        }
    }

    /// Runs a handler body under the panic guard: a panic (or a
    /// [`Fault`]) is logged and stops the actor so its supervisor restarts
    /// it; the message in hand is lost, queued messages are kept.
    pub fn guard<A, R>(
        &self,
        act: &mut A,
        ctx: &mut Context<A>,
        message: &'static str,
        body: impl FnOnce(&mut A, &mut Context<A>) -> Result<R, Fault>,
    ) -> Option<R>
    where
        A: Actor<Context = Context<A>>,
    {
        let _timer = self.received(message);
        self.guard_internal(act, ctx, message, body)
    }

    /// Like [`Inbox::guard`] for work the actor started itself (timers,
    /// completions of its own futures): runs it under the panic guard
    /// without counting a mailbox message.
    pub fn guard_internal<A, R>(
        &self,
        act: &mut A,
        ctx: &mut Context<A>,
        message: &'static str,
        body: impl FnOnce(&mut A, &mut Context<A>) -> Result<R, Fault>,
    ) -> Option<R>
    where
        A: Actor<Context = Context<A>>,
    {
        let chaos = self.chaos.clone();
        let kind = self.kind;
        let result = catch_unwind(AssertUnwindSafe(|| {
            if let Some(c) = &chaos {
                c.before_handle(kind, message);
            }
            body(act, ctx)
        }));
        match result {
            Ok(Ok(r)) => {
                if !self.is_up() {
                    tracing::info!(actor = %kind, "actor handles messages again");
                    self.mark_up();
                }
                Some(r)
            }
            Ok(Err(fault)) => {
                tracing::error!(actor = %kind, message, error = %fault, "handler failed; restarting actor");
                self.mark_down();
                ctx.stop();
                None
            }
            Err(panic) => {
                tracing::error!(actor = %kind, message, panic = %panic_message(&panic), "handler panicked; restarting actor");
                self.mark_down();
                ctx.stop();
                None
            }
        }
    }

    /// Marks the actor as up (metric and readiness).
    pub fn mark_up(&self) {
        self.up.store(true, Ordering::SeqCst);
        self.metrics
            .actor_up
            .get_or_create(&ActorLabels {
                actor: self.kind.as_str(),
            })
            .set(1);
    }

    /// Marks the actor as down after a failure (metric and readiness).
    pub fn mark_down(&self) {
        self.up.store(false, Ordering::SeqCst);
        *self.last_crash.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now());
        self.crashed.store(true, Ordering::SeqCst);
        self.metrics
            .actor_up
            .get_or_create(&ActorLabels {
                actor: self.kind.as_str(),
            })
            .set(0);
    }
}

/// Text of a caught panic payload.
pub fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// An actor-level failure: the actor cannot go on with its state and must be
/// restarted. Errors that concern only the caller (an unknown policy id) are
/// returned in the message's result instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fault(pub String);

/// Records a handler's duration when dropped.
pub struct HandlerTimer {
    metrics: Arc<Metrics>,
    labels: ActorMessageLabels,
    started: std::time::Instant,
}

impl Drop for HandlerTimer {
    fn drop(&mut self) {
        self.metrics
            .handler_duration
            .get_or_create(&self.labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Why a message was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The mailbox was full and the message was shed.
    #[error("mailbox of {0} is full; message shed")]
    Full(ActorKind),
    /// The actor is gone (or dropped the message while restarting).
    #[error("{0} is not running")]
    Closed(ActorKind),
}

/// Address of a phase actor with a counted, bounded mailbox.
pub struct PhaseAddr<A: Actor> {
    addr: Addr<A>,
    inbox: Inbox,
}

impl<A: Actor> Clone for PhaseAddr<A> {
    fn clone(&self) -> Self {
        PhaseAddr {
            addr: self.addr.clone(),
            inbox: self.inbox.clone(),
        }
    }
}

impl<A: Actor> PhaseAddr<A> {
    /// Wraps an address with the inbox its actor decrements.
    pub fn new(addr: Addr<A>, inbox: Inbox) -> Self {
        PhaseAddr { addr, inbox }
    }

    /// Messages waiting in the mailbox now.
    pub fn depth(&self) -> i64 {
        self.inbox.depth()
    }

    /// Whether the actor is still reachable.
    pub fn connected(&self) -> bool {
        self.addr.connected()
    }

    /// Whether the actor is reachable and not failing (see [`Inbox::is_up`]).
    pub fn is_up(&self) -> bool {
        self.addr.connected() && self.inbox.is_up()
    }

    /// Sets the `mape_k_actor_up` gauge from [`PhaseAddr::is_up`].
    pub fn refresh_up_gauge(&self) {
        self.inbox
            .metrics
            .actor_up
            .get_or_create(&ActorLabels {
                actor: self.inbox.kind.as_str(),
            })
            .set(i64::from(self.is_up()));
    }

    /// Sends, waiting for room (backpressure) and for the handler's
    /// answer. Delivery runs on a detached task: a caller that gives up
    /// (an HTTP client that disconnects, a restarted actor's future) does
    /// not lose the message, and the mailbox count stays exact (actix drops
    /// a queued message whose reply channel closed without running its
    /// handler).
    pub async fn send<M>(&self, msg: M) -> Result<M::Result, DeliveryError>
    where
        M: Message + Named + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        self.port().send(msg).await
    }

    /// Delivers without waiting, even past the capacity (counted as an
    /// overdraft that the next handled messages pay back). Only for rare
    /// control messages that must neither be lost nor block the sender
    /// (restart notices).
    pub fn push<M>(&self, msg: M)
    where
        M: Message + Named + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        self.port().push(msg)
    }

    /// Delivers if the mailbox has room; otherwise sheds the message and
    /// counts it.
    pub fn offer<M>(&self, msg: M) -> Result<(), DeliveryError>
    where
        M: Message + Named + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        self.port().offer(msg)
    }
}

/// A typed port to whichever phase handles `M`: what a phase holds to send
/// to another, so phases know messages, not each other's actor types (only
/// the supervisor wires ports to actors). Same delivery modes and counting
/// as [`PhaseAddr`].
pub struct PhasePort<M>
where
    M: Message + Send,
    M::Result: Send,
{
    recipient: Recipient<M>,
    inbox: Inbox,
}

impl<M> Clone for PhasePort<M>
where
    M: Message + Send,
    M::Result: Send,
{
    fn clone(&self) -> Self {
        PhasePort {
            recipient: self.recipient.clone(),
            inbox: self.inbox.clone(),
        }
    }
}

impl<A: Actor> PhaseAddr<A> {
    /// The port through which others send `M` to this actor.
    pub fn port<M>(&self) -> PhasePort<M>
    where
        M: Message + Named + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        PhasePort {
            recipient: self.addr.clone().recipient(),
            inbox: self.inbox.clone(),
        }
    }
}

impl<M> PhasePort<M>
where
    M: Message + Named + Send + 'static,
    M::Result: Send,
{
    /// Messages waiting in the receiving mailbox now.
    pub fn depth(&self) -> i64 {
        self.inbox.depth()
    }

    /// Whether the receiving actor is still reachable.
    pub fn connected(&self) -> bool {
        self.recipient.connected()
    }

    /// Sends, waiting for room and for the answer: delivery runs on a
    /// detached task, so a caller that gives up does not lose the message
    /// and the count stays exact.
    pub async fn send(&self, msg: M) -> Result<M::Result, DeliveryError> {
        if !self.recipient.connected() {
            self.inbox.shed(M::NAME);
            return Err(DeliveryError::Closed(self.inbox.kind));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let recipient = self.recipient.clone();
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            match inbox.slots.clone().acquire_owned().await {
                Ok(permit) => permit.forget(),
                Err(_) => return,
            }
            if !recipient.connected() {
                inbox.release_slot();
                inbox.shed(M::NAME);
                return;
            }
            inbox.enqueued();
            let _ = tx.send(recipient.send(msg).await.ok());
        });
        match rx.await {
            Ok(Some(r)) => Ok(r),
            _ => Err(DeliveryError::Closed(self.inbox.kind)),
        }
    }

    /// Delivers without waiting, even past the capacity (an overdraft the
    /// next handled messages pay back); for rare control messages.
    pub fn push(&self, msg: M) {
        if !self.recipient.connected() {
            self.inbox.shed(M::NAME);
            return;
        }
        match self.inbox.slots.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                self.inbox.overdraft.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.inbox.enqueued();
        self.recipient.do_send(msg);
    }

    /// Delivers if the mailbox has room, else sheds and counts.
    pub fn offer(&self, msg: M) -> Result<(), DeliveryError> {
        match self.inbox.slots.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                self.inbox.shed(M::NAME);
                tracing::warn!(actor = %self.inbox.kind, message = M::NAME, "mailbox full; message shed");
                return Err(DeliveryError::Full(self.inbox.kind));
            }
        }
        if !self.recipient.connected() {
            self.inbox.release_slot();
            self.inbox.shed(M::NAME);
            return Err(DeliveryError::Closed(self.inbox.kind));
        }
        self.inbox.enqueued();
        self.recipient.do_send(msg);
        Ok(())
    }
}

/// Counts a restart and tells the supervisor (shared by every phase actor).
pub(crate) fn note_restart(inbox: &Inbox, supervisor: &PhasePort<crate::messages::ActorRestarted>) {
    inbox
        .metrics()
        .restarts
        .get_or_create(&crate::metrics::ActorLabels {
            actor: inbox.kind().as_str(),
        })
        .inc();
    tracing::warn!(actor = %inbox.kind(), "actor restarting");
    inbox.emit(crate::events::LoopEvent::Restarted {
        actor: inbox.kind(),
    });
    supervisor.push(crate::messages::ActorRestarted {
        actor: inbox.kind(),
    });
}

#[cfg(test)]
mod bound_tests {
    use std::sync::Arc;

    use actix::prelude::*;
    use tokio::sync::Semaphore;

    use super::*;

    /// An actor whose every message waits for a permit while its mailbox is
    /// paused (`ctx.wait`): it can be held, so senders can be seen waiting.
    struct Held {
        inbox: Inbox,
        gate: Arc<Semaphore>,
    }

    impl Actor for Held {
        type Context = Context<Self>;
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Work;

    impl Named for Work {
        const NAME: &'static str = "Work";
    }

    impl Handler<Work> for Held {
        type Result = ();

        fn handle(&mut self, _msg: Work, ctx: &mut Context<Self>) {
            let _timer = self.inbox.received("Work");
            let gate = self.gate.clone();
            ctx.wait(
                async move {
                    if let Ok(p) = gate.acquire().await {
                        p.forget();
                    }
                }
                .into_actor(self),
            );
        }
    }

    #[test]
    fn waiting_senders_are_not_queued_and_an_abandoned_one_still_delivers() {
        let sys = System::new();
        sys.block_on(async {
            let metrics = Arc::new(Metrics::new());
            let inbox = Inbox::new(
                ActorKind::Executor,
                metrics.clone(),
                None,
                crate::events::bus(16),
            )
            .with_capacity(4);
            let gate = Arc::new(Semaphore::new(0));
            let addr = PhaseAddr::new(
                Held {
                    inbox: inbox.clone(),
                    gate: gate.clone(),
                }
                .start(),
                inbox,
            );
            // The first message is taken and holds the actor.
            addr.offer(Work).expect("room");
            while addr.depth() != 0 {
                tokio::task::yield_now().await;
            }
            let (mut ok, mut shed) = (0, 0);
            for _ in 0..6 {
                match addr.offer(Work) {
                    Ok(()) => ok += 1,
                    Err(_) => shed += 1,
                }
            }
            assert_eq!((ok, shed), (4, 2));
            let waiting: Vec<_> = (0..3)
                .map(|_| {
                    let a = addr.clone();
                    tokio::spawn(async move { a.send(Work).await })
                })
                .collect();
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            assert_eq!(addr.depth(), 4, "bounded: waiting senders are not queued");
            assert!(
                waiting.iter().all(|w| !w.is_finished()),
                "they wait for room"
            );
            let mut waiting = waiting.into_iter();
            if let Some(first) = waiting.next() {
                first.abort();
            }
            gate.add_permits(100);
            for w in waiting {
                w.await.expect("join").expect("delivered");
            }
            while addr.depth() != 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let handled = metrics
                .messages_handled
                .get_or_create(&ActorMessageLabels {
                    actor: "executor",
                    message: "Work",
                })
                .get();
            assert_eq!(handled, 1 + 4 + 3, "the abandoned sender's message too");
        });
    }
}
