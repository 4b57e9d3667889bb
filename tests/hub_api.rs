//! The hub's HTTP API, black-box (DESIGN: HTTP API; issue 3): the real
//! `fieldlink hub` and a real `fieldlink agent` (simulated GPIO) on one test
//! mosquitto. The hub connects to the broker directly; the agent through the
//! harness proxy, so a test can take the agent offline without touching the
//! hub.
//!
//! * Every endpoint needs the token: 401 without it and with a wrong one;
//!   the dashboard redirects to `/login`.
//! * Devices and events: the agent online with its relays; button events
//!   newest first, `limit` and `before_seq`; a bad `kind` is a 400 JSON error.
//! * Commands: confirmed (200), pending while the agent is offline (202,
//!   confirmed once it is back), rejected because expired (409; the agent
//!   refuses it when it comes back and the hub stores its `expired` error).
//! * `GET /api/stream` delivers a newly stored button message.
//! * CSRF (issue 7): a POST with a valid session cookie but another origin
//!   (or a `text/plain` body) is refused, the broker carries no command and
//!   the agent's relay pin stays put; the same cookie from the hub's own
//!   origin switches it.
//!
//! Command posts ask for the longest `?wait=` (60s) wherever the answer
//! must be final, so a slow machine cannot turn a confirmation into a
//! "pending"; only the pending test uses a short wait, against an agent
//! that cannot answer.

mod common;

use common::hub::{Auth, Hub, HubBuilder, event_seqs};
use common::{DEADLINE, PUMP_PIN, Rig, Watcher, require_mosquitto, serial, wait_until};
use serde_json::{Value, json};

/// A hub and an agent on one mosquitto. Fields drop in order: the hub
/// first, then the agent, watcher, proxy and broker.
struct ApiRig {
    hub: Hub,
    rig: Rig,
}

impl ApiRig {
    /// Broker, hub (configured by `hub`), then the agent, started and seen
    /// ready by the hub; `None` when mosquitto is not installed.
    fn new(name: &str, hub: impl FnOnce(HubBuilder) -> HubBuilder) -> Option<ApiRig> {
        let mut rig = Rig::new(name, false, |b| b)?;
        // The hub subscribes before the agent publishes anything.
        let hub = hub(Hub::builder(&rig.broker)).start();
        rig.start_online();
        let api = ApiRig { hub, rig };
        api.wait_agent_ready();
        Some(api)
    }

    fn device(&self) -> &str {
        self.rig.device()
    }

    /// Waits until the API shows the agent online with its relay, and a
    /// relay state with cause `reconnect` is stored: the agent records it
    /// after subscribing to its commands, so commands reach it from then on.
    fn wait_agent_ready(&self) {
        let device = self.device();
        self.hub.wait_device(device, |d| d["online"] == true, "online");
        self.hub.wait_events(
            device,
            Some("relay"),
            |e| e.iter().any(|v| v["payload"]["cause"] == "reconnect"),
            "the agent's relay state with cause 'reconnect'",
        );
    }

    fn relay_path(&self, query: &str) -> String {
        format!("/api/devices/{}/relays/pump{query}", self.device())
    }

    fn command(&self, id: &str) -> Value {
        let (status, body) = self.hub.get(&format!("/api/commands/{id}"));
        assert_eq!(status, 200, "GET /api/commands/{id}: {body}");
        body
    }

    /// Polls `GET /api/commands/{id}` until its status is `status`.
    fn wait_command_status(&self, id: &str, status: &str) -> Value {
        let found = wait_until(DEADLINE * 2, &format!("command {id} to become {status}"), || {
            let row = self.command(id);
            (row["status"] == status).then_some(row)
        });
        assert_eq!(found["command_id"], id, "{found}");
        found
    }
}

/// The command id of a command answer.
fn command_id(body: &Value) -> String {
    body["command_id"].as_str().unwrap_or_else(|| panic!("no command_id in {body}")).to_string()
}

