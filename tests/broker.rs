//! The embedded broker (rmqtt, `src/broker/`) against what the agent and the
//! hub rely on, and against the attacks of issue #7, checked with rumqttc
//! clients and raw sockets on free 127.0.0.1 ports: authentication and the
//! ACL, odd client ids, the session cap, over-size packets, half-open
//! sockets, TLS, credential reloads, persistent sessions, QoS 1 and 2,
//! retained messages, last wills and redelivery of unacknowledged messages.
//!
//! Every wait has a generous deadline and fails with what was seen; nothing
//! asserts how fast the broker is.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fieldlink::broker::{EmbeddedBroker, Limits, MAX_PAYLOAD_BYTES, Settings, TlsListener};
use fieldlink::hub::devices::Provisioning;
use rumqttc::{AsyncClient, ConnAck, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout_at};

/// How long any one wait may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

/// The hub's own user in these tests, and its password.
const HUB: &str = "hub";
const HUB_PW: &str = "hub-password-for-tests";
/// The devices provisioned in every test broker.
const DEVICES: [&str; 3] = ["dev-a", "dev-b", "pi-9"];

/// A running broker, the state directory holding its password file, and
/// each device's password.
struct TestBroker {
    broker: EmbeddedBroker,
    dir: tempfile::TempDir,
    passwords: std::collections::HashMap<String, String>,
}

impl TestBroker {
    fn addr(&self) -> SocketAddr {
        self.broker.addr()
    }

    fn password(&self, device: &str) -> &str {
        &self.passwords[device]
    }

    fn provisioning(&self) -> Provisioning {
        Provisioning {
            state_dir: self.dir.path().to_path_buf(),
            topic_prefix: "fieldlink".into(),
            hub_user: Some(HUB.into()),
            hub_password: None,
            pid_file: None,
            url: None,
            embedded: true,
        }
    }
}

async fn broker() -> TestBroker {
    broker_with(Limits::default(), false).await
}

/// A broker with `limits`; with `tls`, also an mqtts listener with the
/// test certificates.
async fn broker_with(limits: Limits, tls: bool) -> TestBroker {
    if std::env::var_os("FIELDLINK_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter("debug").with_test_writer().try_init();
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = TestBroker { broker: start(dir.path(), limits.clone(), tls).await, dir, passwords: Default::default() };
    let p = b.provisioning();
    for d in DEVICES {
        let (password, _) = p.create(d).expect("provision");
        b.passwords.insert(d.to_string(), password);
    }
    let revoked = b.broker.reload().await.expect("reload");
    assert!(revoked.is_empty(), "{revoked:?}");
    b
}

async fn start(dir: &std::path::Path, limits: Limits, tls: bool) -> EmbeddedBroker {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let settings = Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: tls.then(|| TlsListener {
            listen: "127.0.0.1:0".parse().expect("addr"),
            cert_file: fixtures.join("server.pem"),
            key_file: fixtures.join("server.key"),
        }),
        topic_prefix: "fieldlink".into(),
        passwd_file: dir.join("mosquitto.passwd"),
        hub_user: HUB.into(),
        hub_password: HUB_PW.into(),
        limits,
    };
    EmbeddedBroker::start(settings).await.expect("the embedded broker starts")
}

/// A client of the hub's user (which may use any client id but a device's).
fn options(id: &str, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(1024 * 1024, 1024 * 1024);
    o.set_credentials(HUB, HUB_PW);
    o
}

/// A device's client: client id = user name = device id.
fn device(b: &TestBroker, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, b.addr().ip().to_string(), b.addr().port());
    o.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(1024 * 1024, 1024 * 1024);
    o.set_credentials(id, b.password(id));
    o
}

fn persistent(id: &str, addr: SocketAddr) -> MqttOptions {
    let mut o = options(id, addr);
    o.set_clean_session(false);
    o
}

/// One rumqttc client whose event loop runs in a task and forwards every
/// incoming packet.
struct Peer {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Packet>,
    driver: JoinHandle<()>,
}

