//! The TCP proxy of the black-box tests: real TCP on 127.0.0.1 between an
//! agent and its broker, with the faults a field link has. It owns the
//! sockets between the two and what happens to the bytes on them; it must not
//! know anything about fieldlink (it sees MQTT packets, never payloads'
//! meaning) and it never asserts: tests read its counters.
//!
//! * **Latency** per direction ([`Proxy::set_latency`]): every packet is held
//!   that long before it is written on; order is kept.
//! * **Cut** ([`Proxy::cut`]): every live connection is closed (both ends) and
//!   new ones are closed as soon as they are accepted, until [`Proxy::heal`].
//! * **Flap** ([`Proxy::flap`]): a background thread cuts the link every
//!   `every` for `down_for`, on a fixed schedule counted from its start, until
//!   the returned [`Flapper`] is stopped or dropped (which heals).
//! * **Blackhole** ([`Proxy::blackhole`]): the sockets stay open but no byte
//!   goes through in either direction (everything read is discarded), like a
//!   route that silently died; [`Proxy::heal`] ends it.
//! * **Packet rules** ([`Proxy::set_rule`]): the proxy splits each direction
//!   into MQTT packets (fixed header + remaining length) and asks the rule
//!   what to do with each one: forward, drop, or sever the connection before
//!   or after it. That is how a test drops the agent's PUBACKs, or cuts the
//!   link between a broker's PUBREC and the agent's PUBREL.
//! * **Counters**: connections served and refused, and packets by direction
//!   and type ([`Proxy::packets`]).
//!
//! Bytes that do not parse as MQTT are forwarded as they are.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Which way a packet travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From the client (the agent) to the broker.
    ToBroker,
    /// From the broker to the client.
    ToClient,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::ToBroker => 0,
            Dir::ToClient => 1,
        }
    }
}

/// What the proxy does with one MQTT packet (see [`Proxy::set_rule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    /// Discard it; the connection stays up.
    Drop,
    /// Discard it and close this connection (both ends). The proxy stays up,
    /// so the client can reconnect at once.
    Sever,
    /// Forward it, then close this connection.
    ForwardThenSever,
}

/// MQTT control packet types (the high nibble of the first byte).
pub mod packet {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;

    /// The type of a packet from its first byte.
    pub fn kind(frame: &[u8]) -> u8 {
        frame.first().map_or(0, |b| b >> 4)
    }

    /// The packet id of a PUBACK, PUBREC, PUBREL or PUBCOMP.
    pub fn ack_id(frame: &[u8]) -> Option<u16> {
        Some(u16::from_be_bytes([*frame.get(2)?, *frame.get(3)?]))
    }
}

/// Decides the fate of each packet; called from the proxy's threads.
pub type Rule = Box<dyn FnMut(Dir, &[u8]) -> Verdict + Send>;

/// A TCP proxy on 127.0.0.1 in front of a broker.
pub struct Proxy {
    port: u16,
    inner: Arc<Inner>,
}

struct Inner {
    upstream: u16,
    state: Mutex<State>,
    stop: AtomicBool,
    blackhole: AtomicBool,
    /// Per direction ([`Dir::index`]), in microseconds.
    latency_us: [AtomicU64; 2],
    rule: Mutex<Option<Rule>>,
    served: AtomicUsize,
    refused: AtomicUsize,
    next_id: AtomicU64,
    /// (direction, packet type) -> packets seen (forwarded or not).
    packets: Mutex<HashMap<(Dir, u8), usize>>,
}

