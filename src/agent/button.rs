//! The Button actor: watches the configured input pins and records a
//! `button/<name>` message on each debounced edge, and on nothing else
//! (DESIGN: Topics and payloads). Owns the input pins while it runs; a read
//! failure is an actor failure (restart with back-off). It never publishes
//! directly and never blocks: edges arrive from the GPIO backend's thread as
//! messages. That thread takes a credit for each edge before sending it
//! (`outbox::Credits`, shared by the Button's pins): with all of them on
//! their way to the outbox writer, the backend's thread waits, so a burst of
//! edges waits at its source (the sim socket, the kernel's edge queue)
//! instead of in memory, and no edge is dropped.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use super::recorder::Recorder;
use super::supervisor::{self, SupervisedActor, Supervision};
use crate::config::ButtonConfig;
use crate::gpio::{Edge, Gpio, GpioError, InputPin, InputSpec, Level};
use crate::outbox::{CREDITS, Credit, Credits};
use crate::proto::{Body, ButtonBody, ButtonState, Topics};

/// A debounced edge, or a failure, from the backend.
#[derive(Message)]
#[rtype(result = "()")]
struct PinEvent {
    /// Which acquisition of the pins sent it; events from pins dropped by a
    /// restart are stale and ignored.
    generation: u64,
    /// Which button (index into the config): pins on different chips may
    /// share a number.
    index: usize,
    event: Result<Edge, GpioError>,
    /// Goes with the edge's record to the writer; dropped with a stale or
    /// repeated edge.
    credit: Credit,
}

/// What a level means for a button.
pub fn button_state(level: Level, active_low: bool) -> ButtonState {
    if level.is_high() != active_low { ButtonState::Pressed } else { ButtonState::Released }
}

pub struct Button {
    buttons: Vec<ButtonConfig>,
    gpio: Arc<dyn Gpio>,
    recorder: Recorder,
    topics: Topics,
    sup: Supervision,
    /// Held while running; dropped (and re-acquired) on restart.
    pins: Vec<Box<dyn InputPin>>,
    /// Last recorded state, by button index.
    states: HashMap<usize, ButtonState>,
    generation: u64,
    /// Bounds the edges between the backend's thread and the writer.
    credits: Arc<Credits>,
}

impl Button {
    pub fn new(
        buttons: Vec<ButtonConfig>,
        gpio: Arc<dyn Gpio>,
        recorder: Recorder,
        topics: Topics,
        sup: Supervision,
    ) -> Button {
        Button::with_credits(buttons, gpio, recorder, topics, sup, Credits::new(CREDITS))
    }

    /// [`Button::new`] with its own pool of credits (tests use a small one).
    pub fn with_credits(
        buttons: Vec<ButtonConfig>,
        gpio: Arc<dyn Gpio>,
        recorder: Recorder,
        topics: Topics,
        sup: Supervision,
        credits: Arc<Credits>,
    ) -> Button {
        Button {
            buttons,
            gpio,
            recorder,
            topics,
            sup,
            pins: Vec::new(),
            states: HashMap::new(),
            generation: 0,
            credits,
        }
    }

    /// Lets go of the pins; their events are stale from now on. Their
    /// threads stop waiting for credits first: dropping a pin may join its
    /// thread (rppal's interrupt thread), and the credits it waits for come
    /// back only when this thread handles the queued edges.
    fn drop_pins(&mut self) {
        self.generation += 1;
        self.credits.serve_only(self.generation);
        self.pins.clear();
    }

    fn on_edge(&mut self, index: usize, edge: Edge, credit: Credit) {
        let Some(cfg) = self.buttons.get(index) else {
            return;
        };
        let state = button_state(edge.level, cfg.active_low);
        if self.states.insert(index, state) == Some(state) {
            return;
        }
        self.sup.board().button(&cfg.name, state);
        tracing::info!(button = %cfg.name, ?state, "edge");
        // Not awaited: a future per edge, polled by this actor's context
        // (actix polls every spawned future on each wake-up), cost more
        // than the edge itself under a burst (#8). The outbox logs a
        // record it could not store.
        let recorded = self.recorder.record_now(
            self.topics.button(&cfg.name),
            cfg.qos,
            false,
            edge.at,
            Body::Button(ButtonBody { button: cfg.name.clone(), state }),
            Some(credit),
        );
        if let Err(e) = recorded {
            tracing::error!("button event not recorded: {e}");
        }
    }
}

supervisor::supervised_actor!(Button);

impl Drop for Button {
    /// No backend thread waits for a credit once the Button is gone (at
    /// shutdown the last `Arc` of the GPIO backend, which joins its threads,
    /// may be this actor's; the pins dropped with it may join theirs).
    fn drop(&mut self) {
        self.credits.serve_only(u64::MAX);
    }
}

impl Supervised for Button {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.drop_pins();
        self.sup.restarting();
    }
}

impl SupervisedActor for Button {
    fn supervision(&mut self) -> &mut Supervision {
        &mut self.sup
    }

