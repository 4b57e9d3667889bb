//! The store's test suite, written once and run against every backend:
//! SQLite in a temporary directory, and MariaDB and PostgreSQL in databases
//! created for each test on the machine's servers (see `backends`). Each
//! case is a function taking a fresh [`Store`] (and its URL); the `suite!`
//! macro makes one test per case per backend, named
//! `<backend>::<case as a sentence>`. No case depends on timing.

mod backends;

use std::time::SystemTime;

use serde_json::{Value, json};
use sqlx::{AnyConnection, Connection};

use crate::hub::model::{Before, CommandRow, CommandStatus, Kind, Message, Update};
use crate::hub::store::{Store, StoreError};
use crate::timefmt;

/// 2025-11-21T10:00:00.000Z, the suite's time zero.
const T0_MS: u64 = 1_763_719_200_000;

fn at(sec: u64) -> SystemTime {
    timefmt::from_millis(T0_MS + sec * 1000)
}

fn ts(sec: u64) -> String {
    timefmt::rfc3339_millis(at(sec))
}

fn message(device: &str, seq: u64, kind: Kind, name: Option<&str>, body: Value) -> Update {
    let mut payload = json!({"device": device, "seq": seq, "ts": ts(seq)});
    if let (Some(p), Some(b)) = (payload.as_object_mut(), body.as_object()) {
        p.extend(b.clone());
    }
    let name = name.map(str::to_string);
    Update::Message(Message { device: device.into(), epoch: 0, seq, ts: ts(seq), kind, name, payload })
}

/// `update` (a message) under another epoch, its payload saying so too.
fn in_epoch(epoch: u64, mut update: Update) -> Update {
    if let Update::Message(m) = &mut update {
        m.epoch = epoch;
        m.payload["epoch"] = json!(epoch);
    }
    update
}

/// An epoch as a new state_dir gets it (unix ms).
const NEW_EPOCH: u64 = 1_795_255_200_000;

fn button(device: &str, seq: u64, state: &str) -> Update {
    message(device, seq, Kind::Button, Some("door"), json!({"button": "door", "state": state}))
}

fn heartbeat(device: &str, seq: u64, temp_c: f64) -> Update {
    message(device, seq, Kind::Heartbeat, None, json!({"uptime_s": seq, "temp_c": temp_c, "outbox": {"depth": 0}}))
}

fn relay(device: &str, seq: u64, relay: &str, state: &str, command_id: Option<&str>) -> Update {
    let cause = if command_id.is_some() { "command" } else { "startup" };
    message(
        device,
        seq,
        Kind::Relay,
        Some(relay),
        json!({"relay": relay, "state": state, "cause": cause, "command_id": command_id}),
    )
}

fn error(device: &str, seq: u64, code: &str, text: &str, command_id: &str) -> Update {
    let body = json!({"code": code, "message": text, "topic": "fieldlink/pi/relay/pump/set", "command_id": command_id});
    message(device, seq, Kind::Error, None, body)
}

fn sensor(device: &str, seq: u64, name: &str, value: f64) -> Update {
    message(device, seq, Kind::Sensor, Some(name), json!({"sensor": name, "value": value, "unit": "°C"}))
}

fn status(device: &str, online: bool, sec: u64) -> Update {
    Update::Status { device: device.into(), online, at: ts(sec) }
}

fn command(id: &str, device: &str, relay: &str, expires_sec: u64) -> CommandRow {
    CommandRow {
        command_id: id.into(),
        device: device.into(),
        relay: relay.into(),
        requested: "on".into(),
        status: CommandStatus::Requested,
        requested_at: ts(0),
        expires_at: ts(expires_sec),
        confirmed_at: None,
        state: None,
        error: None,
        requested_by: Some("api token".into()),
        client: Some("127.0.0.1".into()),
        answered_at: None,
    }
}

async fn write(store: &Store, updates: &[Update]) -> Vec<bool> {
    store.write_batch(updates).await.expect("write_batch")
}

async fn seqs(store: &Store, device: &str, kind: Option<Kind>, limit: u32, before: Option<u64>) -> Vec<u64> {
    let before = before.map(|seq| Before { epoch: None, seq });
    store.events(device, kind, limit, before).await.expect("events").iter().map(|e| e.seq).collect()
}

/// `(epoch, seq)` of a device's events, newest first.
async fn identities(store: &Store, device: &str, before: Option<Before>) -> Vec<(u64, u64)> {
    store.events(device, None, 100, before).await.expect("events").iter().map(|e| (e.epoch, e.seq)).collect()
}

async fn cmd(store: &Store, id: &str) -> CommandRow {
    store.command(id).await.expect("command").unwrap_or_else(|| panic!("command {id} is stored"))
}

async fn device(store: &Store, name: &str) -> crate::hub::model::DeviceView {
    let devices = store.devices().await.expect("devices");
    devices.into_iter().find(|d| d.device == name).unwrap_or_else(|| panic!("device {name} is listed"))
}

// ---------------------------------------------------------------- the cases

async fn a_message_seen_twice_is_stored_once(store: Store, _: String) {
    assert_eq!(write(&store, &[button("pi", 1, "pressed")]).await, [true]);
    // A replay, even one that differs, is the same (device, seq): the first stays.
    assert_eq!(write(&store, &[button("pi", 1, "released")]).await, [false]);
    let events = store.events("pi", None, 10, None).await.expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].payload["state"], "pressed");
}

async fn the_same_device_and_seq_twice_in_one_batch_is_stored_once(store: Store, _: String) {
    let batch =
        [button("pi", 7, "pressed"), button("pi", 7, "pressed"), status("pi", true, 1), button("other", 7, "released")];
    assert_eq!(write(&store, &batch).await, [true, false, true, true]);
    assert_eq!(seqs(&store, "pi", None, 10, None).await, [7]);
    assert_eq!(seqs(&store, "other", None, 10, None).await, [7]);
}

