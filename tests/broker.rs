//! The embedded broker (rumqttd) against what the agent and the hub rely on,
//! checked with rumqttc MQTT 3.1.1 clients on a free 127.0.0.1 port:
//! persistent sessions, QoS 1 (and 2), retained messages, last will, shared
//! subscriptions, redelivery of unacknowledged messages, and the limits
//! chosen in `src/broker.rs`.
//!
//! Every wait has a generous deadline and fails with what was seen; nothing
//! asserts how fast the broker is.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fieldlink::broker::{EmbeddedBroker, MAX_PAYLOAD_BYTES};
use rumqttc::{AsyncClient, ConnAck, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout_at};

/// How long any one wait may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

async fn broker() -> EmbeddedBroker {
    tokio::task::spawn_blocking(|| EmbeddedBroker::start("127.0.0.1:0".parse().expect("addr")))
        .await
        .expect("start thread")
        .expect("the embedded broker starts")
}

fn options(id: &str, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(1024 * 1024, 1024 * 1024);
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
    let (publisher, _) = Peer::connect(options("pub-ret", b.addr()), false).await;
    publisher.client.publish("fieldlink/pi-1/status", QoS::AtLeastOnce, true, "online").await.expect("publish");
    publisher.disconnect().await;

    let (mut sub, _) = Peer::connect(options("sub-ret", b.addr()), false).await;
    sub.client.subscribe("fieldlink/+/status", QoS::AtLeastOnce).await.expect("subscribe");
    let got = sub.publishes_until(|g| !g.is_empty()).await;
    assert_eq!(payloads(&got), ["online"]);
    assert!(got[0].retain, "a retained message is flagged retain on a new subscription");
}

// (4) last will

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_will_is_published_when_a_client_connection_drops() {
    let b = broker().await;
    let (mut watcher, _) = Peer::connect(options("hub-will", b.addr()), false).await;
    watcher.subscribe("fieldlink/+/status", QoS::AtLeastOnce).await;

    let mut o = options("agent-will", b.addr());
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

// (5) shared subscriptions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_gives_each_message_to_exactly_one_of_two_subscribers() {
    let b = broker().await;
    let (mut a, _) = Peer::connect(options("hub-a", b.addr()), false).await;
    a.subscribe("$share/hubs/t/shared", QoS::AtLeastOnce).await;
    let (mut c, _) = Peer::connect(options("hub-b", b.addr()), false).await;
    c.subscribe("$share/hubs/t/shared", QoS::AtLeastOnce).await;

    let (mut publisher, _) = Peer::connect(options("pub-shared", b.addr()), false).await;
    publisher.publish_all("t/shared", QoS::AtLeastOnce, numbered(100)).await;

    let (got_a, got_c) = collect_split(&mut a, &mut c, 100).await;
    assert!(!got_a.is_empty() && !got_c.is_empty(), "not split: a {}, b {}", got_a.len(), got_c.len());
    let all: Vec<Publish> = got_a.iter().chain(&got_c).cloned().collect();
    assert_eq!(all.len(), 100, "some message went to both: a {}, b {}", summary(&got_a), summary(&got_c));
    assert_eq!(distinct(&all), expected(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_groups_with_one_filter_each_deliver_every_message_of_both_filters() {
    let b = broker().await;
    let (mut a, _) = Peer::connect(options("hub-a3", b.addr()), false).await;
    a.subscribe("$share/hubs-one/t/one", QoS::AtLeastOnce).await;
    a.subscribe("$share/hubs-two/t/two", QoS::AtLeastOnce).await;
    let (mut c, _) = Peer::connect(options("hub-b3", b.addr()), false).await;
    c.subscribe("$share/hubs-one/t/one", QoS::AtLeastOnce).await;
    c.subscribe("$share/hubs-two/t/two", QoS::AtLeastOnce).await;

    let (mut publisher, _) = Peer::connect(options("pub-shared3", b.addr()), false).await;
    publisher.publish_all("t/one", QoS::AtLeastOnce, (0..50).map(|i| format!("m{i:05}").into_bytes())).await;
    publisher.publish_all("t/two", QoS::AtLeastOnce, (50..100).map(|i| format!("m{i:05}").into_bytes())).await;

    let (got_a, got_c) = collect_split(&mut a, &mut c, 100).await;
    let all: Vec<Publish> = got_a.iter().chain(&got_c).cloned().collect();
    assert_eq!(distinct(&all), expected(100));
    assert_eq!(all.len(), 100, "duplicates: a {}, b {}", summary(&got_a), summary(&got_c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_of_two_shared_subscribers_crashes_the_other_gets_its_unacked_messages_with_the_next_message() {
    let b = broker().await;
    let mut o = persistent("hub-dies", b.addr());
    o.set_manual_acks(true);
    let (mut dies, _) = Peer::connect(o, false).await;
    dies.subscribe("$share/hubs/t/handover", QoS::AtLeastOnce).await;
    let (mut lives, _) = Peer::connect(persistent("hub-lives", b.addr()), false).await;
    lives.subscribe("$share/hubs/t/handover", QoS::AtLeastOnce).await;

    let (mut publisher, _) = Peer::connect(options("pub-handover", b.addr()), false).await;
    publisher.publish_all("t/handover", QoS::AtLeastOnce, numbered(10)).await;
    let (got_dies, _) = collect_split(&mut dies, &mut lives, 10).await;
    assert!(!got_dies.is_empty(), "the crashing subscriber got no share");
    dies.drop_link().await;

    let want = distinct(&got_dies);
    // Without a new message the survivor stays parked and gets nothing
    // (see src/broker.rs); the next message wakes it.
    publisher.publish_all("t/handover", QoS::AtLeastOnce, [b"next".to_vec()]).await;
    let got = lives.publishes_until(|g| want.is_subset(&distinct(g))).await;
    assert!(want.is_subset(&distinct(&got)));
}

/// Reads both subscribers until together they hold `n` distinct payloads.
async fn collect_split(a: &mut Peer, c: &mut Peer, n: usize) -> (Vec<Publish>, Vec<Publish>) {
    let deadline = Instant::now() + PATIENCE;
    let (mut got_a, mut got_c) = (Vec::new(), Vec::new());
    loop {
        let together: Vec<Publish> = got_a.iter().chain(&got_c).cloned().collect();
        if distinct(&together).len() >= n {
            return (got_a, got_c);
        }
        let next = timeout_at(deadline, async {
            tokio::select! {
                p = a.rx.recv() => (true, p),
                p = c.rx.recv() => (false, p),
            }
        })
        .await;
        match next {
            Ok((true, Some(Packet::Publish(p)))) => got_a.push(p),
            Ok((false, Some(Packet::Publish(p)))) => got_c.push(p),
            Ok((_, Some(_))) => {}
            Ok((_, None)) => panic!("a subscriber's connection ended"),
            Err(_) => panic!(
                "only {} of {n} distinct within {PATIENCE:?}: a {}, b {}",
                distinct(&together).len(),
                summary(&got_a),
                summary(&got_c)
            ),
        }
    }
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
