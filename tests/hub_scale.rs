//! Scale-out, black-box (DESIGN: Hub, "Several hubs can share the work";
//! issue 3): two `fieldlink hub` processes with distinct client ids in one
//! shared subscription group (`$share/hubs/...`) on a test mosquitto, both
//! writing to ONE database, a SQLite file in WAL mode (two processes take
//! turns as its writer), so the test runs wherever mosquitto does.
//!
//! 10,000 messages from five fake agents (2,000 each, QoS 1) are each stored
//! exactly once, and both hubs took part: each logs how many messages it
//! stored when it stops (`collector stopped stored=N duplicates=M`), and the
//! two counts add up to 10,000. (The embedded broker cannot serve shared
//! subscriptions reliably, see `src/broker.rs`; the config refuses them.)

mod common;

use std::thread;

use common::hub::{FakeAgent, Hub, query_i64, unique_device};
use common::{DEADLINE, require_mosquitto, serial, wait_until};

const AGENTS: u64 = 5;
const SEQS: u64 = 2000;

#[test]
fn two_hubs_sharing_a_subscription_store_ten_thousand_messages_from_five_agents_exactly_once() {
    let _serial = serial();
    let Some(broker) = require_mosquitto(false) else { return };
    let mut first = Hub::builder(&broker).shared_group("hubs").start();
    let db = first.database_url().to_string();
    let mut second = Hub::builder(&broker).shared_group("hubs").database(&db).start();
    assert_ne!(first.client_id(), second.client_id());

    let devices: Vec<String> = (0..AGENTS).map(|i| unique_device(&format!("scale{i}"))).collect();
    let total = AGENTS * SEQS;
    thread::scope(|s| {
        for device in &devices {
            let port = broker.port();
            s.spawn(move || {
                let mut fake = FakeAgent::connect(port, device);
                fake.buttons(1..=SEQS);
                fake.wait_acked();
            });
        }
    });

    let in_devices = devices.iter().map(|d| format!("'{d}'")).collect::<Vec<_>>().join(",");
    let rows_sql = format!("SELECT COUNT(*) FROM messages WHERE device IN ({in_devices})");
    let distinct_sql =
        format!("SELECT COUNT(*) FROM (SELECT DISTINCT device, seq FROM messages WHERE device IN ({in_devices})) AS d");
    let count = |sql: &str| u64::try_from(query_i64(&db, sql)).expect("a count");
    wait_until(DEADLINE * 2, &format!("{total} messages to be stored"), || (count(&rows_sql) >= total).then_some(()));

    // Both stop cleanly, committing and acknowledging what they hold; then
    // nothing more can arrive.
    assert_eq!(first.sigterm().code(), Some(0), "the first hub's exit on SIGTERM");
    assert_eq!(second.sigterm().code(), Some(0), "the second hub's exit on SIGTERM");
    assert_eq!(count(&rows_sql), total, "rows stored");
    assert_eq!(count(&distinct_sql), total, "distinct (device, seq) stored");
    for device in &devices {
        let per_device = format!(
            "SELECT COUNT(*) FROM messages WHERE device = '{device}' AND seq BETWEEN 1 AND {SEQS} AND kind = 'button'"
        );
        assert_eq!(count(&per_device), SEQS, "button messages of {device} with seqs 1..={SEQS}");
    }

    let stored: Vec<u64> = [&first, &second]
        .iter()
        .map(|hub| {
            let counts = hub.collector_counts();
            assert_eq!(counts.len(), 1, "hub {} logs one 'collector stopped' line: {counts:?}", hub.client_id());
            eprintln!("hub {}: stored {}, duplicates {}", hub.client_id(), counts[0].0, counts[0].1);
            counts[0].0
        })
        .collect();
    assert!(stored.iter().all(|&n| n > 0), "both hubs stored messages: {stored:?}");
    assert_eq!(stored.iter().sum::<u64>(), total, "the hubs' stored counts add up to every message once: {stored:?}");
}