async fn the_newest_heartbeat_wins_by_seq_even_when_an_older_one_arrives_later(store: Store, _: String) {
    assert_eq!(write(&store, &[heartbeat("pi", 5, 50.0)]).await, [true]);
    assert_eq!(write(&store, &[heartbeat("pi", 3, 30.0)]).await, [true]);
    assert_eq!(device(&store, "pi").await.heartbeat.expect("a heartbeat")["temp_c"], 50.0);
    assert_eq!(write(&store, &[heartbeat("pi", 7, 70.0), heartbeat("pi", 6, 60.0)]).await, [true, true]);
    assert_eq!(device(&store, "pi").await.heartbeat.expect("a heartbeat")["seq"], 7);
    assert_eq!(seqs(&store, "pi", Some(Kind::Heartbeat), 10, None).await, [7, 6, 5, 3]);
}

async fn the_newest_relay_state_wins_by_seq_even_when_an_older_one_arrives_later(store: Store, _: String) {
    write(&store, &[relay("pi", 10, "pump", "on", None)]).await;
    write(&store, &[relay("pi", 4, "pump", "off", None), relay("pi", 6, "fan", "on", None)]).await;
    let relays = device(&store, "pi").await.relays;
    assert_eq!(relays.get("pump").map(String::as_str), Some("on"));
    assert_eq!(relays.get("fan").map(String::as_str), Some("on"));
    write(&store, &[relay("pi", 12, "pump", "off", None)]).await;
    assert_eq!(device(&store, "pi").await.relays.get("pump").map(String::as_str), Some("off"));
    // Relay states are per device.
    write(&store, &[relay("barn", 1, "pump", "on", None)]).await;
    assert_eq!(device(&store, "pi").await.relays.get("pump").map(String::as_str), Some("off"));
    assert_eq!(device(&store, "barn").await.relays.get("pump").map(String::as_str), Some("on"));
}

async fn a_relay_state_carrying_a_command_id_confirms_that_command(store: Store, _: String) {
    store.insert_command(&command("c1", "pi", "pump", 30)).await.expect("insert");
    let report = store.write_batch_report(&[relay("pi", 3, "pump", "on", Some("c1"))]).await.expect("write");
    assert_eq!(report.stored, [true]);
    let c1 = cmd(&store, "c1").await;
    assert_eq!(report.commands, std::slice::from_ref(&c1));
    assert_eq!(c1.status, CommandStatus::Confirmed);
    assert_eq!(c1.confirmed_at.as_deref(), Some(ts(3).as_str()));
    assert_eq!(c1.state.as_deref(), Some("on"));
    // The replay changes nothing and reports nothing.
    let report = store.write_batch_report(&[relay("pi", 3, "pump", "on", Some("c1"))]).await.expect("write");
    assert_eq!((report.stored, report.commands), (vec![false], vec![]));
    // Another device cannot answer pi's command.
    store.insert_command(&command("c2", "pi", "pump", 30)).await.expect("insert");
    write(&store, &[relay("barn", 1, "pump", "on", Some("c2"))]).await;
    assert_eq!(cmd(&store, "c2").await.status, CommandStatus::Requested);
    // An answer that comes after the hub gave up still counts.
    store.insert_command(&command("c3", "pi", "pump", 5)).await.expect("insert");
    assert_eq!(store.expire_commands(at(10)).await.expect("expire"), 1);
    write(&store, &[relay("pi", 4, "pump", "off", Some("c3"))]).await;
    let c3 = cmd(&store, "c3").await;
    assert_eq!((c3.status, c3.state.as_deref()), (CommandStatus::Confirmed, Some("off")));
}

async fn an_error_carrying_a_command_id_rejects_that_command(store: Store, _: String) {
    store.insert_command(&command("c1", "pi", "pump", 30)).await.expect("insert");
    let report =
        store.write_batch_report(&[error("pi", 2, "expired", "expires_at is in the past", "c1")]).await.expect("write");
    let c1 = cmd(&store, "c1").await;
    assert_eq!(report.commands, std::slice::from_ref(&c1));
    assert_eq!(c1.status, CommandStatus::Rejected);
    assert_eq!(c1.error.as_deref(), Some("expired: expires_at is in the past"));
    assert_eq!(c1.confirmed_at, None);
    // A rejected command stays rejected.
    write(&store, &[relay("pi", 3, "pump", "on", Some("c1"))]).await;
    assert_eq!(cmd(&store, "c1").await.status, CommandStatus::Rejected);
}

async fn unanswered_commands_past_their_expiry_are_expired_once(store: Store, _: String) {
    store.insert_command(&command("late", "pi", "pump", 10)).await.expect("insert");
    store.insert_command(&command("early", "pi", "pump", 100)).await.expect("insert");
    store.insert_command(&command("done", "pi", "pump", 10)).await.expect("insert");
    write(&store, &[relay("pi", 1, "pump", "on", Some("done"))]).await;
    // Strictly before: a command expiring at the very moment is still open.
    assert_eq!(store.expire_commands(at(10)).await.expect("expire"), 0);
    let expired = store.expire_commands_returning(at(50)).await.expect("expire");
    assert_eq!(expired.iter().map(|c| c.command_id.as_str()).collect::<Vec<_>>(), ["late"]);
    assert_eq!(expired[0].status, CommandStatus::Expired);
    assert_eq!(store.expire_commands(at(50)).await.expect("expire"), 0);
    assert_eq!(cmd(&store, "late").await.status, CommandStatus::Expired);
    assert_eq!(cmd(&store, "early").await.status, CommandStatus::Requested);
    assert_eq!(cmd(&store, "done").await.status, CommandStatus::Confirmed);
}