impl Peer {
    /// Connects and returns once the CONNACK arrived. With `reconnect`, the
    /// event loop is polled again after an error (back-off 50 ms), which is
    /// how rumqttc reconnects; without, the task ends at the first error.
    async fn connect(opts: MqttOptions, reconnect: bool) -> (Peer, ConnAck) {
        let (client, eventloop) = AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(eventloop, tx, reconnect));
        let mut peer = Peer { client, rx, driver };
        let connack = match peer.next_matching("CONNACK", |p| matches!(p, Packet::ConnAck(_))).await {
            Packet::ConnAck(c) => c,
            _ => unreachable!("filtered above"),
        };
        (peer, connack)
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe request");
        self.next_matching("SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    }

    /// Publishes each payload at `qos` and waits for as many PUBACKs.
    async fn publish_all(&mut self, topic: &str, qos: QoS, payloads: impl IntoIterator<Item = Vec<u8>>) {
        let mut sent = 0;
        for payload in payloads {
            self.client.publish(topic, qos, false, payload).await.expect("publish request");
            sent += 1;
        }
        let mut acked = 0;
        while acked < sent {
            match self.next_matching("PUBACK/PUBCOMP", |p| matches!(p, Packet::PubAck(_) | Packet::PubComp(_))).await {
                Packet::PubAck(_) | Packet::PubComp(_) => acked += 1,
                _ => unreachable!("filtered above"),
            }
        }
    }

    /// The next packet for which `wanted` is true; other packets are
    /// dropped. Fails the test after [`PATIENCE`].
    async fn next_matching(&mut self, what: &str, wanted: impl Fn(&Packet) -> bool) -> Packet {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(p)) if wanted(&p) => return p,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the connection ended while waiting for {what}"),
                Err(_) => panic!("no {what} within {PATIENCE:?}"),
            }
        }
    }

    /// Collects PUBLISH packets until `done` says enough. Fails the test
    /// after [`PATIENCE`] with what arrived.
    async fn publishes_until(&mut self, done: impl Fn(&[Publish]) -> bool) -> Vec<Publish> {
        let deadline = Instant::now() + PATIENCE;
        let mut got = Vec::new();
        while !done(&got) {
            match timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Packet::Publish(p))) => got.push(p),
                Ok(Some(_)) => {}
                Ok(None) => panic!("the connection ended after {} publishes: {}", got.len(), summary(&got)),
                Err(_) => panic!("only {} publishes within {PATIENCE:?}: {}", got.len(), summary(&got)),
            }
        }
        got
    }

    /// Drops the TCP connection without DISCONNECT, as a crash or a dead
    /// link would.
    async fn drop_link(self) {
        self.driver.abort();
        // Cancelled is the expected outcome; anything else would be a panic
        // in the driver, which the test should see.
        if let Err(e) = self.driver.await
            && !e.is_cancelled()
        {
            panic!("driver: {e}");
        }
    }

    /// Sends DISCONNECT and waits until the event loop ended.
    async fn disconnect(self) {
        self.client.disconnect().await.expect("disconnect request");
        let deadline = Instant::now() + PATIENCE;
        timeout_at(deadline, self.driver).await.expect("the event loop ends after DISCONNECT").expect("driver");
    }
}

async fn drive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Packet>, reconnect: bool) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(p)) => {
                if tx.send(p).is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(Event::Outgoing(_)) => {}
            Err(_) if reconnect => sleep(Duration::from_millis(50)).await,
            Err(_) => return,
        }
    }
}

fn numbered(n: usize) -> impl Iterator<Item = Vec<u8>> {
    (0..n).map(|i| format!("m{i:05}").into_bytes())
}

fn payloads(got: &[Publish]) -> Vec<String> {
    got.iter().map(|p| String::from_utf8_lossy(&p.payload).into_owned()).collect()
}

fn distinct(got: &[Publish]) -> BTreeSet<String> {
    payloads(got).into_iter().collect()
}

fn summary(got: &[Publish]) -> String {
    let all = payloads(got);
    if all.len() <= 12 {
        return format!("{all:?}");
    }
    format!("{:?} ... {:?}", &all[..6], &all[all.len() - 6..])
}

fn expected(n: usize) -> BTreeSet<String> {
    numbered(n).map(|p| String::from_utf8(p).expect("ascii")).collect()
}

