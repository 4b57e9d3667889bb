//! A raw MQTT 3.1.1 client for tests that must control every packet a
//! broker sees (which rumqttc, with its own resend rules, cannot): CONNECT,
//! QoS 2 PUBLISH with a chosen packet id and DUP flag, PUBREL, and reading
//! one packet at a time. It owns one TCP connection on 127.0.0.1; it must not
//! reconnect, retry or answer anything by itself.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::proxy::packet;

/// How long [`Wire::next`] waits for a packet.
const PATIENCE: Duration = Duration::from_secs(30);

/// What reading the next packet gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    Packet(Vec<u8>),
    /// The broker closed the connection.
    Closed,
    Timeout,
}

/// One connection speaking bytes.
pub struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn remaining_length(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = u8::try_from(n % 128).expect("below 128");
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

fn string(s: &str) -> Vec<u8> {
    let len = u16::try_from(s.len()).expect("a test string fits u16");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(remaining_length(body.len()));
    out.extend_from_slice(body);
    out
}

impl Wire {
    /// Connects, sends CONNECT (keep-alive 60 s) and returns the connection
    /// and the CONNACK's session-present flag.
    pub fn connect(port: u16, client_id: &str, clean_session: bool) -> (Wire, bool) {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the broker");
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        let mut wire = Wire { stream, buf: Vec::new() };
        let mut body = string("MQTT");
        body.push(4);
        body.push(if clean_session { 0x02 } else { 0x00 });
        body.extend_from_slice(&60u16.to_be_bytes());
        body.extend(string(client_id));
        wire.send(&frame(0x10, &body));
        let connack = wire.expect(packet::CONNACK);
        assert_eq!(connack.get(3), Some(&0), "CONNACK return code: {connack:?}");
        (wire, connack.get(2).is_some_and(|f| f & 1 == 1))
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the broker");
    }

    /// PUBLISH at QoS 2 with this packet id (and DUP if asked).
    pub fn publish_qos2(&mut self, pkid: u16, topic: &str, payload: &[u8], dup: bool) {
        let mut body = string(topic);
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(payload);
        self.send(&frame(if dup { 0x3c } else { 0x34 }, &body));
    }

    pub fn pubrel(&mut self, pkid: u16) {
        let id = pkid.to_be_bytes();
        self.send(&[0x62, 0x02, id[0], id[1]]);
    }

    /// The next packet, or why there is none.
    pub fn next(&mut self, within: Duration) -> Recv {
        let start = Instant::now();
        loop {
            if let Some(len) = frame_len(&self.buf) {
                return Recv::Packet(self.buf.drain(..len).collect());
            }
            let left = within.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Recv::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).expect("set a read timeout");
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Recv::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return Recv::Closed,
            }
        }
    }

    /// The next packet, which must be of `kind`; PINGRESPs are skipped.
    pub fn expect(&mut self, kind: u8) -> Vec<u8> {
        loop {
            match self.next(PATIENCE) {
                Recv::Packet(p) if packet::kind(&p) == packet::PINGRESP => {}
                Recv::Packet(p) => {
                    assert_eq!(packet::kind(&p), kind, "expected packet type {kind}, got {p:?}");
                    return p;
                }
                other => panic!("expected packet type {kind}, got {other:?}"),
            }
        }
    }

    /// Waits for the broker to close the connection (or to send something,
    /// which is returned).
    pub fn closed_or_next(&mut self) -> Recv {
        self.next(PATIENCE)
    }
}

fn frame_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let len = 2 + i + remaining;
            return (buf.len() >= len).then_some(len);
        }
    }
    None
}