async fn a_command_reads_back_as_recorded_with_its_times_in_utc(store: Store, _: String) {
    let mut c = command("c1", "pi", "pump", 30);
    c.requested = "toggle".into();
    c.expires_at = "2025-11-21T12:00:30+02:00".into();
    store.insert_command(&c).await.expect("insert");
    c.expires_at = ts(30);
    assert_eq!(cmd(&store, "c1").await, c);
    assert_eq!(store.command("nope").await.expect("command"), None);
    assert!(store.insert_command(&c).await.is_err(), "an id is recorded once");
    c.requested = "sideways".into();
    c.command_id = "c2".into();
    assert!(matches!(store.insert_command(&c).await, Err(StoreError::BadCommand { .. })));
}

async fn a_status_set_by_hand_sticks_and_an_unknown_id_is_an_error(store: Store, _: String) {
    store.insert_command(&command("c1", "pi", "pump", 30)).await.expect("insert");
    store.set_command_status("c1", CommandStatus::Expired).await.expect("set");
    assert_eq!(cmd(&store, "c1").await.status, CommandStatus::Expired);
    // Setting the status it already has is fine too.
    store.set_command_status("c1", CommandStatus::Expired).await.expect("set again");
    assert!(matches!(
        store.set_command_status("nope", CommandStatus::Rejected).await,
        Err(StoreError::UnknownCommand(id)) if id == "nope"
    ));
}

async fn events_come_newest_first_and_page_with_before_seq_and_kind(store: Store, _: String) {
    let batch: Vec<Update> = (1..=9)
        .map(|seq| match seq % 3 {
            0 => button("pi", seq, "pressed"),
            1 => heartbeat("pi", seq, 40.0),
            _ => relay("pi", seq, "pump", "on", None),
        })
        .collect();
    write(&store, &batch).await;
    write(&store, &[button("other", 100, "pressed")]).await;
    assert_eq!(seqs(&store, "pi", None, 3, None).await, [9, 8, 7]);
    assert_eq!(seqs(&store, "pi", None, 3, Some(7)).await, [6, 5, 4]);
    assert_eq!(seqs(&store, "pi", None, 3, Some(2)).await, [1]);
    assert_eq!(seqs(&store, "pi", None, 3, Some(1)).await, Vec::<u64>::new());
    assert_eq!(seqs(&store, "pi", Some(Kind::Button), 10, None).await, [9, 6, 3]);
    assert_eq!(seqs(&store, "pi", Some(Kind::Heartbeat), 2, Some(7)).await, [4, 1]);
    assert_eq!(seqs(&store, "pi", Some(Kind::Error), 10, None).await, Vec::<u64>::new());
    assert_eq!(seqs(&store, "pi", None, 0, None).await, Vec::<u64>::new());
    assert_eq!(seqs(&store, "pi", None, 100, Some(u64::MAX)).await.len(), 9);
    assert_eq!(seqs(&store, "nobody", None, 10, None).await, Vec::<u64>::new());
}

async fn stored_messages_read_back_as_they_were_written(store: Store, _: String) {
    let b = button("pi", 1, "pressed");
    let h = heartbeat("pi", 2, 41.5);
    let mut odd = button("pi", 3, "released");
    if let Update::Message(m) = &mut odd {
        m.ts = "2025-11-21T12:00:03.000+02:00".into();
    }
    write(&store, &[b.clone(), h.clone(), odd]).await;
    let events = store.events("pi", None, 10, None).await.expect("events");
    let (Update::Message(b), Update::Message(h)) = (b, h) else { unreachable!("built as messages") };
    assert_eq!(events[2].seq, 1);
    assert_eq!(
        (events[2].ts.as_str(), events[2].kind, events[2].name.as_deref()),
        (b.ts.as_str(), Kind::Button, Some("door"))
    );
    assert_eq!(events[2].payload, b.payload);
    assert_eq!((events[1].kind, events[1].name.as_deref()), (Kind::Heartbeat, None));
    assert_eq!(events[1].payload, h.payload);
    assert_eq!(events[0].ts, ts(3), "a ts with an offset is stored in UTC");
}

async fn status_updates_keep_online_state_and_any_first_word_creates_the_device(store: Store, _: String) {
    write(&store, &[status("a", true, 5)]).await;
    let a = device(&store, "a").await;
    assert!(a.online);
    assert_eq!(a.last_seen.as_deref(), Some(ts(5).as_str()));
    assert_eq!((a.heartbeat, a.relays.len()), (None, 0));
    write(&store, &[button("b", 1, "pressed")]).await;
    let b = device(&store, "b").await;
    assert!(!b.online, "a message alone does not say the device is online");
    assert!(b.last_seen.is_some());
    // An offline status that was received earlier does not move last_seen back.
    write(&store, &[status("a", false, 2)]).await;
    let a = device(&store, "a").await;
    assert!(!a.online);
    assert_eq!(a.last_seen.as_deref(), Some(ts(5).as_str()));
    let names: Vec<String> = store.devices().await.expect("devices").into_iter().map(|d| d.device).collect();
    assert_eq!(names, ["a", "b"]);
}

async fn old_heartbeats_are_pruned_and_nothing_else(store: Store, _: String) {
    write(
        &store,
        &[heartbeat("pi", 10, 1.0), heartbeat("pi", 20, 2.0), heartbeat("pi", 30, 3.0), button("pi", 5, "pressed")],
    )
    .await;
    // Strictly older: the heartbeat at 20 s stays.
    assert_eq!(store.prune_heartbeats(at(20)).await.expect("prune"), 1);
    assert_eq!(store.prune_heartbeats(at(25)).await.expect("prune"), 1);
    assert_eq!(store.prune_heartbeats(at(25)).await.expect("prune"), 0);
    assert_eq!(seqs(&store, "pi", None, 10, None).await, [30, 5]);
    assert_eq!(device(&store, "pi").await.heartbeat.expect("kept")["seq"], 30);
    assert_eq!(store.prune_heartbeats(at(1000)).await.expect("prune"), 1);
    assert_eq!(device(&store, "pi").await.heartbeat.expect("the device keeps its newest")["seq"], 30);
    // A pruned heartbeat's replay is stored again; seq still decides.
    assert_eq!(write(&store, &[heartbeat("pi", 10, 1.0)]).await, [true]);
    assert_eq!(device(&store, "pi").await.heartbeat.expect("kept")["seq"], 30);
}

