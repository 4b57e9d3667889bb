//! The embedded MQTT broker (`[broker] embedded = true`): rumqttd 0.20.0 run
//! in-process on its own threads, configured in code.
//!
//! This module owns starting rumqttd, choosing its limits, and waiting until
//! it answers an MQTT CONNECT. It does not own anything MQTT clients do: the
//! hub and the agents talk to it over TCP with rumqttc like to any broker.
//! It must not grow features (auth, TLS, bridging, persistence): when those
//! are needed, run mosquitto or EMQX and set `[broker] url` instead.
//!
//! # What it promises (each checked in `tests/broker.rs` against rumqttc)
//!
//! * MQTT 3.1.1 on one TCP listener, no TLS, no authentication: listen on
//!   loopback or a private network only.
//! * Persistent sessions (`clean_session = false`): subscriptions and QoS 1
//!   messages queue while the client is away (10,000 heartbeat-sized messages
//!   fit) and are delivered, in order, when it reconnects with the same
//!   client id, whether or not it subscribes again. QoS 1 messages sent but
//!   not acknowledged are sent again; acknowledged ones are not.
//! * QoS 1 and 2 end to end; a publisher that lost its PUBACK resends and the
//!   copy is delivered (a duplicate, as QoS 1 allows); payloads up to
//!   [`MAX_PAYLOAD_BYTES`]; retained messages; the last will (retained if
//!   asked) when a connection drops without DISCONNECT.
//! * Shared subscriptions `$share/<group>/<filter>`, round robin: each message
//!   to exactly one member, as long as each group name has one filter.
//!
//! # Limits and bugs, with the rumqttd source behind each
//!
//! Paths are relative to `rumqttd-0.20.0/` in the cargo registry.
//!
//! * Everything is in memory. A broker restart (a hub restart) loses every
//!   session, queued message and retained message; clients must re-subscribe
//!   and republish (the agent does both on every connect).
//! * Queued messages live in one in-memory commit log per subscription
//!   filter, bounded in bytes ([`SEGMENT_BYTES`] × [`SEGMENT_COUNT`],
//!   `src/segments/mod.rs:146-163`); a message counts as
//!   `4 + topic + payload` bytes (`src/router/logs.rs:115-118`). The log keeps
//!   the newest bytes whether or not they were delivered, so each filter
//!   settles at that size once traffic has filled it. When an offline session
//!   falls further behind than that, the oldest messages are skipped with
//!   only a `warn!` ("Read cursor start jumped", `src/router/routing.rs:1510-1524`).
//! * At most 100 unacknowledged QoS 1/2 messages per subscriber, whatever the
//!   config says (`MAX_INFLIGHT`, `src/router/iobufs.rs:18`): a collector
//!   that acknowledges after a commit must commit batches of at most 100 (or
//!   on a timer), or it waits forever for the 101st message.
//! * A subscriber must acknowledge in the order it received: an out-of-order
//!   PUBACK disconnects it (`src/router/iobufs.rs:167-177`,
//!   `src/router/routing.rs:763-776`).
//! * Shared groups are keyed by the group name alone
//!   (`src/router/routing.rs:943-949`) and share one read cursor: with two
//!   filters under one group name, the second filter's messages are never
//!   delivered. Use one filter per group name.
//! * When the last member of a shared group is a persistent session and its
//!   connection drops with unacknowledged messages, the router thread panics
//!   ("group must exists"): the group was just removed
//!   (`src/router/routing.rs:472-475`) and is then looked up with `expect`
//!   (`src/router/routing.rs:508-514`). The broker then accepts TCP but
//!   answers no CONNECT; [`EmbeddedBroker::check`] notices. So do not use
//!   shared subscriptions with the embedded broker.
//! * When one member of a shared group drops with unacknowledged messages,
//!   the group rewinds to them (`src/router/routing.rs:508-514`), but the
//!   other members are parked (`src/router/routing.rs:1071-1079`) and get
//!   them only when the next message arrives on that filter.
//! * Client ids must not contain `+`, `$`, `#` or `/`, and at most
//!   [`MAX_CONNECTIONS`] connections are served: beyond either, the
//!   connection is closed without a CONNACK (`src/router/routing.rs:274-277`,
//!   `src/router/routing.rs:296-301`). `keep_alive` must not be 0
//!   (`src/link/remote.rs:202-204`).
//!
//! # Lifetime
//!
//! rumqttd has no shutdown: its router thread loops until its own channel
//! closes, and it keeps a sender to that channel itself
//! (`src/router/routing.rs:141`, `src/router/routing.rs:164-189`); each
//! listener thread loops on `accept` forever
//! (`src/server/broker.rs:393-465`). So a started broker lives until the
//! process exits. Dropping [`EmbeddedBroker`] does nothing.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The largest application payload every client may publish.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// rumqttd checks a packet's remaining length, which also holds the topic (a
/// u16 length and up to 65,535 bytes) and the packet id
/// (`src/protocol/v4/mod.rs:110-123`).
const MAX_PACKET_BYTES: usize = MAX_PAYLOAD_BYTES + 2 + 65_535 + 2;

