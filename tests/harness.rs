//! Self-tests of the shared harness (`tests/common`) that need no agent: the
//! broker starts, stops and restarts on its port, persistence does what the
//! conf says, and the proxy takes a link down and brings it back.

mod common;

use common::{DEADLINE, Proxy, Watcher, require_mosquitto, serial};
use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn a_persistent_broker_keeps_retained_messages_across_a_restart_on_the_same_port() {
    let _serial = serial();
    let Some(mut broker) = require_mosquitto(true) else { return };
    let port = broker.port();
    let watcher = Watcher::connect(port, "harness-persist", "harness/#");
    watcher.publish("harness/kept", "still here", 1, true);
    assert_eq!(broker.retained("harness/kept").as_deref(), Some(&b"still here"[..]));

    let subscribed = watcher.subacks();
    broker.restart();
    assert_eq!(broker.port(), port, "a restart keeps the port");
    watcher.wait_subscribed_after(subscribed);
    assert_eq!(
        broker.retained("harness/kept").as_deref(),
        Some(&b"still here"[..]),
        "persistence keeps retained messages"
    );

    // The watcher is back and still sees new traffic.
    let mark = watcher.len();
    watcher.publish("harness/after", "after restart", 1, false);
    watcher.wait_for_since(
        mark,
        |m| m.iter().any(|m| m.payload == b"after restart"),
        DEADLINE,
        "the watcher to see its own publish",
    );
    assert!(broker.log().contains("Received PUBLISH from harness-persist"), "the broker logs every packet");
}

#[test]
fn a_broker_without_persistence_forgets_retained_messages_when_restarted() {
    let _serial = serial();
    let Some(mut broker) = require_mosquitto(false) else { return };
    let watcher = Watcher::connect(broker.port(), "harness-volatile", "harness/#");
    watcher.publish("harness/gone", "soon gone", 1, true);
    assert_eq!(broker.retained("harness/gone").as_deref(), Some(&b"soon gone"[..]));

    let subscribed = watcher.subacks();
    broker.stop();
    broker.restart();
    watcher.wait_subscribed_after(subscribed);
    assert_eq!(broker.retained("harness/gone"), None);

    broker.kill();
    assert!(TcpStream::connect(("127.0.0.1", broker.port())).is_err(), "a killed broker no longer accepts");
}

#[test]
fn the_proxy_cuts_the_link_and_heals_it_without_touching_the_broker() {
    let _serial = serial();
    let Some(broker) = require_mosquitto(false) else { return };
    let proxy = Proxy::start(broker.port());
    let direct = Watcher::connect(broker.port(), "harness-direct", "harness/#");
    let proxied = Watcher::connect(proxy.port(), "harness-proxied", "harness/#");

    proxied.publish("harness/via-proxy", "before", 1, false);
    direct.wait_for(|m| m.iter().any(|m| m.payload == b"before"), DEADLINE, "a message through the proxy");

    proxy.cut();
    common::wait_until(DEADLINE, "the proxied client to notice the cut", || (!proxied.connected()).then_some(()));
    // While cut, a new connection is accepted and closed at once.
    let mut probe = TcpStream::connect(("127.0.0.1", proxy.port())).expect("the proxy still listens");
    probe.set_read_timeout(Some(Duration::from_secs(30))).expect("set a read timeout");
    let mut buf = [0u8; 1];
    assert_eq!(probe.read(&mut buf).expect("a closed connection reads as end of file"), 0);
    assert!(direct.connected(), "the direct client never noticed anything");

    let connects = proxied.connacks();
    let subscribed = proxied.subacks();
    proxy.heal();
    common::wait_until(DEADLINE, "the proxied client to reconnect", || (proxied.connacks() > connects).then_some(()));
    proxied.wait_subscribed_after(subscribed);
    proxied.publish("harness/via-proxy", "after", 1, false);
    direct.wait_for(|m| m.iter().any(|m| m.payload == b"after"), DEADLINE, "a message through the healed proxy");
}