async fn a_batch_with_an_update_the_schema_cannot_hold_writes_nothing(store: Store, _: String) {
    let mut bad = button("pi", 2, "pressed");
    if let Update::Message(m) = &mut bad {
        m.device = "d".repeat(300);
    }
    let result = store.write_batch(&[button("pi", 1, "pressed"), bad]).await;
    assert!(matches!(result, Err(StoreError::Invalid { index: 1, .. })), "{result:?}");
    assert_eq!(seqs(&store, "pi", None, 10, None).await, Vec::<u64>::new());
    assert_eq!(write(&store, &[]).await, Vec::<bool>::new());
}

async fn hubs_starting_at_once_share_one_schema(store: Store, url: String) {
    let opened = futures_util::future::join_all((0..4).map(|_| Store::connect(&url))).await;
    let others: Vec<Store> = opened.into_iter().map(|s| s.expect("every hub connects")).collect();
    write(&others[0], &[button("pi", 1, "pressed")]).await;
    assert_eq!(write(&others[1], &[button("pi", 1, "pressed")]).await, [false]);
    assert_eq!(seqs(&store, "pi", None, 10, None).await, [1]);
    for s in &others {
        s.close().await;
    }
    let mut conn = AnyConnection::connect(&url).await.expect("connect");
    let mut versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM fieldlink_schema").fetch_all(&mut conn).await.expect("versions");
    versions.sort_unstable();
    assert_eq!(versions, (1..=super::schema::LATEST).collect::<Vec<_>>(), "each migration recorded once");
    let _ = conn.close().await; // test connection; nothing to flush
}

async fn two_hubs_writing_the_same_messages_at_once_store_each_once(store: Store, url: String) {
    let other = Store::connect(&url).await.expect("a second hub");
    let all: Vec<Update> = (1..=60)
        .flat_map(|seq| {
            ["a", "b", "c"].map(|d| match seq % 3 {
                0 => heartbeat(d, seq, 20.0 + seq as f64),
                1 => relay(d, seq, "pump", if seq % 2 == 0 { "on" } else { "off" }, None),
                _ => button(d, seq, "pressed"),
            })
        })
        .collect();
    let mut reversed = all.clone();
    reversed.reverse();
    // Each hub writes everything, in batches of 20, in opposite orders.
    let hub = |store: Store, updates: Vec<Update>| async move {
        let mut stored = Vec::new();
        for batch in updates.chunks(20) {
            let flags = store.write_batch(batch).await.expect("a batch is stored despite the other hub");
            for (u, new) in batch.iter().zip(flags) {
                if let Update::Message(m) = u {
                    stored.push(((m.device.clone(), m.seq), new));
                }
            }
        }
        stored
    };
    let (a, b) = tokio::join!(hub(store.clone(), all.clone()), hub(other.clone(), reversed));
    let mut firsts = std::collections::BTreeMap::new();
    for (key, new) in a.into_iter().chain(b) {
        *firsts.entry(key).or_insert(0) += u32::from(new);
    }
    assert_eq!(firsts.len(), all.len());
    assert!(firsts.values().all(|n| *n == 1), "each (device, seq) is newly stored by exactly one hub");
    for d in ["a", "b", "c"] {
        assert_eq!(seqs(&store, d, None, 1000, None).await.len(), 60);
        let view = device(&store, d).await;
        assert_eq!(view.heartbeat.expect("a heartbeat")["seq"], 60);
        assert_eq!(view.relays.get("pump").map(String::as_str), Some("on"), "seq 58 is the newest relay state");
    }
    other.close().await;
}

async fn a_device_whose_epoch_changed_has_its_new_messages_stored_and_its_newest_state_is_the_new_one(
    store: Store,
    _: String,
) {
    let old = [relay("pi", 5, "pump", "on", None), heartbeat("pi", 6, 60.0), button("pi", 7, "pressed")];
    assert_eq!(write(&store, &old).await, [true, true, true]);
    // seq.floor was lost: seqs restart at 1 under a greater epoch.
    let new = [
        in_epoch(NEW_EPOCH, relay("pi", 1, "pump", "off", None)),
        in_epoch(NEW_EPOCH, heartbeat("pi", 2, 20.0)),
        in_epoch(NEW_EPOCH, button("pi", 7, "released")),
    ];
    assert_eq!(write(&store, &new).await, [true, true, true], "new messages, not duplicates");
    assert_eq!(write(&store, &new).await, [false, false, false], "a replay of them is");
    let pi = device(&store, "pi").await;
    assert_eq!(pi.relays.get("pump").map(String::as_str), Some("off"), "the new epoch's state is the newest");
    let hb = pi.heartbeat.expect("a heartbeat");
    assert_eq!((&hb["epoch"], &hb["seq"]), (&json!(NEW_EPOCH), &json!(2)));
    // A late message of the old epoch is stored but is not newer.
    let late = [relay("pi", 8, "pump", "on", None), heartbeat("pi", 9, 90.0)];
    assert_eq!(write(&store, &late).await, [true, true]);
    let pi = device(&store, "pi").await;
    assert_eq!(pi.relays.get("pump").map(String::as_str), Some("off"));
    assert_eq!(pi.heartbeat.expect("a heartbeat")["temp_c"], 20.0);
    assert_eq!(
        identities(&store, "pi", None).await,
        [(NEW_EPOCH, 7), (NEW_EPOCH, 2), (NEW_EPOCH, 1), (0, 9), (0, 8), (0, 7), (0, 6), (0, 5)]
    );
    let before = Some(Before { epoch: Some(NEW_EPOCH), seq: 2 });
    assert_eq!(identities(&store, "pi", before).await, [(NEW_EPOCH, 1), (0, 9), (0, 8), (0, 7), (0, 6), (0, 5)]);
    let before = Some(Before { epoch: None, seq: 1 });
    assert_eq!(identities(&store, "pi", before).await, [(0, 9), (0, 8), (0, 7), (0, 6), (0, 5)]);
    assert_eq!(identities(&store, "nobody", before).await, []);
}