/// The size at which a filter's commit log starts a new segment.
pub const SEGMENT_BYTES: usize = 4 * 1024 * 1024;

/// Segments kept per filter: 64 MiB in all, room for 10,000 queued messages
/// of up to 6.5 KiB each (DESIGN's messages are under 1 KiB).
pub const SEGMENT_COUNT: usize = 16;

/// Concurrent MQTT connections (agents, hubs and tools together).
pub const MAX_CONNECTIONS: usize = 4096;

/// How long a new TCP connection may take to send its CONNECT.
const CONNECT_TIMEOUT_MS: u16 = 10_000;

/// How many packets one connection's read may batch before handing them to
/// the router (rumqttd calls it `max_inflight_count`, `src/link/network.rs:113-132`).
const MAX_READ_BATCH: usize = 100;

/// QoS 0 messages read from a commit log in one go (`src/router/routing.rs:1440-1451`).
const MAX_QOS0_READ: u64 = 200;

/// How long [`EmbeddedBroker::start`] waits for the first CONNACK.
const READY_WITHIN: Duration = Duration::from_secs(5);

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "broker listen address {addr} is in use (is another broker or fieldlink hub running? \
         set [broker] listen to a free address)"
    )]
    AddrInUse { addr: SocketAddr },
    #[error("broker cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot start the broker thread: {0}")]
    Thread(io::Error),
    #[error("broker on {addr} stopped while starting: {reason}")]
    Stopped { addr: SocketAddr, reason: String },
    #[error("broker on {addr} did not answer an MQTT CONNECT within {waited:?}: {last}")]
    NotReady { addr: SocketAddr, waited: Duration, last: String },
    #[error("broker on {addr} no longer answers an MQTT CONNECT ({source}); see the rumqttd log for a panic")]
    Unresponsive { addr: SocketAddr, source: io::Error },
}

/// A running rumqttd. It cannot be stopped; see the module doc.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `listen` and returns once it has answered an MQTT
    /// CONNECT. Port 0 picks a free port; [`addr`](Self::addr) tells which.
    ///
    /// This blocks for as long as the broker takes to come up (milliseconds;
    /// about 5 s at most): call it before entering the async runtime or through
    /// `spawn_blocking`.
    pub fn start(listen: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
        // rumqttd only logs a failed bind from its listener thread
        // (`src/server/broker.rs:213-216`), so bind here first to report it,
        // and to learn the port when asked for port 0. Should another process
        // take the port in between, rumqttd's listener ends and the loop
        // below reports `Stopped`.
        let addr = claim(listen)?;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the embedded broker has no authentication and no TLS; listen on loopback or a private network");
        }

        let mut broker = Broker::new(config(addr));
        let (done_tx, done_rx) = mpsc::channel::<String>();
        thread::Builder::new()
            .name("fieldlink-broker".to_string())
            .spawn(move || {
                // `start` returns only when every listener thread has ended.
                let reason = match broker.start() {
                    Ok(()) => "its listener ended (see the rumqttd log line above)".to_string(),
                    Err(e) => e.to_string(),
                };
                // The receiver is gone once `EmbeddedBroker::start` returned:
                // nobody is waiting to hear this any more.
                let _ = done_tx.send(reason);
            })
            .map_err(BrokerError::Thread)?;

        // Poll every 10 ms until the first CONNACK or the deadline.
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            match done_rx.try_recv() {
                Ok(reason) => return Err(BrokerError::Stopped { addr, reason }),
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(BrokerError::Stopped { addr, reason: "its thread panicked".to_string() });
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            let last = match probe(addr) {
                Ok(()) => break,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(BrokerError::NotReady { addr, waited: READY_WITHIN, last: last.to_string() });
            }
            thread::sleep(Duration::from_millis(10));
        }
        tracing::info!(%addr, "embedded MQTT broker listening");
        Ok(EmbeddedBroker { addr })
    }

    /// The address the broker listens on, with the real port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Checks that the broker still answers an MQTT CONNECT with a CONNACK
    /// (its router thread can die, see the module doc). Blocks for at most
    /// about a second.
    pub fn check(&self) -> Result<(), BrokerError> {
        probe(self.addr).map_err(|source| BrokerError::Unresponsive { addr: self.addr, source })
    }
}