#[test]
fn every_endpoint_answers_401_without_the_token_or_with_a_wrong_one_and_the_dashboard_redirects_to_login() {
    let _serial = serial();
    let Some(broker) = require_mosquitto(false) else { return };
    let hub = Hub::builder(&broker).start();
    // Sees every command the hub publishes.
    let watcher = Watcher::connect(broker.port(), "api-auth-watcher", "fieldlink/+/relay/+/set");
    let endpoints: [(&str, &str, Option<Value>); 5] = [
        ("GET", "/api/devices", None),
        ("GET", "/api/devices/pi-1/events", None),
        ("POST", "/api/devices/pi-1/relays/pump", Some(json!({"state": "on"}))),
        ("GET", "/api/commands/0123456789abcdef01234567", None),
        ("GET", "/api/stream", None),
    ];
    for (method, path, body) in &endpoints {
        for auth in [Auth::Missing, Auth::Wrong] {
            let reply = hub.request(method, path, auth, body.as_ref());
            assert_eq!(reply.status, 401, "{method} {path} with {auth:?}: {:?}", reply.body);
            assert!(
                reply.body["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{method} {path} with {auth:?}: a JSON error, got {}",
                reply.body
            );
        }
    }
    for auth in [Auth::Missing, Auth::Wrong] {
        let reply = hub.request("GET", "/", auth, None);
        assert!((300..400).contains(&reply.status), "GET / with {auth:?}: expected a redirect, got {}", reply.status);
        let location = reply.location.unwrap_or_default();
        assert!(location.ends_with("/login"), "GET / with {auth:?} redirects to {location:?}");
    }

    // The refused POSTs published nothing: the first command the broker
    // carries is the one sent with the token.
    let (status, body) = hub.post("/api/devices/pi-1/relays/pump?wait=0s", &json!({"state": "on"}));
    assert_eq!(status, 202, "a command nobody answers is pending: {body}");
    let id = command_id(&body);
    let msgs = watcher.wait_for(|m| !m.is_empty(), DEADLINE, "the authorized command on the broker");
    let first = msgs[0].json().unwrap_or_else(|| panic!("a JSON command: {}", msgs[0]));
    assert_eq!(msgs[0].topic, "fieldlink/pi-1/relay/pump/set");
    assert_eq!(first["id"], id.as_str(), "the first command published is the authorized one: {first}");
}

#[test]
fn devices_show_the_agent_online_with_its_relays_and_button_events_page_newest_first() {
    let Some(api) = ApiRig::new("api-events", |b| b) else { return };
    let device = api.device().to_string();
    let d = api.hub.device(&device).expect("the agent is listed");
    assert_eq!(d["online"], true, "{d}");
    assert_eq!(d["relays"], json!({"pump": "off"}), "{d}");
    assert!(d["last_seen"].is_string(), "{d}");

    api.rig.agent.click(3);
    let all = api.hub.wait_events(&device, Some("button"), |e| e.len() >= 6, "six button events");
    assert_eq!(all.len(), 6, "three presses and releases: {all:#?}");
    let seqs = event_seqs(&all);
    assert!(seqs.windows(2).all(|p| p[0] > p[1]), "newest first: {seqs:?}");
    let states: Vec<&str> = all.iter().map(|e| e["payload"]["state"].as_str().unwrap_or("?")).collect();
    assert_eq!(states, ["released", "pressed", "released", "pressed", "released", "pressed"]);
    for e in &all {
        assert_eq!(e["kind"], "button", "{e}");
        assert_eq!(e["name"], "door", "{e}");
        assert_eq!(e["payload"]["device"], device.as_str(), "{e}");
        assert_eq!(e["payload"]["seq"], e["seq"], "{e}");
        assert_eq!(e["payload"]["ts"], e["ts"], "{e}");
    }

    let newest_two = api.hub.events(&device, "kind=button&limit=2");
    assert_eq!(event_seqs(&newest_two), seqs[..2]);
    let next_two = api.hub.events(&device, &format!("kind=button&limit=2&before_seq={}", seqs[1]));
    assert_eq!(event_seqs(&next_two), seqs[2..4]);
    let oldest = api.hub.events(&device, &format!("kind=button&before_seq={}", seqs[3]));
    assert_eq!(event_seqs(&oldest), seqs[4..]);

    let every_kind = api.hub.events(&device, "limit=1000");
    let kinds: std::collections::BTreeSet<&str> = every_kind.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains("button") && kinds.contains("relay"), "no kind: every kind, got {kinds:?}");

    for (query, quoted) in [("kind=weather", "'weather'"), ("limit=0", "'0'"), ("before_seq=soon", "'soon'")] {
        let (status, body) = api.hub.get(&format!("/api/devices/{device}/events?{query}"));
        assert_eq!(status, 400, "?{query}: {body}");
        let error = body["error"].as_str().unwrap_or_else(|| panic!("?{query}: no JSON error in {body}"));
        assert!(error.contains(quoted), "?{query}: the error quotes the bad value: {error}");
    }
}