/// Rows as schema version 1 held them: a relay state, a heartbeat, a device.
const V1_ROWS: [&str; 4] = [
    "INSERT INTO messages (device, seq, ts, kind, name, payload, received_at) VALUES ('pi', 3, \
     '2025-11-21T10:00:03.000Z', 'relay', 'pump', \
     '{\"device\":\"pi\",\"seq\":3,\"relay\":\"pump\",\"state\":\"on\"}', '2025-11-21T10:00:03.000Z')",
    "INSERT INTO messages (device, seq, ts, kind, name, payload, received_at) VALUES ('pi', 4, \
     '2025-11-21T10:00:04.000Z', 'heartbeat', NULL, '{\"device\":\"pi\",\"seq\":4,\"temp_c\":40.0}', \
     '2025-11-21T10:00:04.000Z')",
    "INSERT INTO devices (device, online, last_seen, heartbeat_seq, heartbeat) VALUES ('pi', 1, \
     '2025-11-21T10:00:04.000Z', 4, '{\"device\":\"pi\",\"seq\":4,\"temp_c\":40.0}')",
    "INSERT INTO relays (device, relay, state, seq) VALUES ('pi', 'pump', 'on', 3)",
];

async fn a_version_1_database_is_migrated_with_its_rows_in_epoch_0(url: String) {
    let dialect = super::Dialect::from_url(&url).expect("a test url");
    // As `Store::connect` does: SQLite creates the file only when asked.
    let create = if dialect == super::Dialect::Sqlite { format!("{url}?mode=rwc") } else { url.clone() };
    super::schema::migrate_upto(&create, dialect, 1).await.expect("schema version 1");
    let mut conn = AnyConnection::connect(&url).await.expect("connect");
    for row in V1_ROWS {
        sqlx::query(row).execute(&mut conn).await.expect("a version-1 row");
    }
    let _ = conn.close().await; // test connection; nothing to flush
    let store = Store::connect(&url).await.expect("connect and migrate");
    assert_eq!(identities(&store, "pi", None).await, [(0, 4), (0, 3)], "old rows are epoch 0");
    assert_eq!(write(&store, &[relay("pi", 3, "pump", "off", None)]).await, [false], "(pi, 0, 3) is stored");
    assert_eq!(device(&store, "pi").await.heartbeat.expect("kept")["temp_c"], 40.0);
    let new = [in_epoch(NEW_EPOCH, relay("pi", 1, "pump", "off", None)), in_epoch(NEW_EPOCH, heartbeat("pi", 2, 20.0))];
    assert_eq!(write(&store, &new).await, [true, true]);
    let pi = device(&store, "pi").await;
    assert_eq!(pi.relays.get("pump").map(String::as_str), Some("off"));
    assert_eq!(pi.heartbeat.expect("a heartbeat")["temp_c"], 20.0);
    store.close().await;
    // Connecting again migrates nothing more.
    let again = Store::connect(&url).await.expect("reconnect");
    assert_eq!(identities(&again, "pi", None).await, [(NEW_EPOCH, 2), (NEW_EPOCH, 1), (0, 4), (0, 3)]);
    again.close().await;
    let mut conn = AnyConnection::connect(&url).await.expect("connect");
    let mut versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM fieldlink_schema").fetch_all(&mut conn).await.expect("versions");
    versions.sort_unstable();
    assert_eq!(versions, (1..=super::schema::LATEST).collect::<Vec<_>>());
    let _ = conn.close().await; // as above
}

async fn set_aside_messages_read_back_newest_first_and_are_counted_per_device(store: Store, _: String) {
    write(&store, &[button("pi", 1, "pressed")]).await;
    let nul = crate::hub::ingest::set_aside("fieldlink", "fieldlink/pi/error", b"{\"code\":\"a\0b\"}", "NUL", &ts(1));
    let big = crate::hub::ingest::set_aside("fieldlink", "fieldlink/pi/button/door", &[b'x'; 5000], "too big", &ts(2));
    let stray = crate::hub::ingest::set_aside("fieldlink", "elsewhere", b"", "not ours", &ts(3));
    for r in [&nul, &big, &stray] {
        store.insert_set_aside(r).await.expect("recorded");
    }
    let all = store.set_aside(10).await.expect("read");
    let reasons: Vec<&str> = all.iter().map(|r| r.entry.reason.as_str()).collect();
    assert_eq!(reasons, ["not ours", "too big", "NUL"], "newest first");
    assert_eq!(all[2].entry.payload, "{\"code\":\"a\\u0000b\"}", "the NUL is stored escaped");
    assert_eq!(all[2].entry.device.as_deref(), Some("pi"));
    assert_eq!(all[1].entry.payload_bytes, 5000);
    assert_eq!(all[0].entry.device, None);
    assert_eq!(store.set_aside(1).await.expect("read").len(), 1, "limit");
    assert_eq!(device(&store, "pi").await.set_aside, 2);
}

async fn the_newest_sensor_reading_wins_by_seq_and_every_reading_is_an_event(store: Store, _: String) {
    let first = [sensor("pi", 2, "tank", 21.5), sensor("pi", 3, "air", -4.25), button("pi", 4, "pressed")];
    assert_eq!(write(&store, &first).await, [true, true, true]);
    // An older reading arriving late is stored as an event but is not the newest.
    assert_eq!(write(&store, &[sensor("pi", 1, "tank", 99.0), sensor("pi", 2, "tank", 21.5)]).await, [true, false]);
    let pi = device(&store, "pi").await;
    let tank = &pi.sensors["tank"];
    assert_eq!((tank.value, tank.unit.as_deref(), tank.ts.as_str()), (21.5, Some("°C"), ts(2).as_str()));
    assert_eq!(pi.sensors["air"].value, -4.25);
    assert_eq!(seqs(&store, "pi", Some(Kind::Sensor), 10, None).await, [3, 2, 1]);
    let events = store.events("pi", Some(Kind::Sensor), 1, None).await.expect("events");
    assert_eq!((events[0].name.as_deref(), events[0].payload["value"].as_f64()), (Some("air"), Some(-4.25)));
    assert_eq!(write(&store, &[in_epoch(NEW_EPOCH, sensor("pi", 1, "tank", 7.0))]).await, [true]);
    assert_eq!(device(&store, "pi").await.sensors["tank"].value, 7.0, "a new epoch is newer");
}