struct State {
    down: bool,
    /// Both ends of every live connection, by connection id.
    conns: Vec<(u64, TcpStream, TcpStream)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Closes both directions of each stream.
fn close(streams: &[&TcpStream]) {
    for s in streams {
        // An error means the peer closed it already, which is all we want.
        let _ = s.shutdown(Shutdown::Both);
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn cut(&self) {
        let mut st = self.state();
        st.down = true;
        for (_, a, b) in st.conns.drain(..) {
            close(&[&a, &b]);
        }
    }

    fn heal(&self) {
        self.state().down = false;
        self.blackhole.store(false, Ordering::SeqCst);
    }

    fn sever(&self, id: u64) {
        let mut st = self.state();
        if let Some(i) = st.conns.iter().position(|(c, _, _)| *c == id) {
            let (_, a, b) = st.conns.swap_remove(i);
            close(&[&a, &b]);
        }
    }

    fn latency(&self, dir: Dir) -> Duration {
        Duration::from_micros(self.latency_us[dir.index()].load(Ordering::SeqCst))
    }

    fn judge(&self, dir: Dir, frame: &[u8]) -> Verdict {
        *lock(&self.packets).entry((dir, packet::kind(frame))).or_insert(0) += 1;
        if self.blackhole.load(Ordering::SeqCst) {
            return Verdict::Drop;
        }
        match lock(&self.rule).as_mut() {
            Some(rule) => rule(dir, frame),
            None => Verdict::Forward,
        }
    }
}

impl Proxy {
    /// Listens on a free port and forwards to `upstream` on 127.0.0.1.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("a bound listener has an address").port();
        let inner = Arc::new(Inner {
            upstream,
            state: Mutex::new(State { down: false, conns: Vec::new() }),
            stop: AtomicBool::new(false),
            blackhole: AtomicBool::new(false),
            latency_us: [AtomicU64::new(0), AtomicU64::new(0)],
            rule: Mutex::new(None),
            served: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            packets: Mutex::new(HashMap::new()),
        });
        let accept = Arc::clone(&inner);
        thread::spawn(move || {
            for client in listener.incoming() {
                if accept.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                // Nagle would add its own latency on top of ours.
                let _ = client.set_nodelay(true);
                accept_one(&accept, client);
            }
        });
        Proxy { port, inner }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Link down: closes every current connection; new ones are closed at once.
    pub fn cut(&self) {
        self.inner.cut();
    }

    /// Link up again: ends a cut and a blackhole.
    pub fn heal(&self) {
        self.inner.heal();
    }

    pub fn is_down(&self) -> bool {
        self.inner.state().down
    }

    /// Bytes stop in both directions; the sockets stay open. Until [`Proxy::heal`].
    pub fn blackhole(&self) {
        self.inner.blackhole.store(true, Ordering::SeqCst);
    }

    /// Holds every packet going `dir` for `latency` before writing it on.
    pub fn set_latency(&self, dir: Dir, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).expect("a test latency fits in u64 microseconds");
        self.inner.latency_us[dir.index()].store(us, Ordering::SeqCst);
    }

    /// Every packet from now on goes through `rule` (`None`: forward all).
    pub fn set_rule(&self, rule: Option<Rule>) {
        *lock(&self.inner.rule) = rule;
    }

    /// Connections forwarded to the broker so far (every client connect
    /// while the link was up).
    pub fn connections(&self) -> usize {
        self.inner.served.load(Ordering::SeqCst)
    }

    /// Connections closed at once because the link was cut.
    pub fn refused(&self) -> usize {
        self.inner.refused.load(Ordering::SeqCst)
    }

    /// Packets of `kind` (see [`packet`]) seen going `dir`, whatever their fate.
    pub fn packets(&self, dir: Dir, kind: u8) -> usize {
        lock(&self.inner.packets).get(&(dir, kind)).copied().unwrap_or(0)
    }

    /// Cuts the link every `every` for `down_for` from a background thread,
    /// on a fixed schedule: cut at `k * every - down_for`, heal at `k * every`
    /// after the start, for k = 1, 2, ... Stop it with the [`Flapper`].
    pub fn flap(&self, every: Duration, down_for: Duration) -> Flapper {
        assert!(down_for < every, "a flap must leave the link up for a while");
        let inner = Arc::clone(&self.inner);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let start = Instant::now();
            let mut cycles = 0;
            for k in 1u32.. {
                let heal_at = start + every * k;
                sleep_until(heal_at - down_for);
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                inner.cut();
                sleep_until(heal_at);
                inner.heal();
                cycles += 1;
                if flag.load(Ordering::SeqCst) {
                    break;
                }
            }
            cycles
        });
        Flapper { stop, handle: Some(handle), inner: Arc::clone(&self.inner) }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wakes the accept loop so it sees `stop`; failure means it is gone.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A running [`Proxy::flap`]. Dropping it stops the flapping and heals.
pub struct Flapper {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u32>>,
    inner: Arc<Inner>,
}

impl Flapper {
    /// Stops flapping, leaves the link healed, and returns how many cuts
    /// there were.
    pub fn stop(mut self) -> u32 {
        self.finish()
    }