/// Binds `listen` once to check it is free and to resolve port 0, then
/// releases it for rumqttd.
fn claim(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let listener = TcpListener::bind(listen).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => BrokerError::AddrInUse { addr: listen },
        _ => BrokerError::Listen { addr: listen, source },
    })?;
    listener.local_addr().map_err(|source| BrokerError::Listen { addr: listen, source })
}

/// The whole rumqttd configuration; see the module doc for why each limit.
fn config(addr: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: CONNECT_TIMEOUT_MS,
        max_payload_size: MAX_PACKET_BYTES,
        max_inflight_count: MAX_READ_BATCH,
        auth: None,
        external_auth: None,
        // Unused by rumqttd 0.20.0: `DataLog::matches` always returns
        // `Some` (`src/router/logs.rs:202-220`).
        dynamic_filters: false,
    };
    let server = ServerSettings {
        name: "fieldlink-mqtt".to_string(),
        listen: addr,
        tls: None,
        // rumqttd sleeps this long after each accept (`src/server/broker.rs:464`).
        next_connection_delay_ms: 1,
        connections,
    };
    let router = RouterConfig {
        max_connections: MAX_CONNECTIONS,
        max_outgoing_packet_count: MAX_QOS0_READ,
        max_segment_size: SEGMENT_BYTES,
        max_segment_count: SEGMENT_COUNT,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: rumqttd::Strategy::RoundRobin,
    };
    Config { id: 0, router, v4: Some(HashMap::from([("1".to_string(), server)])), ..Config::default() }
}

/// One MQTT 3.1.1 CONNECT (clean session) answered by an accepting CONNACK.
/// The socket is then closed without DISCONNECT, which rumqttd logs at info
/// level, where a bare TCP probe would log an error.
fn probe(addr: SocketAddr) -> io::Result<()> {
    const CLIENT_ID: &[u8] = b"fieldlink-broker-probe";
    let target = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    };
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    // Variable header: protocol name "MQTT", level 4, flags (clean session),
    // keep alive 10 s; payload: the client id.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10];
    let id_len = u16::try_from(CLIENT_ID.len()).expect("the probe's client id is short");
    body.extend_from_slice(&id_len.to_be_bytes());
    body.extend_from_slice(CLIENT_ID);
    let body_len = u8::try_from(body.len()).expect("the probe's CONNECT fits a one-byte length");
    let mut packet = vec![0x10, body_len];
    packet.extend_from_slice(&body);
    stream.write_all(&packet)?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(io::Error::other(format!("unexpected answer to CONNECT: {connack:02x?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_already_listened_on_is_reported_as_in_use() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = EmbeddedBroker::start(addr).expect_err("must not start");
        assert!(matches!(err, BrokerError::AddrInUse { .. }), "{err:?}");
        assert!(err.to_string().starts_with(&format!("broker listen address {addr} is in use")), "{err}");
    }

    #[test]
    fn port_zero_starts_on_a_real_port_that_answers_mqtt() {
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse().expect("addr")).expect("start");
        assert_ne!(broker.addr().port(), 0);
        broker.check().expect("a second CONNECT is answered too");
    }
}