#[test]
fn a_relay_command_confirmed_by_the_agent_answers_200_and_is_recorded_as_confirmed() {
    let Some(api) = ApiRig::new("api-confirmed", |b| b) else { return };
    let (status, body) = api.hub.post(&api.relay_path("?wait=60s"), &json!({"state": "on"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "confirmed", "{body}");
    assert_eq!(body["state"], "on", "{body}");
    let id = command_id(&body);
    assert_eq!(api.rig.agent.sim(&["get", PUMP_PIN]), "1", "the pump's pin is driven high");

    let row = api.command(&id);
    assert_eq!(row["status"], "confirmed", "{row}");
    assert_eq!(row["device"], api.device(), "{row}");
    assert_eq!(row["relay"], "pump", "{row}");
    assert_eq!(row["requested"], "on", "{row}");
    assert!(row["requested_at"].is_string(), "{row}");
    assert!(row["confirmed_at"].is_string(), "{row}");

    api.hub.wait_device(api.device(), |d| d["relays"]["pump"] == "on", "relay pump on");
    let states = api.hub.events(api.device(), "kind=relay&limit=10");
    assert!(states.iter().any(|e| e["payload"]["command_id"] == id.as_str()), "{states:#?}");
}

#[test]
fn a_command_for_an_offline_agent_is_pending_and_confirmed_once_the_agent_is_back() {
    let Some(api) = ApiRig::new("api-pending", |b| b.command_ttl("5m")) else { return };
    let device = api.device().to_string();
    api.rig.cut();
    api.hub.wait_device(&device, |d| d["online"] == false, "offline (its last will)");

    let (status, body) = api.hub.post(&api.relay_path("?wait=1s"), &json!({"state": "on"}));
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "pending", "{body}");
    let id = command_id(&body);
    assert_eq!(api.command(&id)["status"], "requested");
    assert_eq!(api.rig.agent.sim(&["get", PUMP_PIN]), "0", "nothing reaches an offline agent");

    api.rig.proxy.heal();
    let row = api.wait_command_status(&id, "confirmed");
    assert!(row["confirmed_at"].is_string(), "{row}");
    assert_eq!(api.rig.agent.sim(&["get", PUMP_PIN]), "1", "the pump's pin is driven high");
    api.hub.wait_device(&device, |d| d["online"] == true && d["relays"]["pump"] == "on", "online with pump on");
}

#[test]
fn an_expired_command_is_rejected_and_the_agent_refuses_it_when_it_comes_back() {
    let Some(api) = ApiRig::new("api-expired", |b| b.command_ttl("1s")) else { return };
    let device = api.device().to_string();
    api.rig.cut();

    let (status, body) = api.hub.post(&api.relay_path("?wait=60s"), &json!({"state": "on"}));
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["status"], "rejected", "{body}");
    let error = body["error"].as_str().unwrap_or_else(|| panic!("no error in {body}"));
    assert!(error.contains("expired"), "the rejection says the command expired: {error}");
    let id = command_id(&body);
    assert_eq!(api.command(&id)["status"], "expired");

    // Back online, the agent gets the queued command, finds it expired,
    // refuses it, and says so.
    api.rig.proxy.heal();
    let errors = api.hub.wait_events(
        &device,
        Some("error"),
        |e| e.iter().any(|v| v["payload"]["command_id"] == id.as_str()),
        "the agent's error for the expired command",
    );
    let refusal = errors.iter().find(|v| v["payload"]["command_id"] == id.as_str()).expect("found above");
    assert_eq!(refusal["payload"]["code"], "expired", "{refusal}");
    assert_eq!(api.rig.agent.sim(&["get", PUMP_PIN]), "0", "the expired command did not switch the pump");
    let row = api.command(&id);
    assert_ne!(row["status"], "confirmed", "{row}");
    assert!(row["confirmed_at"].is_null(), "{row}");
    let states = api.hub.all_events(&device, Some("relay"));
    assert!(
        states.iter().all(|e| e["payload"]["command_id"] != id.as_str() && e["payload"]["state"] == "off"),
        "no relay state answers the expired command: {states:#?}"
    );
}

#[test]
fn the_live_stream_delivers_a_newly_stored_button_message() {
    let Some(api) = ApiRig::new("api-stream", |b| b) else { return };
    let device = api.device().to_string();
    let mut stream = api.hub.stream();
    api.rig.agent.press();
    let event = stream.wait_for(
        |v| v["type"] == "message" && v["device"] == device.as_str() && v["kind"] == "button",
        "a button message of the agent",
    );
    assert_eq!(event["name"], "door", "{event}");
    assert_eq!(event["payload"]["state"], "pressed", "{event}");
    let stored = api.hub.events(&device, "kind=button&limit=1");
    assert_eq!(stored[0]["seq"], event["seq"], "the streamed message is the stored one: {event}");
}