    fn init(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        self.drop_pins();
        let generation = self.generation;
        for (index, cfg) in self.buttons.iter().enumerate() {
            let addr = ctx.address();
            let credits = Arc::clone(&self.credits);
            let spec = InputSpec {
                chip: cfg.chip.clone(),
                pin: cfg.pin,
                pull: cfg.pull,
                debounce: cfg.debounce,
                active_low: cfg.active_low,
            };
            let pin = self
                .gpio
                .input(
                    &spec,
                    // On the backend's thread: may wait for a credit.
                    Box::new(move |event| {
                        addr.do_send(PinEvent { generation, index, event, credit: credits.take(generation) })
                    }),
                )
                .map_err(|e| format!("button '{}': {e}", cfg.name))?;
            let level = pin.level().map_err(|e| format!("button '{}': {e}", cfg.name))?;
            let state = button_state(level, cfg.active_low);
            // After a restart an edge may have been missed while the pin was
            // failing; the current level is the truth, but it is not an edge.
            self.states.insert(index, state);
            self.sup.board().button_initial(&cfg.name, state);
            self.pins.push(pin);
        }
        Ok(())
    }
}

impl Handler<PinEvent> for Button {
    type Result = ();

    fn handle(&mut self, msg: PinEvent, ctx: &mut Context<Self>) {
        if msg.generation != self.generation {
            return;
        }
        match msg.event {
            Ok(edge) => self.on_edge(msg.index, edge, msg.credit),
            Err(e) => supervisor::fail(self, ctx, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use super::*;
    use crate::agent::status::StatusBoard;
    use crate::agent::supervisor::Supervision;
    use crate::config::{Durability, OutboxConfig, Pull, SupervisorConfig};
    use crate::gpio::sim::SimGpio;
    use crate::outbox::MemStore;
    use crate::proto::Qos;

    /// Answered once the Button has handled every message before it (its
    /// pins are claimed once it answers the first one).
    #[derive(Message)]
    #[rtype(result = "()")]
    struct Settled;

    impl Handler<Settled> for Button {
        type Result = ();
        fn handle(&mut self, _: Settled, _: &mut Context<Self>) {}
    }

    #[test]
    fn a_burst_of_edges_far_beyond_the_credits_is_recorded_whole_and_in_order() {
        const N: usize = 3000;
        let dir = tempfile::tempdir().expect("tempdir");
        let sim: Arc<dyn Gpio> = Arc::new(SimGpio::start(dir.path()).expect("the simulated board"));
        let cfg = OutboxConfig {
            max_bytes: 64 << 20,
            durability: Durability::Batch,
            flush_interval: Duration::from_millis(5),
        };
        let (outbox, reader, _) = crate::outbox::open_in_memory(&MemStore::new(), &cfg).expect("in-memory outbox");
        // Two credits: the sim socket's client is held back almost at once.
        let credits = Credits::new(2);
        let door = ButtonConfig {
            name: "door".into(),
            chip: None,
            pin: 17,
            pull: Pull::Down,
            active_low: false,
            debounce: Duration::ZERO,
            qos: Qos::AtLeastOnce,
        };
        let sup_cfg = SupervisorConfig {
            max_restarts: 100,
            window: Duration::from_secs(60),
            backoff_max: Duration::from_millis(10),
        };
        let sup = Supervision::new("button", Arc::new(StatusBoard::new("pi")), &sup_cfg);
        let socket = crate::gpio::sim::socket_path(dir.path());
        System::new().block_on({
            let (outbox, credits) = (outbox.clone(), Arc::clone(&credits));
            async move {
                let recorder = Recorder::new("pi", 7, outbox.clone());
                let button = Supervisor::start(move |_| {
                    Button::with_credits(vec![door], sim, recorder, Topics::new("fl", "pi"), sup, credits)
                });
                button.send(Settled).await.expect("the Button runs");
                // The client streams every line at once, on its own thread
                // (the actors' thread must keep running), and reads the answers.
                let client = std::thread::spawn(move || {
                    let mut stream = UnixStream::connect(&socket).expect("connect to the sim socket");
                    let lines: String = (0..N).map(|i| if i % 2 == 0 { "set 17 1\n" } else { "set 17 0\n" }).collect();
                    stream.write_all(lines.as_bytes()).expect("write the lines");
                    BufReader::new(stream).lines().take(N).filter(|l| l.as_deref().is_ok_and(|a| a == "ok")).count()
                });
                while outbox.stats().depth < N as u64 || outbox.stats().durable_seq < N as u64 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                assert_eq!(client.join().expect("the client finished"), N, "every line answered ok");
            }
        });
        let records = reader.read(1, u64::MAX, N + 10).expect("read the outbox");
        assert_eq!(records.len(), N, "one record per edge, none lost");
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1, "in edge order");
            let state = if i % 2 == 0 { r#""state":"pressed""# } else { r#""state":"released""# };
            let payload = String::from_utf8_lossy(&r.payload);
            assert!(payload.contains(state), "record {i}: {payload}");
        }
        assert_eq!(credits.out(), 0, "every credit came back");
        outbox.shutdown();
    }

    #[test]
    fn an_active_low_button_is_pressed_when_its_pin_is_low() {
        assert_eq!(button_state(Level::Low, true), ButtonState::Pressed);
        assert_eq!(button_state(Level::High, true), ButtonState::Released);
        assert_eq!(button_state(Level::High, false), ButtonState::Pressed);
        assert_eq!(button_state(Level::Low, false), ButtonState::Released);
    }
}