    fn finish(&mut self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        let cycles = self.handle.take().map_or(0, |h| h.join().unwrap_or(0));
        self.inner.heal();
        cycles
    }
}

impl Drop for Flapper {
    fn drop(&mut self) {
        self.finish();
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

fn accept_one(inner: &Arc<Inner>, client: TcpStream) {
    if inner.state().down {
        inner.refused.fetch_add(1, Ordering::SeqCst);
        close(&[&client]);
        return;
    }
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", inner.upstream)) else {
        // Broker down: the client sees its connection closed at once.
        inner.refused.fetch_add(1, Ordering::SeqCst);
        close(&[&client]);
        return;
    };
    let _ = upstream.set_nodelay(true);
    let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
    // Registration and the `down` check happen under one lock, so a `cut`
    // racing with this accept cannot miss the new connection.
    let mut st = inner.state();
    let clones = (client.try_clone(), upstream.try_clone(), client.try_clone(), upstream.try_clone());
    let (false, Ok(c1), Ok(u1), Ok(c2), Ok(u2)) = (st.down, clones.0, clones.1, clones.2, clones.3) else {
        inner.refused.fetch_add(1, Ordering::SeqCst);
        close(&[&client, &upstream]);
        return;
    };
    st.conns.push((id, c1, u1));
    drop(st);
    inner.served.fetch_add(1, Ordering::SeqCst);
    for (dir, from, to) in [(Dir::ToBroker, client, upstream), (Dir::ToClient, u2, c2)] {
        let (tx, rx) = mpsc::channel();
        let (r, w) = (Arc::clone(inner), Arc::clone(inner));
        thread::spawn(move || read_side(&r, dir, from, &tx));
        thread::spawn(move || write_side(&w, id, to, &rx));
    }
}

/// What a direction's reader hands its writer.
enum Item {
    /// Write these bytes at this time.
    Bytes(Instant, Vec<u8>),
    /// Close the connection at this time.
    Sever(Instant),
    /// The reading side closed.
    Eof,
}

/// The length of the first MQTT packet in `buf`: `Ok(None)` if incomplete,
/// `Err` if the bytes cannot be MQTT.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, ()> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(None) };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let len = 1 + (i + 1) + remaining;
            return Ok((buf.len() >= len).then_some(len));
        }
    }
    Err(())
}

fn read_side(inner: &Inner, dir: Dir, mut from: TcpStream, tx: &mpsc::Sender<Item>) {
    let mut buf = [0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let at = Instant::now() + inner.latency(dir);
        loop {
            let len = match frame_len(&pending) {
                Ok(Some(len)) => len,
                Ok(None) => break,
                Err(()) => pending.len(),
            };
            let frame: Vec<u8> = pending.drain(..len).collect();
            let item = match inner.judge(dir, &frame) {
                Verdict::Forward => Item::Bytes(at, frame),
                Verdict::Drop => continue,
                Verdict::Sever => Item::Sever(at),
                Verdict::ForwardThenSever => {
                    if tx.send(Item::Bytes(at, frame)).is_err() {
                        return;
                    }
                    Item::Sever(at)
                }
            };
            if tx.send(item).is_err() {
                return;
            }
        }
    }
    // The writer may be gone already (it severed); nothing else to tell.
    let _ = tx.send(Item::Eof);
}

fn write_side(inner: &Inner, id: u64, mut to: TcpStream, rx: &mpsc::Receiver<Item>) {
    for item in rx {
        match item {
            Item::Bytes(at, bytes) => {
                sleep_until(at);
                if inner.blackhole.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&bytes).is_err() {
                    break;
                }
            }
            Item::Sever(at) => {
                sleep_until(at);
                break;
            }
            Item::Eof => break,
        }
    }
    inner.sever(id);
    close(&[&to]);
}