/// Signs in with the hub's token through `POST /login` (the login form);
/// the `name=value` of the session cookie it sets.
fn sign_in(hub: &Hub) -> String {
    let http: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).max_redirects(0).build().into();
    let url = hub.url("/login");
    let reply = http.post(&url).send_form([("token", hub.token())]).unwrap_or_else(|e| panic!("POST {url}: {e}"));
    assert_eq!(reply.status().as_u16(), 303, "signing in with the token redirects to the dashboard");
    let cookie = reply.headers().get("set-cookie").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let pair = cookie.split(';').next().unwrap_or_default().trim().to_string();
    assert!(pair.starts_with("fieldlink_session=") && pair.len() > "fieldlink_session=".len(), "{cookie:?}");
    pair
}

/// `POST path` as a browser on `origin` would send it: the session cookie,
/// `origin` and `Sec-Fetch-Site: site` (each when given), `content_type`
/// and a `{"state":"on"}` body; (status, body).
fn browser_post(
    hub: &Hub,
    path: &str,
    cookie: &str,
    origin: Option<&str>,
    site: Option<&str>,
    content_type: &str,
) -> (u16, Value) {
    let http: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).max_redirects(0).build().into();
    let url = hub.url(path);
    let mut req = http.post(&url).header("Cookie", cookie).header("Content-Type", content_type);
    if let Some(o) = origin {
        req = req.header("Origin", o);
    }
    if let Some(s) = site {
        req = req.header("Sec-Fetch-Site", s);
    }
    let mut reply = req.send(r#"{"state":"on"}"#).unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let text = reply.body_mut().read_to_string().unwrap_or_else(|e| panic!("POST {url}: body: {e}"));
    (reply.status().as_u16(), serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[test]
fn a_cross_origin_post_with_the_session_cookie_is_refused_and_the_agents_relay_does_not_switch() {
    let Some(api) = ApiRig::new("api-csrf", |b| b) else { return };
    let device = api.device().to_string();
    // Sees every command the hub publishes to the agent.
    let watcher = Watcher::connect(api.rig.broker.port(), "api-csrf-watcher", &common::topic(&device, "relay/+/set"));
    let cookie = sign_in(&api.hub);
    let ours = api.hub.url("");
    let other = format!("http://127.0.0.1:{}", common::free_port());
    let path = api.relay_path("?wait=60s");

    // What a page on another port of this host can make a browser send: the
    // cookie goes along (same site), the origin headers say where from.
    for (origin, site, content_type) in [
        (Some(other.as_str()), Some("same-site"), "application/json"),
        (Some(other.as_str()), None, "application/json"),
        (None, Some("cross-site"), "text/plain"),
        (Some("null"), None, "text/plain"),
    ] {
        let (status, body) = browser_post(&api.hub, &path, &cookie, origin, site, content_type);
        assert_eq!(status, 403, "{origin:?} {site:?} {content_type}: {body}");
        assert!(body.get("command_id").is_none(), "no command was created: {body}");
    }
    // Neither origin header (not a browser) but not JSON either: refused too.
    let (status, body) = browser_post(&api.hub, &path, &cookie, None, None, "text/plain");
    assert_eq!(status, 415, "{body}");

    // The same cookie from the dashboard's own origin switches the relay:
    // the refusals above were about the origin, not the session.
    let (status, body) = browser_post(&api.hub, &path, &cookie, Some(&ours), Some("same-origin"), "application/json");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "confirmed", "{body}");
    let id = command_id(&body);
    assert_eq!(api.rig.agent.sim(&["get", PUMP_PIN]), "1", "the dashboard's own command switched the pump");

    // The broker carried exactly one command, the dashboard's, and the
    // agent confirmed no other.
    let msgs = watcher.wait_for(|m| !m.is_empty(), DEADLINE, "the dashboard's command on the broker");
    let ids: Vec<String> =
        msgs.iter().filter_map(|m| m.json()).filter_map(|c| c["id"].as_str().map(str::to_string)).collect();
    assert_eq!(ids, [id.as_str()], "the only command published is the same-origin one");
    let states = api.hub.all_events(&device, Some("relay"));
    let answered: Vec<&Value> = states.iter().filter(|e| e["payload"]["command_id"].is_string()).collect();
    assert_eq!(answered.len(), 1, "one relay state answers a command: {states:#?}");
    assert_eq!(answered[0]["payload"]["command_id"], id.as_str());
    assert!(api.hub.log().contains("web: refused POST"), "each refusal is logged:\n{}", api.hub.log());
}
