//! Supervision glue between actix and [`RestartPolicy`] (DESIGN: Supervision).
//!
//! actix's `Supervisor` restarts an actor only after it stops itself
//! (`ctx.stop()`), restarts it at once in a busy loop, and never restarts one
//! that panicked (crates.md §1). So:
//!
//! * an actor that fails calls [`fail`], which records the error and stops it;
//! * `Supervised::restarting` calls [`Supervision::restarting`], which counts
//!   the restart, picks the back-off, or escalates (exit code 1);
//! * `started` calls [`start_after_backoff`], which waits the back-off with
//!   `ctx.wait` (the mailbox is held, so messages wait rather than get lost)
//!   and then runs the actor's `init`; an `init` error is a failure too;
//! * a panic ends the process (the panic hook in `agent::run`); systemd
//!   restarts it and the outbox makes that safe.
//!
//! It owns no actor state and must not decide anything itself: the decision
//! rule is in `restart_policy`.

use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::restart_policy::{Decision, RestartPolicy};
use super::status::StatusBoard;
use crate::config::SupervisorConfig;

/// The exit code when restarts exceed the limit.
pub const ESCALATION_EXIT_CODE: i32 = 1;

/// Per-actor supervision state; lives in the actor struct, so it survives
/// restarts.
#[derive(Debug)]
pub struct Supervision {
    name: &'static str,
    board: Arc<StatusBoard>,
    policy: RestartPolicy,
    delay: Duration,
}

impl Supervision {
    pub fn new(name: &'static str, board: Arc<StatusBoard>, cfg: &SupervisorConfig) -> Supervision {
        Supervision { name, board, policy: RestartPolicy::new(cfg), delay: Duration::ZERO }
    }

    pub fn board(&self) -> &Arc<StatusBoard> {
        &self.board
    }

    /// Call from `Supervised::restarting`.
    pub fn restarting(&mut self) {
        self.board.actor_restarted(self.name);
        match self.policy.on_failure(Instant::now()) {
            Decision::Restart(delay) => {
                tracing::warn!(actor = self.name, "restarting in {}", humantime::format_duration(delay));
                self.delay = delay;
            }
            Decision::Escalate { restarts_in_window } => {
                tracing::error!(
                    actor = self.name,
                    "{restarts_in_window} restarts within the window: the fault is not transient; exiting with code {ESCALATION_EXIT_CODE} so the service manager restarts the process"
                );
                System::current().stop_with_code(ESCALATION_EXIT_CODE);
                // The system is stopping; keep this actor from spinning until then.
                self.delay = Duration::from_secs(3600);
            }
        }
    }
}

/// An actor run under [`Supervision`].
pub trait SupervisedActor: Actor<Context = Context<Self>> + Supervised {
    fn supervision(&mut self) -> &mut Supervision;
    /// Acquire what the actor needs; an error is a failure (restart).
    fn init(&mut self, ctx: &mut Context<Self>) -> Result<(), String>;
}

/// `impl Actor` for a [`SupervisedActor`]: `started` waits the pending
/// back-off, then runs `init` ([`start_after_backoff`]). Every supervised
/// actor starts this way.
macro_rules! supervised_actor {
    ($actor:ty) => {
        impl ::actix::Actor for $actor {
            type Context = ::actix::Context<Self>;

            fn started(&mut self, ctx: &mut ::actix::Context<Self>) {
                $crate::agent::supervisor::start_after_backoff(self, ctx);
            }
        }
    };
}
pub(crate) use supervised_actor;

/// Call from `Actor::started`: waits the pending back-off, then `init`.
pub fn start_after_backoff<A: SupervisedActor>(act: &mut A, ctx: &mut Context<A>) {
    let delay = std::mem::take(&mut act.supervision().delay);
    ctx.wait(actix::clock::sleep(delay).into_actor(act).map(|_, act: &mut A, ctx| match act.init(ctx) {
        Ok(()) => {
            let sup = act.supervision();
            sup.board.actor_running(sup.name);
            tracing::debug!(actor = sup.name, "running");
        }
        Err(e) => fail(act, ctx, e),
    }));
}

/// The actor failed: record why and stop it, so the supervisor restarts it.
pub fn fail<A: SupervisedActor>(act: &mut A, ctx: &mut Context<A>, error: impl Display) {
    let sup = act.supervision();
    let error = error.to_string();
    tracing::error!(actor = sup.name, "failed: {error}");
    sup.board.actor_failed(sup.name, error);
    ctx.stop();
}