async fn a_version_3_database_gains_the_sensors_table(url: String) {
    let dialect = super::Dialect::from_url(&url).expect("a test url");
    let create = if dialect == super::Dialect::Sqlite { format!("{url}?mode=rwc") } else { url.clone() };
    super::schema::migrate_upto(&create, dialect, 3).await.expect("schema version 3");
    let mut conn = AnyConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "INSERT INTO messages (device, epoch, seq, ts, kind, name, payload, received_at) VALUES ('pi', 0, 1, \
         '2025-11-21T10:00:01.000Z', 'button', 'door', '{\"device\":\"pi\",\"seq\":1,\"state\":\"pressed\"}', \
         '2025-11-21T10:00:01.000Z')",
    )
    .execute(&mut conn)
    .await
    .expect("a version-3 row");
    let _ = conn.close().await; // test connection; nothing to flush
    let store = Store::connect(&url).await.expect("connect and migrate");
    assert_eq!(seqs(&store, "pi", None, 10, None).await, [1], "old rows are kept");
    assert_eq!(write(&store, &[sensor("pi", 2, "tank", 19.0)]).await, [true]);
    assert_eq!(device(&store, "pi").await.sensors["tank"].value, 19.0);
    store.close().await;
    let mut conn = AnyConnection::connect(&url).await.expect("connect");
    let mut versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM fieldlink_schema").fetch_all(&mut conn).await.expect("versions");
    versions.sort_unstable();
    assert_eq!(versions, [1, 2, 3, 4, 5]);
    let _ = conn.close().await; // as above
}

async fn status_changes_are_kept_as_history_and_repeats_are_not(store: Store, _: String) {
    write(&store, &[status("pi", true, 1), status("pi", true, 2), status("pi", false, 3)]).await;
    write(&store, &[status("pi", false, 4), status("pi", true, 5), status("barn", false, 6)]).await;
    let (before, changes) = store.status_events("pi", at(0), at(100)).await.expect("status events");
    assert_eq!(before, None);
    let seen: Vec<(bool, String)> = changes.into_iter().map(|e| (e.online, e.at)).collect();
    assert_eq!(seen, [(true, ts(1)), (false, ts(3)), (true, ts(5))], "changes only, oldest first, pi's only");
    let (before, changes) = store.status_events("pi", at(4), at(100)).await.expect("status events");
    assert_eq!(before.map(|b| (b.online, b.at)), Some((false, ts(3))), "the state the range starts in");
    assert_eq!(changes.len(), 1);
}

async fn a_devices_commands_list_newest_first_with_who_asked_and_when_each_was_answered(store: Store, _: String) {
    let mut first = command("c1", "pi", "pump", 30);
    first.requested_by = Some("dashboard session".into());
    store.insert_command(&first).await.expect("insert");
    let mut second = command("c2", "pi", "pump", 30);
    second.requested_at = ts(1);
    store.insert_command(&second).await.expect("insert");
    let mut third = command("c3", "pi", "pump", 5);
    third.requested_at = ts(2);
    store.insert_command(&third).await.expect("insert");
    store.insert_command(&command("other", "barn", "pump", 30)).await.expect("insert");
    write(&store, &[relay("pi", 7, "pump", "on", Some("c1")), error("pi", 8, "busy", "try later", "c2")]).await;
    assert_eq!(store.expire_commands(at(20)).await.expect("expire"), 1);
    let list = store.device_commands("pi", 10).await.expect("commands");
    let got: Vec<_> = list
        .iter()
        .map(|c| (c.command_id.as_str(), c.status, c.requested_by.as_deref(), c.answered_at.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("c3", CommandStatus::Expired, Some("api token"), Some(ts(20))),
            ("c2", CommandStatus::Rejected, Some("api token"), Some(ts(8))),
            ("c1", CommandStatus::Confirmed, Some("dashboard session"), Some(ts(7))),
        ]
    );
    assert_eq!(list[0].client.as_deref(), Some("127.0.0.1"));
    assert_eq!(store.device_commands("pi", 1).await.expect("commands").len(), 1, "limit holds");
}

async fn a_range_read_returns_the_devices_messages_by_time_with_their_commit_time(store: Store, _: String) {
    write(&store, &[heartbeat("pi", 1, 40.0), button("pi", 2, "pressed"), sensor("pi", 3, "tank", 2.5)]).await;
    write(&store, &[button("pi", 50, "released"), button("barn", 2, "pressed")]).await;
    let rows = store.range("pi", at(0), at(10)).await.expect("range");
    let kinds: Vec<Kind> = rows.iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [Kind::Heartbeat, Kind::Button, Kind::Sensor], "pi's, inside the range, by ts");
    assert_eq!(rows[0].payload.as_ref().and_then(|p| p["temp_c"].as_f64()), Some(40.0));
    assert_eq!(rows[1].payload, None, "no payload for uncharted kinds");
    assert_eq!(rows[2].name.as_deref(), Some("tank"));
    assert_eq!(rows[1].ts_ms, timefmt::to_millis(at(2)));
    // The suite's times are in 2025; the hub committed them just now.
    assert!(rows.iter().all(|r| r.received_ms > r.ts_ms), "received_at is the commit time");
}