// (1) persistent session

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_qos1_subscriber_receives_everything_published_while_it_was_away() {
    let b = broker().await;
    let (mut sub, _) = Peer::connect(persistent("hub-1", b.addr()), false).await;
    sub.subscribe("t/persist", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let (mut publisher, _) = Peer::connect(options("pub-1", b.addr()), false).await;
    publisher.publish_all("t/persist", QoS::AtLeastOnce, numbered(100)).await;

    // No SUBSCRIBE this time: the session remembers it.
    let (mut sub, connack) = Peer::connect(persistent("hub-1", b.addr()), false).await;
    assert!(connack.session_present, "the broker forgot the session: {connack:?}");
    let got = sub.publishes_until(|g| distinct(g).len() == 100).await;
    assert_eq!(distinct(&got), expected(100));
    assert!(got.iter().all(|p| p.qos == QoS::AtLeastOnce), "delivered below QoS 1");
    assert_eq!(payloads(&got), expected(100).into_iter().collect::<Vec<_>>(), "duplicated or out of order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_subscriber_that_subscribes_again_on_reconnect_still_gets_the_queued_messages() {
    let b = broker().await;
    let (mut sub, _) = Peer::connect(persistent("agent-1", b.addr()), false).await;
    sub.subscribe("t/again", QoS::AtLeastOnce).await;
    sub.drop_link().await;

    let (mut publisher, _) = Peer::connect(options("pub-2", b.addr()), false).await;
    publisher.publish_all("t/again", QoS::AtLeastOnce, numbered(50)).await;

    // The agent re-subscribes on every connect, whatever session_present says.
    let (mut sub, connack) = Peer::connect(persistent("agent-1", b.addr()), false).await;
    assert!(connack.session_present);
    sub.client.subscribe("t/again", QoS::AtLeastOnce).await.expect("subscribe");
    let got = sub.publishes_until(|g| distinct(g).len() == 50).await;
    assert_eq!(distinct(&got), expected(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_qos1_messages_queue_for_an_offline_persistent_session() {
    let b = broker().await;
    let (mut sub, _) = Peer::connect(persistent("hub-10k", b.addr()), false).await;
    sub.subscribe("fieldlink/+/heartbeat", QoS::AtLeastOnce).await;
    sub.drop_link().await;

    // Heartbeat-sized payloads (~500 bytes), as DESIGN's agents send.
    let pad = "x".repeat(490);
    let (mut publisher, _) = Peer::connect(options("pub-10k", b.addr()), false).await;
    publisher
        .publish_all(
            "fieldlink/pi-1/heartbeat",
            QoS::AtLeastOnce,
            (0..10_000).map(|i| format!("m{i:05}{pad}").into_bytes()),
        )
        .await;

    let (mut sub, connack) = Peer::connect(persistent("hub-10k", b.addr()), false).await;
    assert!(connack.session_present);
    let got = sub.publishes_until(|g| g.len() >= 10_000).await;
    let firsts: BTreeSet<String> = got.iter().map(|p| String::from_utf8_lossy(&p.payload[..6]).into_owned()).collect();
    assert_eq!(firsts, expected(10_000), "messages lost or duplicated");
}

// (2) QoS 1 publishing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_from_a_publisher_reach_a_qos1_subscriber() {
    let b = broker().await;
    let (mut sub, _) = Peer::connect(options("sub-q1", b.addr()), false).await;
    sub.subscribe("t/q1", QoS::AtLeastOnce).await;
    let (mut publisher, _) = Peer::connect(options("pub-q1", b.addr()), false).await;
    publisher.publish_all("t/q1", QoS::AtLeastOnce, numbered(200)).await;

    let got = sub.publishes_until(|g| distinct(g).len() == 200).await;
    assert_eq!(distinct(&got), expected(200));
    assert!(got.iter().all(|p| p.qos == QoS::AtLeastOnce));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_publish_whose_puback_is_lost_is_sent_again_and_delivered() {
    let b = broker().await;
    let proxy = Proxy::start(b.addr()).await;
    let (mut sub, _) = Peer::connect(options("sub-lost", b.addr()), false).await;
    sub.subscribe("t/lost", QoS::AtLeastOnce).await;

    let (mut publisher, _) = Peer::connect(persistent("pub-lost", proxy.addr), true).await;
    proxy.pass_to_client.store(false, Ordering::SeqCst);
    publisher.client.publish("t/lost", QoS::AtLeastOnce, false, "once").await.expect("publish");
    // The broker has it (the subscriber sees it), but the PUBACK is lost.
    sub.publishes_until(|g| !g.is_empty()).await;

    proxy.sever();
    proxy.pass_to_client.store(true, Ordering::SeqCst);
    // rumqttc reconnects, the session is present, and it resends the publish.
    let connack = publisher.next_matching("CONNACK after the link drop", |p| matches!(p, Packet::ConnAck(_))).await;
    assert!(matches!(connack, Packet::ConnAck(ConnAck { session_present: true, .. })), "{connack:?}");
    publisher.next_matching("the PUBACK of the resent publish", |p| matches!(p, Packet::PubAck(_))).await;
    let again = sub.publishes_until(|g| !g.is_empty()).await;
    assert_eq!(payloads(&again), ["once"], "the resent copy reaches the subscriber (a duplicate, as QoS 1 allows)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_messages_reach_a_qos2_subscriber_once_each() {
    let b = broker().await;
    let (mut sub, _) = Peer::connect(options("sub-q2", b.addr()), false).await;
    sub.subscribe("t/q2", QoS::ExactlyOnce).await;
    let (mut publisher, _) = Peer::connect(options("pub-q2", b.addr()), false).await;
    publisher.publish_all("t/q2", QoS::ExactlyOnce, numbered(50)).await;

    let got = sub.publishes_until(|g| distinct(g).len() == 50).await;
    assert_eq!(got.len(), 50, "duplicates: {}", summary(&got));
    assert!(got.iter().all(|p| p.qos == QoS::ExactlyOnce));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_kib_payload_passes_through_the_broker() {
    let b = broker().await;
    let (mut sub, _) = Peer::connect(options("sub-big", b.addr()), false).await;
    sub.subscribe("t/big", QoS::AtLeastOnce).await;
    let (mut publisher, _) = Peer::connect(options("pub-big", b.addr()), false).await;
    let big = vec![b'z'; MAX_PAYLOAD_BYTES];
    publisher.publish_all("t/big", QoS::AtLeastOnce, [big.clone()]).await;

    let got = sub.publishes_until(|g| !g.is_empty()).await;
    assert_eq!(got[0].payload.len(), MAX_PAYLOAD_BYTES);
    assert!(got[0].payload == big);
}

// (3) retained

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_is_delivered_to_a_later_subscriber() {
    let b = broker().await;
    let (mut publisher, _) = Peer::connect(options("pub-ret", b.addr()), false).await;
    publisher.client.publish("fieldlink/pi-1/status", QoS::AtLeastOnce, true, "online").await.expect("publish");
    // Retained once acknowledged. (Without this wait the PUBLISH could reach
    // the broker after the SUBSCRIBE below: delivered live, as MQTT-3.3.1-9
    // wants, with the retain flag clear.)
    publisher.next_matching("PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    publisher.disconnect().await;

    let (mut sub, _) = Peer::connect(options("sub-ret", b.addr()), false).await;
    sub.client.subscribe("fieldlink/+/status", QoS::AtLeastOnce).await.expect("subscribe");
    let got = sub.publishes_until(|g| !g.is_empty()).await;
    assert_eq!(payloads(&got), ["online"]);
    assert!(got[0].retain, "a retained message sent on subscribe carries the retain flag (MQTT-3.3.1-8): {got:?}");
}

// (4) last will

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_will_is_published_when_a_client_connection_drops() {
    let b = broker().await;
    let (mut watcher, _) = Peer::connect(options("hub-will", b.addr()), false).await;
    watcher.subscribe("fieldlink/+/status", QoS::AtLeastOnce).await;

    let mut o = device(&b, "pi-9");
    o.set_last_will(LastWill::new("fieldlink/pi-9/status", "offline", QoS::AtLeastOnce, true));
    let (agent, _) = Peer::connect(o, false).await;
    agent.drop_link().await;

    let got = watcher.publishes_until(|g| !g.is_empty()).await;
    assert_eq!(payloads(&got), ["offline"]);
    assert_eq!(got[0].topic, "fieldlink/pi-9/status");

    // The will was retained, as the agent asks.
    let (mut later, _) = Peer::connect(options("late-will", b.addr()), false).await;
    later.client.subscribe("fieldlink/pi-9/status", QoS::AtLeastOnce).await.expect("subscribe");
    let got = later.publishes_until(|g| !g.is_empty()).await;
    assert_eq!(payloads(&got), ["offline"]);
}

// (6) manual acks and redelivery

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_qos1_messages_are_redelivered_after_the_subscriber_reconnects() {
    let b = broker().await;
    let mut o = persistent("collector", b.addr());
    o.set_manual_acks(true);
    let (mut sub, _) = Peer::connect(o.clone(), false).await;
    sub.subscribe("t/acks", QoS::AtLeastOnce).await;

    let (mut publisher, _) = Peer::connect(options("pub-acks", b.addr()), false).await;
    publisher.publish_all("t/acks", QoS::AtLeastOnce, numbered(10)).await;

    // "Commit" the first five, in order, then crash before the rest.
    let got = sub.publishes_until(|g| g.len() >= 10).await;
    assert_eq!(distinct(&got), expected(10));
    for p in &got[..5] {
        sub.client.ack(p).await.expect("ack");
    }
    // The SUBACK comes back only after the broker read the PUBACKs sent
    // before it on the same connection.
    sub.subscribe("t/fence", QoS::AtMostOnce).await;
    sub.drop_link().await;

    let (mut sub, connack) = Peer::connect(o, false).await;
    assert!(connack.session_present);
    let again = sub
        .publishes_until(|g| {
            ["m00005", "m00006", "m00007", "m00008", "m00009"].iter().all(|m| distinct(g).contains(*m))
        })
        .await;
    let acked_again: Vec<String> = distinct(&again).into_iter().filter(|m| m.as_str() < "m00005").collect();
    assert!(acked_again.is_empty(), "acknowledged messages came back: {acked_again:?}");
}

// A TCP proxy that can lose everything the broker says and cut every
// connection, to lose a PUBACK on purpose.

struct Proxy {
    addr: SocketAddr,
    pass_to_client: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let pass_to_client = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let (pass, cuts) = (pass_to_client.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, None, cuts.subscribe()));
                tokio::spawn(pump(sr, cw, Some(pass.clone()), cuts.subscribe()));
            }
        });
        Proxy { addr, pass_to_client, cut }
    }

    /// Closes every connection made so far.
    fn sever(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// Copies bytes until either side closes or the proxy cuts; drops them
/// instead while `pass` is false.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    pass: Option<Arc<AtomicBool>>,
    mut cut: watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            _ = cut.changed() => return,
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if pass.as_ref().is_none_or(|p| p.load(Ordering::SeqCst)) && to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}

// (7) attacks of issue #7 and the policy that stops them

/// An MQTT 3.1.1 CONNECT (clean session, keep-alive 10 s).
fn connect_packet(client_id: &[u8], user: Option<&str>, password: Option<&str>, will: Option<&str>) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&u16::try_from(bytes.len()).expect("a short field").to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut flags = 0x02;
    if will.is_some() {
        flags |= 0x04 | 0x08; // will, QoS 1
    }
    if user.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 10];
    field(&mut body, client_id);
    if let Some(topic) = will {
        field(&mut body, topic.as_bytes());
        field(&mut body, b"offline");
    }
    if let Some(u) = user {
        field(&mut body, u.as_bytes());
    }
    if let Some(p) = password {
        field(&mut body, p.as_bytes());
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = u8::try_from(len % 128).expect("< 128");
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

/// Sends one CONNECT on a fresh socket; the CONNACK's return code, or
/// `None` when the broker closed the connection without one.
async fn raw_connect(addr: SocketAddr, packet: &[u8]) -> Option<u8> {
    let mut s = TcpStream::connect(addr).await.expect("tcp connect");
    s.write_all(packet).await.expect("send CONNECT");
    let mut connack = [0u8; 4];
    match tokio::time::timeout(PATIENCE, s.read_exact(&mut connack)).await.expect("an answer or a close in time") {
        Ok(_) => {
            assert_eq!(connack[0], 0x20, "not a CONNACK: {connack:02x?}");
            Some(connack[3])
        }
        Err(_) => None,
    }
}

const ACCEPTED: Option<u8> = Some(0);
const BAD_CREDENTIALS: Option<u8> = Some(4);
const NOT_AUTHORIZED: Option<u8> = Some(5);

/// A device subscribes to its commands, the hub's user sends one, and it
/// arrives: the broker serves.
async fn a_command_reaches(b: &TestBroker, dev: &str, tag: &str) {
    let (mut d, _) = Peer::connect(device(b, dev), false).await;
    d.subscribe(&format!("fieldlink/{dev}/relay/+/set"), QoS::AtLeastOnce).await;
    let (mut hub, _) = Peer::connect(options(&format!("hub-cmd-{tag}"), b.addr()), false).await;
    hub.publish_all(&format!("fieldlink/{dev}/relay/pump/set"), QoS::AtLeastOnce, [tag.as_bytes().to_vec()]).await;
    let got = d.publishes_until(|g| !g.is_empty()).await;
    assert_eq!(payloads(&got), [tag]);
    d.disconnect().await;
    hub.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_client_ids_connecting_twice_do_not_stop_a_device_from_connecting_and_receiving() {
    let b = broker().await;
    let long = vec![b'x'; 65_535];
    let ids: [&[u8]; 7] = [b"/", b"a/b", b"+", b"#", b"$SYS", b"", &long];
    for id in ids {
        for _ in 0..2 {
            let shown = String::from_utf8_lossy(&id[..id.len().min(8)]).into_owned();
            let anonymous = raw_connect(b.addr(), &connect_packet(id, None, None, None)).await;
            assert_ne!(anonymous, ACCEPTED, "anonymous with client id {shown:?}");
            let as_device =
                raw_connect(b.addr(), &connect_packet(id, Some("dev-a"), Some(b.password("dev-a")), None)).await;
            assert_ne!(as_device, ACCEPTED, "dev-a with client id {shown:?}");
        }
    }
    a_command_reaches(&b, "dev-a", "after-odd-ids").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_wrong_passwords_and_borrowed_client_ids_are_refused() {
    let b = broker().await;
    let pw_a = b.password("dev-a").to_string();
    assert_eq!(raw_connect(b.addr(), &connect_packet(b"dev-a", None, None, None)).await, NOT_AUTHORIZED, "anonymous");
    assert_eq!(
        raw_connect(b.addr(), &connect_packet(b"dev-a", Some("dev-a"), Some("nope"), None)).await,
        BAD_CREDENTIALS
    );
    assert_eq!(raw_connect(b.addr(), &connect_packet(b"dev-a", Some("dev-a"), None, None)).await, BAD_CREDENTIALS);
    assert_eq!(
        raw_connect(b.addr(), &connect_packet(b"ghost", Some("ghost"), Some(&pw_a), None)).await,
        BAD_CREDENTIALS
    );
    assert_eq!(
        raw_connect(b.addr(), &connect_packet(b"dev-b", Some("dev-a"), Some(&pw_a), None)).await,
        NOT_AUTHORIZED,
        "dev-a's credentials with dev-b's client id"
    );
    assert_eq!(
        raw_connect(b.addr(), &connect_packet(b"dev-a", Some(HUB), Some(HUB_PW), None)).await,
        NOT_AUTHORIZED,
        "the hub's user with a device's client id"
    );
    assert_eq!(raw_connect(b.addr(), &connect_packet(b"dev-a", Some("dev-a"), Some(&pw_a), None)).await, ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_on_another_devices_topic_is_refused_at_connect() {
    let b = broker().await;
    let pw_a = b.password("dev-a").to_string();
    let foreign = connect_packet(b"dev-a", Some("dev-a"), Some(&pw_a), Some("fieldlink/dev-b/status"));
    assert_eq!(raw_connect(b.addr(), &foreign).await, NOT_AUTHORIZED);
    let own = connect_packet(b"dev-a", Some("dev-a"), Some(&pw_a), Some("fieldlink/dev-a/status"));
    assert_eq!(raw_connect(b.addr(), &own).await, ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_can_subscribe_only_to_its_commands_sync_and_acks() {
    let b = broker().await;
    let (mut a, _) = Peer::connect(device(&b, "dev-a"), false).await;
    for (filter, allowed) in [
        ("#", false),
        ("fieldlink/#", false),
        ("$share/g/fieldlink/dev-a/sync", false),
        ("$SYS/#", false),
        ("fieldlink/dev-b/relay/+/set", false),
        ("fieldlink/+/relay/+/set", false),
        ("fieldlink/dev-a/relay/+/set", true),
        ("fieldlink/dev-a/sync", true),
        ("fieldlink/dev-a/ack", true),
    ] {
        a.client.subscribe(filter, QoS::AtLeastOnce).await.expect("subscribe request");
        let Packet::SubAck(ack) = a.next_matching("SUBACK", |p| matches!(p, Packet::SubAck(_))).await else {
            unreachable!("filtered above")
        };
        let granted = matches!(ack.return_codes[..], [rumqttc::SubscribeReasonCode::Success(_)]);
        assert_eq!(granted, allowed, "{filter}: {:?}", ack.return_codes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_publishing_on_another_devices_topic_is_disconnected_and_nothing_arrives() {
    let b = broker().await;
    let (mut hub, _) = Peer::connect(options("hub-watch", b.addr()), false).await;
    hub.subscribe("fieldlink/#", QoS::AtLeastOnce).await;

    let (a, _) = Peer::connect(device(&b, "dev-a"), false).await;
    a.client.publish("fieldlink/dev-b/heartbeat", QoS::AtLeastOnce, false, "forged").await.expect("publish");
    // The connection ends: the driver task returns at the first error.
    tokio::time::timeout(PATIENCE, a.driver).await.expect("dev-a is disconnected").expect("driver");

    let (mut own, _) = Peer::connect(device(&b, "dev-b"), false).await;
    own.publish_all("fieldlink/dev-b/heartbeat", QoS::AtLeastOnce, [b"real".to_vec()]).await;
    let got = hub.publishes_until(|g| payloads(g).contains(&"real".to_string())).await;
    assert_eq!(payloads(&got), ["real"], "a forged message got through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_cap_are_refused_cleanly_and_the_broker_keeps_serving() {
    let b = broker_with(Limits { max_sessions: 2, ..Limits::default() }, false).await;
    let (hub, _) = Peer::connect(options("hub-cap", b.addr()), false).await;
    let (a, _) = Peer::connect(device(&b, "dev-a"), false).await;
    let pw_b = b.password("dev-b").to_string();
    let third = connect_packet(b"dev-b", Some("dev-b"), Some(&pw_b), None);
    assert_eq!(raw_connect(b.addr(), &third).await, Some(3), "server unavailable past the cap");
    a.disconnect().await;
    // A clean session ends with its connection, which frees its place.
    let deadline = Instant::now() + PATIENCE;
    while raw_connect(b.addr(), &third).await != ACCEPTED {
        assert!(Instant::now() < deadline, "dev-b never got the freed place");
        sleep(Duration::from_millis(50)).await;
    }
    hub.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_publish_closes_that_connection_and_the_broker_keeps_serving() {
    let b = broker().await;
    let mut o = device(&b, "dev-a");
    o.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
    let (a, _) = Peer::connect(o, false).await;
    let big = vec![b'z'; fieldlink::broker::MAX_PACKET_BYTES + 1];
    a.client.publish("fieldlink/dev-a/heartbeat", QoS::AtLeastOnce, false, big).await.expect("publish request");
    tokio::time::timeout(PATIENCE, a.driver).await.expect("the oversize publisher is disconnected").expect("driver");
    a_command_reaches(&b, "dev-b", "after-oversize").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_silent_sockets_are_closed_by_the_handshake_timeout_while_a_device_connects() {
    const SOCKETS: usize = 5_000;
    // Both ends of every socket live in this process.
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit");
    let wanted = (2 * SOCKETS as u64 + 1_000).max(soft);
    if hard < wanted {
        eprintln!("skipped: RLIMIT_NOFILE hard limit {hard} < {wanted}");
        return;
    }
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, wanted, hard).expect("setrlimit");

    let limits = Limits { handshake_timeout: Duration::from_secs(2), ..Limits::default() };
    let b = broker_with(limits, false).await;
    let mut silent = Vec::with_capacity(SOCKETS);
    for i in 0..SOCKETS {
        let mut s = TcpStream::connect(b.addr()).await.expect("tcp connect");
        if i % 2 == 1 {
            // Half a CONNECT: the fixed header's first byte only.
            s.write_all(&[0x10]).await.expect("send a byte");
        }
        silent.push(s);
    }
    a_command_reaches(&b, "dev-a", "meanwhile").await;

    // Every one of them is closed by the broker (EOF or reset), none answered.
    let closed = futures_util::future::join_all(silent.into_iter().map(|mut s| async move {
        let mut buf = [0u8; 8];
        matches!(tokio::time::timeout(PATIENCE, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }))
    .await;
    let open = closed.iter().filter(|c| !**c).count();
    assert_eq!(open, 0, "{open} of {SOCKETS} silent sockets were still open after {PATIENCE:?}");
    a_command_reaches(&b, "dev-b", "afterwards").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_device_disconnects_it_and_it_cannot_connect_again() {
    let b = broker().await;
    let (a, _) = Peer::connect(device(&b, "dev-a"), false).await;
    b.provisioning().remove("dev-a").expect("remove");
    assert_eq!(b.broker.reload().await.expect("reload"), ["dev-a"]);
    tokio::time::timeout(PATIENCE, a.driver).await.expect("dev-a is disconnected").expect("driver");
    let pw = b.password("dev-a").to_string();
    assert_eq!(raw_connect(b.addr(), &connect_packet(b"dev-a", Some("dev-a"), Some(&pw), None)).await, BAD_CREDENTIALS);
    a_command_reaches(&b, "dev-b", "others-unaffected").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_while_a_device_is_offline_is_delivered_when_it_reconnects() {
    let b = broker().await;
    let mut o = device(&b, "dev-a");
    o.set_clean_session(false);
    let (mut a, _) = Peer::connect(o.clone(), false).await;
    a.subscribe("fieldlink/dev-a/relay/+/set", QoS::AtLeastOnce).await;
    a.drop_link().await;

    let (mut hub, _) = Peer::connect(options("hub-offline", b.addr()), false).await;
    hub.publish_all("fieldlink/dev-a/relay/pump/set", QoS::AtLeastOnce, [b"on".to_vec()]).await;

    let (mut a, connack) = Peer::connect(o, false).await;
    assert!(connack.session_present);
    let got = a.publishes_until(|g| !g.is_empty()).await;
    assert_eq!(payloads(&got), ["on"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connects_over_tls_with_the_agents_options_and_an_untrusted_ca_is_refused() {
    // As `fieldlink` does at start (src/main.rs).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let b = broker_with(Limits::default(), true).await;
    let tls = b.broker.tls_addr().expect("a TLS listener");
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let url = fieldlink::config::BrokerUrl { tls: true, host: "localhost".into(), port: tls.port() };
    let password = fieldlink::config::Secret(b.password("dev-a").to_string());
    let agent = |ca: &str| {
        let ca = fixtures.join(ca);
        fieldlink::mqtt_options::options(fieldlink::mqtt_options::Client {
            client_id: "dev-a",
            url: &url,
            keep_alive: Duration::from_secs(5),
            clean_session: true,
            username: Some("dev-a"),
            password: Some(&password),
            ca_file: Some(&ca),
            cert_file: None,
            key_file: None,
        })
        .expect("the agent's options")
    };
    let (mut a, connack) = Peer::connect(agent("ca.pem"), false).await;
    assert_eq!(connack.code, rumqttc::ConnectReturnCode::Success);
    a.subscribe("fieldlink/dev-a/relay/+/set", QoS::AtLeastOnce).await;

    let (client, mut eventloop) = AsyncClient::new(agent("other-ca.pem"), 10);
    let err = tokio::time::timeout(PATIENCE, eventloop.poll()).await.expect("an answer in time").expect_err("refused");
    let text = format!("{err:?}");
    assert!(text.contains("UnknownIssuer") || text.contains("Tls"), "{text}");
    drop(client);
}

/// A well-formed session of device `dev`: CONNECT, SUBSCRIBE, PUBLISH at
/// QoS 1 and 2, PINGREQ, DISCONNECT.
fn session_bytes(dev: &str, password: &str) -> Vec<u8> {
    let mut out = connect_packet(dev.as_bytes(), Some(dev), Some(password), Some(&format!("fieldlink/{dev}/status")));
    let filter = format!("fieldlink/{dev}/relay/+/set");
    let mut sub = vec![0x82, 0, 0, 1];
    sub.extend_from_slice(&u16::try_from(filter.len()).expect("short").to_be_bytes());
    sub.extend_from_slice(filter.as_bytes());
    sub.push(1);
    sub[1] = u8::try_from(sub.len() - 2).expect("short");
    out.extend_from_slice(&sub);
    for (header, id) in [(0x32u8, 2u8), (0x34, 3)] {
        let topic = format!("fieldlink/{dev}/button/door");
        let mut p = vec![header, 0];
        p.extend_from_slice(&u16::try_from(topic.len()).expect("short").to_be_bytes());
        p.extend_from_slice(topic.as_bytes());
        p.extend_from_slice(&[0, id]);
        p.extend_from_slice(br#"{"device":"x","seq":1}"#);
        p[1] = u8::try_from(p.len() - 2).expect("short");
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(&[0xc0, 0, 0xe0, 0]);
    out
}

/// One random mutation of `bytes`: flipped bytes, a cut, inserted garbage,
/// a repeated slice, or a forged remaining length.
fn mutate(rng: &mut fastrand::Rng, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for _ in 0..rng.usize(1..4) {
        match rng.u8(0..5) {
            0 => {
                for _ in 0..rng.usize(1..8) {
                    let i = rng.usize(0..b.len());
                    b[i] ^= 1 << rng.u8(0..8);
                }
            }
            1 => b.truncate(rng.usize(1..b.len())),
            2 => {
                let at = rng.usize(0..b.len());
                let junk: Vec<u8> = (0..rng.usize(1..64)).map(|_| rng.u8(..)).collect();
                b.splice(at..at, junk);
            }
            3 => {
                let from = rng.usize(0..b.len());
                let to = rng.usize(from..b.len());
                let copy = b[from..to].to_vec();
                b.extend_from_slice(&copy);
            }
            _ => {
                let i = rng.usize(0..b.len());
                b.splice(i..i, [0xff, 0xff, 0xff, 0x7f]);
            }
        }
        if b.is_empty() {
            b.push(0x10);
        }
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_mutated_packet_streams_neither_panic_nor_stop_the_broker() {
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let b = broker().await;
    let base = session_bytes("dev-b", b.password("dev-b"));
    // The unmutated stream is a real session: accepted, subscribed.
    let mut s = TcpStream::connect(b.addr()).await.expect("tcp connect");
    s.write_all(&base).await.expect("send");
    let mut answer = [0u8; 9];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut answer)).await.expect("in time").expect("CONNACK and SUBACK");
    assert_eq!(answer, [0x20, 2, 0, 0, 0x90, 3, 0, 1, 1], "CONNACK accepted, then SUBACK granting QoS 1");
    drop(s);
    let mut rng = fastrand::Rng::with_seed(0x5eed_f1e1d);
    let streams: Vec<Vec<u8>> = (0..500).map(|_| mutate(&mut rng, &base)).collect();
    for chunk in streams.chunks(50) {
        let sends = chunk.iter().cloned().map(|bytes| {
            let addr = b.addr();
            tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(addr).await else { return };
                let _ = s.write_all(&bytes).await;
                let _ = s.shutdown().await;
                // Whatever the broker answers, until it closes or a second passes.
                let mut sink = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            })
        });
        for task in sends.collect::<Vec<_>>() {
            task.await.expect("a sender task");
        }
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a mutated packet stream made something panic");
    a_command_reaches(&b, "dev-a", "after-mutations").await;
    a_command_reaches(&b, "dev-b", "after-mutations-b").await;
}
