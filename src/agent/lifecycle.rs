//! The process lifecycle actor: owns the signal handlers (DESIGN: Status
//! dump). SIGUSR1 takes a status dump (`status_dump`: writes
//! `<state_dir>/status.json` atomically and logs a one-line summary, on a
//! blocking thread); SIGTERM and SIGINT flush the outbox, publish `offline`,
//! disconnect and stop the system (exit 0). It is not supervised and must
//! never fail: tokio never restores a signal's default action once a handler
//! is registered (crates.md §1), so if this actor died SIGTERM would be
//! swallowed. At SIGTERM it tells systemd `STOPPING=1` first.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::prelude::*;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::link::{Link, Shutdown};
use super::status_dump::StatusDump;
use crate::outbox::OutboxHandle;
use crate::sd_notify::Notifier;

/// The most SIGTERM waits for the Link to say goodbye.
const LINK_GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Dump,
    Terminate,
}

fn signal_stream(kind: SignalKind, what: Sig) -> std::io::Result<impl Stream<Item = Sig> + Unpin> {
    let s: Signal = signal(kind)?;
    Ok(Box::pin(futures_util::stream::unfold(s, move |mut s| async move { s.recv().await.map(|()| (what, s)) })))
}

/// Registers SIGUSR1, SIGTERM and SIGINT. Call this before starting the
/// actors: a signal that arrives before [`Lifecycle`] runs is kept, not lost
/// and not left to its default action. Needs a tokio runtime.
pub fn register_signals() -> std::io::Result<impl Stream<Item = Sig> + Unpin + 'static> {
    let usr1 = signal_stream(SignalKind::user_defined1(), Sig::Dump)?;
    let term = signal_stream(SignalKind::terminate(), Sig::Terminate)?;
    let int = signal_stream(SignalKind::interrupt(), Sig::Terminate)?;
    Ok(futures_util::stream::select(usr1, futures_util::stream::select(term, int)))
}

pub struct Lifecycle<S> {
    signals: Option<S>,
    dumper: Arc<StatusDump>,
    /// A SIGUSR1 dump is queued and has not started yet: more signals meanwhile
    /// add nothing (it renders the board when it starts), so a SIGUSR1 flood
    /// cannot pile up blocked threads.
    dump_queued: Arc<AtomicBool>,
    outbox: OutboxHandle,
    link: Addr<Link>,
    /// actix restarts a supervised actor only while some `Addr` to it is
    /// alive (crates.md §1); an actor whose only addresses sat in the pins it
    /// just dropped would silently stay dead. Holding them here keeps every
    /// supervised actor restartable for the life of the process.
    _supervised: Vec<Box<dyn std::any::Any>>,
    notifier: Notifier,
    terminating: bool,
}

impl<S: Stream<Item = Sig> + Unpin + 'static> Lifecycle<S> {
    pub fn new(
        signals: S,
        dumper: Arc<StatusDump>,
        outbox: OutboxHandle,
        link: Addr<Link>,
        supervised: Vec<Box<dyn std::any::Any>>,
        notifier: Notifier,
    ) -> Lifecycle<S> {
        Lifecycle {
            signals: Some(signals),
            dumper,
            dump_queued: Arc::new(AtomicBool::new(false)),
            outbox,
            link,
            _supervised: supervised,
            notifier,
            terminating: false,
        }
    }

    fn dump(&self) {
        if self.dump_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let (dumper, queued) = (self.dumper.clone(), self.dump_queued.clone());
        // A dump reads the outbox and fsyncs: keep it off the actor's
        // thread. It logs its own outcome, so the result has nothing to add.
        tokio::task::spawn_blocking(move || {
            // A signal from now on asks for a newer dump than this one.
            queued.store(false, Ordering::Release);
            let _logged = dumper.take();
        });
    }

    fn terminate(&mut self, ctx: &mut Context<Self>) {
        if self.terminating {
            return;
        }
        self.terminating = true;
        self.notifier.send("STOPPING=1\nSTATUS=stopping: flushing the outbox, publishing offline");
        tracing::info!("terminating: flushing the outbox, publishing offline, disconnecting");
        let link = self.link.clone();
        let outbox = self.outbox.clone();
        let goodbye = async move {
            if let Err(e) = outbox.flush().await {
                tracing::error!("outbox flush failed: {e}");
            }
            if tokio::time::timeout(LINK_GOODBYE_TIMEOUT, link.send(Shutdown)).await.is_err() {
                tracing::warn!("the link did not finish in time; the broker's last will says offline");
            }
        };
        ctx.spawn(goodbye.into_actor(self).map(|(), _, _| System::current().stop()));
    }
}

impl<S: Stream<Item = Sig> + Unpin + 'static> Actor for Lifecycle<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(signals) = self.signals.take() {
            ctx.add_stream(signals);
        }
    }
}

impl<S: Stream<Item = Sig> + Unpin + 'static> StreamHandler<Sig> for Lifecycle<S> {
    fn handle(&mut self, sig: Sig, ctx: &mut Context<Self>) {
        match sig {
            Sig::Dump => self.dump(),
            Sig::Terminate => self.terminate(ctx),
        }
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // A signal stream never ends; and this actor must not stop.
    }
}