async fn a_version_4_database_gains_status_history_and_command_origins(url: String) {
    let dialect = super::Dialect::from_url(&url).expect("a test url");
    let create = if dialect == super::Dialect::Sqlite { format!("{url}?mode=rwc") } else { url.clone() };
    super::schema::migrate_upto(&create, dialect, 4).await.expect("schema version 4");
    let mut conn = AnyConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "INSERT INTO commands (command_id, device, relay, requested, status, requested_at, expires_at, \
         confirmed_at, state, error) VALUES ('old', 'pi', 'pump', 'on', 'confirmed', '2025-11-21T10:00:00.000Z', \
         '2025-11-21T10:00:30.000Z', '2025-11-21T10:00:01.000Z', 'on', NULL)",
    )
    .execute(&mut conn)
    .await
    .expect("a version-4 command");
    let _ = conn.close().await; // test connection; nothing to flush
    let store = Store::connect(&url).await.expect("connect and migrate");
    let old = cmd(&store, "old").await;
    assert_eq!((old.status, old.requested_by, old.answered_at), (CommandStatus::Confirmed, None, None));
    store.insert_command(&command("new", "pi", "pump", 30)).await.expect("insert");
    let ids: Vec<String> =
        store.device_commands("pi", 10).await.expect("commands").into_iter().map(|c| c.command_id).collect();
    assert_eq!(ids, ["new", "old"], "both, newest requested first (both at t0: by id)");
    write(&store, &[status("pi", false, 1)]).await;
    let (_, changes) = store.status_events("pi", at(0), at(10)).await.expect("status events");
    assert_eq!(changes.len(), 1);
    store.close().await;
    let mut conn = AnyConnection::connect(&url).await.expect("connect");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM fieldlink_schema WHERE version = 5")
        .fetch_one(&mut conn)
        .await
        .expect("versions");
    assert_eq!(n, 1);
    let _ = conn.close().await; // as above
}

async fn a_batch_larger_than_one_statement_has_the_effects_of_one_message_at_a_time(store: Store, _: String) {
    store.insert_command(&command("c1", "pi-1", "pump", 30)).await.expect("insert");
    // 2,400 messages of three devices (more rows than one INSERT takes),
    // the newest heartbeat, relay state and reading of each somewhere in
    // the middle, older ones after them.
    let mut batch = Vec::new();
    for seq in 1..=800_u64 {
        for d in ["pi-1", "pi-2", "pi-3"] {
            batch.push(match seq % 8 {
                0 => heartbeat(d, seq, seq as f64),
                1 => relay(d, seq, "pump", if seq == 401 { "on" } else { "off" }, None),
                2 => sensor(d, seq, "tank", seq as f64),
                _ => button(d, seq, "pressed"),
            });
        }
    }
    batch.push(relay("pi-1", 801, "pump", "on", Some("c1")));
    batch.swap(400 * 3, 2400);
    let stored = write(&store, &batch).await;
    assert!(stored.iter().all(|s| *s), "all new");
    for d in ["pi-1", "pi-2", "pi-3"] {
        let view = device(&store, d).await;
        assert_eq!(view.heartbeat.expect("a heartbeat")["seq"], 800, "{d}");
        assert_eq!(view.sensors["tank"].value, 794.0, "{d}");
        assert!(view.last_seen.is_some());
        assert_eq!(seqs(&store, d, None, 1000, None).await.len(), if d == "pi-1" { 801 } else { 800 });
    }
    assert_eq!(device(&store, "pi-1").await.relays["pump"], "on", "seq 801 confirms c1 and is the newest");
    assert_eq!(device(&store, "pi-2").await.relays["pump"], "off", "seq 793, not 401");
    assert_eq!(cmd(&store, "c1").await.status, CommandStatus::Confirmed);
    // The same again with one new message: the rest are duplicates.
    batch.push(button("pi-2", 900, "released"));
    let stored = write(&store, &batch).await;
    assert_eq!(stored.iter().filter(|s| **s).count(), 1);
    assert!(stored[stored.len() - 1]);
}

async fn the_device_list_as_json_is_the_device_views(store: Store, _: String) {
    let same = |json: String, views: Vec<crate::hub::model::DeviceView>| {
        let got: Value = serde_json::from_str(&json).expect("JSON");
        assert_eq!(got, serde_json::to_value(views).expect("views"));
    };
    same(store.devices_json().await.expect("json"), store.devices().await.expect("views"));
    write(
        &store,
        &[
            heartbeat("pi", 1, 48.5),
            relay("pi", 2, "pump", "on", None),
            relay("pi", 3, "fan", "off", None),
            sensor("pi", 4, "tank", 21.5),
            sensor("pi", 5, "air", -4.0),
            button("pk", 1, "pressed"),
            status("pj", true, 1),
        ],
    )
    .await;
    let aside = crate::hub::ingest::set_aside("fieldlink", "fieldlink/pi/error", b"x", "not JSON", &ts(1));
    store.insert_set_aside(&aside).await.expect("recorded");
    same(store.devices_json().await.expect("json"), store.devices().await.expect("views"));
}

/// One test per case per backend.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $case() { super::backends::run(super::backends::Backend::Sqlite, super::$case).await } )*
        }
        mod mariadb {
            $( #[tokio::test] async fn $case() { super::backends::run(super::backends::Backend::MariaDb, super::$case).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $case() { super::backends::run(super::backends::Backend::Postgres, super::$case).await } )*
        }
    };
}

suite!(
    a_message_seen_twice_is_stored_once,
    the_same_device_and_seq_twice_in_one_batch_is_stored_once,
    the_newest_heartbeat_wins_by_seq_even_when_an_older_one_arrives_later,
    the_newest_relay_state_wins_by_seq_even_when_an_older_one_arrives_later,
    a_relay_state_carrying_a_command_id_confirms_that_command,
    an_error_carrying_a_command_id_rejects_that_command,
    unanswered_commands_past_their_expiry_are_expired_once,
    a_command_reads_back_as_recorded_with_its_times_in_utc,
    a_status_set_by_hand_sticks_and_an_unknown_id_is_an_error,
    events_come_newest_first_and_page_with_before_seq_and_kind,
    stored_messages_read_back_as_they_were_written,
    status_updates_keep_online_state_and_any_first_word_creates_the_device,
    old_heartbeats_are_pruned_and_nothing_else,
    a_batch_with_an_update_the_schema_cannot_hold_writes_nothing,
    hubs_starting_at_once_share_one_schema,
    two_hubs_writing_the_same_messages_at_once_store_each_once,
    a_device_whose_epoch_changed_has_its_new_messages_stored_and_its_newest_state_is_the_new_one,
    set_aside_messages_read_back_newest_first_and_are_counted_per_device,
    the_newest_sensor_reading_wins_by_seq_and_every_reading_is_an_event,
    status_changes_are_kept_as_history_and_repeats_are_not,
    a_devices_commands_list_newest_first_with_who_asked_and_when_each_was_answered,
    a_range_read_returns_the_devices_messages_by_time_with_their_commit_time,
    a_batch_larger_than_one_statement_has_the_effects_of_one_message_at_a_time,
    the_device_list_as_json_is_the_device_views,
);

mod migrations {
    use super::backends::{Backend, run_unmigrated};

    #[tokio::test]
    async fn sqlite_a_version_1_database_is_migrated_with_its_rows_in_epoch_0() {
        run_unmigrated(Backend::Sqlite, super::a_version_1_database_is_migrated_with_its_rows_in_epoch_0).await
    }

    #[tokio::test]
    async fn mariadb_a_version_1_database_is_migrated_with_its_rows_in_epoch_0() {
        run_unmigrated(Backend::MariaDb, super::a_version_1_database_is_migrated_with_its_rows_in_epoch_0).await
    }

    #[tokio::test]
    async fn postgres_a_version_1_database_is_migrated_with_its_rows_in_epoch_0() {
        run_unmigrated(Backend::Postgres, super::a_version_1_database_is_migrated_with_its_rows_in_epoch_0).await
    }

    #[tokio::test]
    async fn sqlite_a_version_3_database_gains_the_sensors_table() {
        run_unmigrated(Backend::Sqlite, super::a_version_3_database_gains_the_sensors_table).await
    }

    #[tokio::test]
    async fn mariadb_a_version_3_database_gains_the_sensors_table() {
        run_unmigrated(Backend::MariaDb, super::a_version_3_database_gains_the_sensors_table).await
    }

    #[tokio::test]
    async fn postgres_a_version_3_database_gains_the_sensors_table() {
        run_unmigrated(Backend::Postgres, super::a_version_3_database_gains_the_sensors_table).await
    }

    #[tokio::test]
    async fn sqlite_a_version_4_database_gains_status_history_and_command_origins() {
        run_unmigrated(Backend::Sqlite, super::a_version_4_database_gains_status_history_and_command_origins).await
    }

    #[tokio::test]
    async fn mariadb_a_version_4_database_gains_status_history_and_command_origins() {
        run_unmigrated(Backend::MariaDb, super::a_version_4_database_gains_status_history_and_command_origins).await
    }

    #[tokio::test]
    async fn postgres_a_version_4_database_gains_status_history_and_command_origins() {
        run_unmigrated(Backend::Postgres, super::a_version_4_database_gains_status_history_and_command_origins).await
    }

    /// MySQL commits each DDL statement: a migration cut short runs again
    /// from its start, and must then change nothing twice.
    #[tokio::test]
    async fn mariadb_a_version_2_migration_that_ran_before_its_row_was_written_runs_again_harmlessly() {
        run_unmigrated(Backend::MariaDb, |url| async move {
            let store = crate::hub::store::Store::connect(&url).await.expect("migrate");
            let new = [super::in_epoch(super::NEW_EPOCH, super::button("pi", 1, "pressed"))];
            assert_eq!(super::write(&store, &new).await, [true]);
            store.close().await;
            let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await.expect("connect");
            sqlx::query("DELETE FROM fieldlink_schema WHERE version = 2").execute(&mut conn).await.expect("forget v2");
            let _ = sqlx::Connection::close(conn).await; // test connection; nothing to flush
            let store = crate::hub::store::Store::connect(&url).await.expect("migrate again");
            assert_eq!(super::identities(&store, "pi", None).await, [(super::NEW_EPOCH, 1)]);
            store.close().await;
        })
        .await
    }
}

// ------------------------------------------------------- SQLite specifics

#[tokio::test]
async fn connecting_creates_the_sqlite_file_and_its_directory_in_wal_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state/sub/hub.db");
    let url = format!("sqlite://{}", path.display());
    let store = Store::connect(&url).await.expect("connect");
    assert!(path.is_file());
    store.close().await;
    let mut conn = AnyConnection::connect(&url).await.expect("connect");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut conn).await.expect("pragma");
    assert_eq!(mode, "wal");
    let _ = conn.close().await; // test connection; nothing to flush
}

#[tokio::test]
async fn what_was_stored_is_there_after_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/hub.db", dir.path().display());
    let store = Store::connect(&url).await.expect("connect");
    write(&store, &[button("pi", 1, "pressed"), status("pi", true, 1)]).await;
    store.close().await;
    let store = Store::connect(&url).await.expect("reconnect");
    assert_eq!(write(&store, &[button("pi", 1, "pressed")]).await, [false]);
    assert!(device(&store, "pi").await.online);
    store.close().await;
}

#[tokio::test]
async fn a_server_that_refuses_is_reported_without_the_password() {
    let e = Store::connect("mysql://hub:hunter2@127.0.0.1:1/fieldlink").await.expect_err("nothing listens on port 1");
    let text = e.to_string();
    assert!(matches!(e, StoreError::Connect { .. }), "{text}");
    assert!(text.contains("mysql://hub:***@127.0.0.1:1/fieldlink"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn an_unknown_database_scheme_is_refused() {
    let e = Store::connect("mongodb://h/db").await.expect_err("not supported");
    assert!(matches!(e, StoreError::BadUrl { .. }), "{e}");
    assert!(!e.is_transient());
}
