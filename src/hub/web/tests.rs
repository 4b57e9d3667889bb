//! The router driven in-process (`tower::ServiceExt::oneshot`) against a
//! real [`Store`] on SQLite in a temporary directory, and a real
//! [`Commander`] whose MQTT event loop is never polled: its publishes queue
//! up and nobody answers (the "agent offline" case). The confirmed and
//! rejected paths need an agent and live in the end-to-end tests; here the
//! mapping of those outcomes is unit-tested in `api`.

use std::time::Duration;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use rumqttc::{AsyncClient, EventLoop, MqttOptions};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::broadcast;
use tower::ServiceExt;

use super::{AppState, Limits, router, serve};
use crate::hub::commands::Commander;
use crate::hub::model::{Kind, LiveEvent, Message, Update};
use crate::hub::store::Store;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

struct Hub {
    app: Router,
    state: AppState,
    _dir: TempDir,
    /// Kept so publishes succeed (and wait in its queue); never polled.
    _eventloop: Option<EventLoop>,
}

impl Hub {
    async fn new() -> Hub {
        Hub::with_live_capacity(64).await
    }

    async fn with_live_capacity(capacity: usize) -> Hub {
        Hub::with(capacity, Limits::default()).await
    }

    async fn with(capacity: usize, limits: Limits) -> Hub {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("hub.db").display()))
            .await
            .expect("a SQLite store in a temporary directory");
        let (live, _) = broadcast::channel(capacity);
        let (client, eventloop) = AsyncClient::new(MqttOptions::new("web-test", "127.0.0.1", 1), 64);
        let commander = Commander::new(store.clone(), client, "fieldlink", Duration::from_secs(30), live.clone());
        let state = AppState::new(store, commander, live, TOKEN, Duration::from_millis(100), limits);
        Hub { app: router(state.clone()), state, _dir: dir, _eventloop: Some(eventloop) }
    }

    async fn call(&self, req: Request<Body>) -> Response {
        self.app.clone().oneshot(req).await.expect("the router never fails")
    }

    /// Signs in with the token; the `name=value` of the session cookie.
    async fn sign_in(&self) -> String {
        let resp = self.call(login_form(TOKEN)).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "signed in");
        set_cookie(&resp).split(';').next().expect("name=value").to_string()
    }

    async fn seed(&self, updates: &[Update]) {
        self.state.store.write_batch(updates).await.expect("seeding the store");
    }
}

fn request(method: Method, uri: &str) -> axum::http::request::Builder {
    Request::builder().method(method).uri(uri)
}

fn bearer(method: Method, uri: &str) -> axum::http::request::Builder {
    request(method, uri).header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
}

fn get(uri: &str) -> Request<Body> {
    bearer(Method::GET, uri).body(Body::empty()).expect("a valid request")
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    bearer(Method::POST, uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("a valid request")
}

async fn body_text(resp: Response) -> String {
    let bytes = to_bytes(resp.into_body(), usize::MAX).await.expect("a body");
    String::from_utf8(bytes.to_vec()).expect("UTF-8")
}

async fn json_of(resp: Response) -> Value {
    let text = body_text(resp).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn location(resp: &Response) -> &str {
    resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).expect("a Location header")
}

fn set_cookie(resp: &Response) -> &str {
    resp.headers().get(header::SET_COOKIE).and_then(|v| v.to_str().ok()).expect("a Set-Cookie header")
}

fn message(device: &str, seq: u64, kind: Kind, name: Option<&str>, payload: Value) -> Update {
    Update::Message(Message {
        device: device.into(),
        epoch: 0,
        seq,
        ts: format!("2026-11-21T10:00:{:02}.000Z", seq % 60),
        kind,
        name: name.map(str::to_string),
        payload,
    })
}

fn button(device: &str, seq: u64) -> Update {
    let state = if seq.is_multiple_of(2) { "pressed" } else { "released" };
    message(
        device,
        seq,
        Kind::Button,
        Some("door"),
        json!({"device": device, "seq": seq, "button": "door", "state": state}),
    )
}

fn heartbeat(device: &str, seq: u64) -> Update {
    message(
        device,
        seq,
        Kind::Heartbeat,
        None,
        json!({"device": device, "seq": seq, "uptime_s": seq, "cpu_percent": 12.5, "temp_c": 48.0,
               "mem_used_bytes": 100, "mem_total_bytes": 1000, "outbox": {"depth": 3, "bytes": 300, "dropped": 0}}),
    )
}

fn relay(device: &str, seq: u64, state: &str) -> Update {
    message(
        device,
        seq,
        Kind::Relay,
        Some("pump"),
        json!({"device": device, "seq": seq, "relay": "pump", "state": state, "cause": "startup", "command_id": null}),
    )
}

fn seqs(events: &Value) -> Vec<u64> {
    events.as_array().expect("a list").iter().map(|e| e["seq"].as_u64().expect("a seq")).collect()
}

/// One request per API route, with a valid body where it needs one.
fn api_requests() -> Vec<(Method, &'static str, &'static str)> {
    vec![
        (Method::GET, "/api/devices", ""),
        (Method::GET, "/api/devices/pi-1/events", ""),
        (Method::GET, "/api/devices/pi-1/events?kind=heartbeat&limit=5", ""),
        (Method::POST, "/api/devices/pi-1/relays/pump", r#"{"state":"on"}"#),
        (Method::GET, "/api/commands/abc", ""),
        (Method::GET, "/api/stream", ""),
        (Method::GET, "/api/no-such-route", ""),
        (Method::DELETE, "/api/devices", ""),
    ]
}

#[tokio::test]
async fn every_api_endpoint_is_401_without_the_token_or_with_a_wrong_one() {
    let hub = Hub::new().await;
    for (method, uri, body) in api_requests() {
        let variants = [
            ("no token", None, None),
            ("wrong bearer", Some(format!("Bearer {TOKEN}x")), None),
            ("wrong cookie", None, Some("fieldlink_session=nope".to_string())),
            ("the token as a cookie", None, Some(format!("fieldlink_session={TOKEN}; fieldlink_token={TOKEN}"))),
            ("token in the query", None, None),
        ];
        for (what, auth, cookie) in variants {
            let uri = if what == "token in the query" { format!("{uri}?token={TOKEN}") } else { uri.to_string() };
            let mut req = request(method.clone(), &uri);
            if let Some(auth) = auth {
                req = req.header(header::AUTHORIZATION, auth);
            }
            if let Some(cookie) = cookie {
                req = req.header(header::COOKIE, cookie);
            }
            let resp = hub.call(req.body(Body::from(body)).expect("a valid request")).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}: {method} {uri}");
            assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
            assert_eq!(json_of(resp).await, json!({"error": "missing or wrong token"}), "{what}: {method} {uri}");
        }
    }
}

#[tokio::test]
async fn every_page_redirects_to_the_login_without_the_token() {
    let hub = Hub::new().await;
    for uri in ["/", "/assets/app.js", "/assets/style.css", "/no-such-page"] {
        for cookie in [None, Some("fieldlink_token=wrong")] {
            let mut req = request(Method::GET, uri);
            if let Some(cookie) = cookie {
                req = req.header(header::COOKIE, cookie);
            }
            let resp = hub.call(req.body(Body::empty()).expect("a valid request")).await;
            assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{uri} {cookie:?}");
            assert_eq!(location(&resp), "/login", "{uri}");
        }
    }
}

#[tokio::test]
async fn the_api_and_the_pages_answer_to_a_bearer_token_and_to_the_session_cookie() {
    let hub = Hub::new().await;
    let session = hub.sign_in().await;
    for uri in ["/api/devices", "/api/devices/pi-1/events", "/", "/assets/app.js", "/assets/style.css"] {
        let resp = hub.call(get(uri)).await;
        assert_eq!(resp.status(), StatusCode::OK, "bearer: {uri}");
        let with_cookie = request(Method::GET, uri)
            .header(header::COOKIE, format!("theme=dark; {session}"))
            .body(Body::empty())
            .expect("a valid request");
        let resp = hub.call(with_cookie).await;
        assert_eq!(resp.status(), StatusCode::OK, "cookie: {uri}");
    }
    let page = hub.call(get("/")).await;
    assert!(page.headers()[header::CONTENT_TYPE].to_str().expect("ASCII").starts_with("text/html"));
    assert!(page.headers().contains_key(header::CONTENT_SECURITY_POLICY));
    let html = body_text(page).await;
    assert!(html.contains(r#"src="/assets/app.js""#) && html.contains(r#"id="logout""#), "{html}");
    let js = hub.call(get("/assets/app.js")).await;
    assert!(js.headers()[header::CONTENT_TYPE].to_str().expect("ASCII").starts_with("text/javascript"));
    let api = hub.call(get("/api/devices")).await;
    assert_eq!(api.headers()[header::CACHE_CONTROL], "no-store");
    assert_eq!(json_of(api).await, json!([]));
}

#[tokio::test]
async fn devices_show_their_online_state_latest_heartbeat_and_relays() {
    let hub = Hub::new().await;
    hub.seed(&[
        Update::Status { device: "pi-1".into(), online: true, at: "2026-11-21T10:00:00.000Z".into() },
        heartbeat("pi-1", 1),
        relay("pi-1", 2, "off"),
        heartbeat("pi-1", 3),
        relay("pi-1", 4, "on"),
    ])
    .await;
    let devices = json_of(hub.call(get("/api/devices")).await).await;
    let [d] = devices.as_array().expect("a list").as_slice() else { panic!("one device: {devices}") };
    assert_eq!(d["device"], "pi-1");
    assert_eq!(d["online"], true);
    assert!(d["last_seen"].is_string(), "{d}");
    assert_eq!(d["heartbeat"]["seq"], 3);
    assert_eq!(d["heartbeat"]["outbox"]["depth"], 3);
    assert_eq!(d["relays"], json!({"pump": "on"}));
}

#[tokio::test]
async fn events_come_newest_first_in_pages_and_filtered_by_kind() {
    let hub = Hub::new().await;
    let mut updates: Vec<Update> = (1..=10).map(|s| button("pi-1", s)).collect();
    updates.extend((11..=15).map(|s| heartbeat("pi-1", s)));
    updates.push(button("pi-2", 1));
    hub.seed(&updates).await;

    let all = json_of(hub.call(get("/api/devices/pi-1/events")).await).await;
    assert_eq!(seqs(&all), (1..=15).rev().collect::<Vec<_>>());
    let newest = &all[0];
    assert_eq!(newest["kind"], "heartbeat");
    assert_eq!(newest["name"], Value::Null);
    assert!(newest["ts"].is_string() && newest["payload"].is_object(), "{newest}");

    let page1 = json_of(hub.call(get("/api/devices/pi-1/events?kind=button&limit=4")).await).await;
    assert_eq!(seqs(&page1), vec![10, 9, 8, 7]);
    assert!(page1.as_array().expect("a list").iter().all(|e| e["kind"] == "button" && e["name"] == "door"));
    let page2 = json_of(hub.call(get("/api/devices/pi-1/events?kind=button&limit=4&before_seq=7")).await).await;
    assert_eq!(seqs(&page2), vec![6, 5, 4, 3]);
    let last = json_of(hub.call(get("/api/devices/pi-1/events?kind=button&limit=4&before_seq=3")).await).await;
    assert_eq!(seqs(&last), vec![2, 1]);

    let heartbeats = json_of(hub.call(get("/api/devices/pi-1/events?kind=heartbeat")).await).await;
    assert_eq!(seqs(&heartbeats), vec![15, 14, 13, 12, 11]);
    let none = json_of(hub.call(get("/api/devices/pi-1/events?kind=error")).await).await;
    assert_eq!(none, json!([]));
    let unknown = json_of(hub.call(get("/api/devices/pi-9/events")).await).await;
    assert_eq!(unknown, json!([]));
}

/// `(epoch, seq)` of each event.
fn identities(events: &Value) -> Vec<(u64, u64)> {
    let list = events.as_array().expect("a list");
    list.iter().map(|e| (e["epoch"].as_u64().expect("an epoch"), e["seq"].as_u64().expect("a seq"))).collect()
}

#[tokio::test]
async fn events_page_across_an_epoch_change_newest_epoch_first() {
    let hub = Hub::new().await;
    let mut updates: Vec<Update> = (1..=3).map(|s| button("pi-1", s)).collect();
    // The device lost its seq.floor: seqs start again under a new epoch.
    for s in 1..=2 {
        let mut b = button("pi-1", s);
        if let Update::Message(m) = &mut b {
            m.epoch = 1_795_255_200_000;
        }
        updates.push(b);
    }
    hub.seed(&updates).await;
    let e = 1_795_255_200_000;

    let all = json_of(hub.call(get("/api/devices/pi-1/events")).await).await;
    assert_eq!(identities(&all), [(e, 2), (e, 1), (0, 3), (0, 2), (0, 1)]);
    let page1 = json_of(hub.call(get("/api/devices/pi-1/events?limit=3")).await).await;
    assert_eq!(identities(&page1), [(e, 2), (e, 1), (0, 3)]);
    let page2 = json_of(hub.call(get("/api/devices/pi-1/events?limit=3&before_epoch=0&before_seq=3")).await).await;
    assert_eq!(identities(&page2), [(0, 2), (0, 1)]);
    // `before_seq` alone counts in the newest epoch.
    let newest = json_of(hub.call(get("/api/devices/pi-1/events?before_seq=2")).await).await;
    assert_eq!(identities(&newest), [(e, 1), (0, 3), (0, 2), (0, 1)]);
}

#[tokio::test]
async fn bad_parameters_are_a_400_that_names_the_parameter_and_the_value() {
    let hub = Hub::new().await;
    let cases = [
        ("/api/devices/pi-1/events?kind=weather", "kind: 'weather'"),
        ("/api/devices/pi-1/events?limit=0", "limit: '0'"),
        ("/api/devices/pi-1/events?limit=1001", "limit: '1001'"),
        ("/api/devices/pi-1/events?limit=lots", "limit: 'lots'"),
        ("/api/devices/pi-1/events?before_seq=x", "before_seq: 'x'"),
        ("/api/devices/pi-1/events?before_epoch=-1&before_seq=1", "before_epoch: '-1'"),
        ("/api/devices/pi-1/events?before_epoch=1", "before_epoch: '1' needs before_seq"),
        ("/api/devices/pi%2F1/events", "device: 'pi/1'"),
    ];
    for (uri, expected) in cases {
        let resp = hub.call(get(uri)).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{uri}");
        let error = json_of(resp).await["error"].as_str().expect("an error message").to_string();
        assert!(error.starts_with(expected), "{uri}: {error}");
    }
}

#[tokio::test]
async fn a_bad_relay_command_is_a_400_and_publishes_nothing() {
    let hub = Hub::new().await;
    let cases = [
        ("/api/devices/pi-1/relays/pump", "", "body: expected JSON"),
        ("/api/devices/pi-1/relays/pump", "on", "body: expected JSON"),
        ("/api/devices/pi-1/relays/pump", r#"{"state":"dim"}"#, "state: 'dim'"),
        ("/api/devices/pi-1/relays/pump?wait=2m", r#"{"state":"on"}"#, "wait: '2m' is too long"),
        ("/api/devices/pi-1/relays/pump?wait=later", r#"{"state":"on"}"#, "wait: 'later'"),
        ("/api/devices/pi-1/relays/a+b", r#"{"state":"on"}"#, "relay: 'a+b'"),
        ("/api/devices/pi%231/relays/pump", r#"{"state":"on"}"#, "device: 'pi#1'"),
    ];
    for (uri, body, expected) in cases {
        let resp = hub.call(post_json(uri, body)).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{uri} {body}");
        let error = json_of(resp).await["error"].as_str().expect("an error message").to_string();
        assert!(error.starts_with(expected), "{uri} {body}: {error}");
    }
}

#[tokio::test]
async fn a_command_nobody_answers_is_202_pending_and_can_be_looked_up() {
    let hub = Hub::new().await;
    let resp = hub.call(post_json("/api/devices/pi-1/relays/pump?wait=50ms", r#"{"state":"toggle"}"#)).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let answer = json_of(resp).await;
    assert_eq!(answer["status"], "pending");
    let id = answer["command_id"].as_str().expect("a command id").to_string();

    let resp = hub.call(get(&format!("/api/commands/{id}"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let cmd = json_of(resp).await;
    assert_eq!(cmd["command_id"], id.as_str());
    assert_eq!(cmd["device"], "pi-1");
    assert_eq!(cmd["relay"], "pump");
    assert_eq!(cmd["requested"], "toggle");
    assert_eq!(cmd["status"], "requested");
    assert!(cmd["requested_at"].is_string() && cmd["expires_at"].is_string(), "{cmd}");
    assert_eq!(cmd["confirmed_at"], Value::Null);
}

#[tokio::test]
async fn a_command_the_broker_connection_cannot_take_is_a_503() {
    let mut hub = Hub::new().await;
    // Without its event loop the MQTT client has nowhere to queue a publish.
    hub._eventloop = None;
    let resp = hub.call(post_json("/api/devices/pi-1/relays/pump", r#"{"state":"on"}"#)).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(json_of(resp).await["error"].as_str().expect("an error").contains("broker"));
}

#[tokio::test]
async fn unknown_commands_and_api_routes_are_a_404_and_wrong_methods_a_405_in_json() {
    let hub = Hub::new().await;
    let resp = hub.call(get("/api/commands/nope")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_of(resp).await, json!({"error": "no command 'nope'"}));

    for uri in ["/api/nope", "/api/devices/pi-1", "/api"] {
        let resp = hub.call(get(uri)).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{uri}");
        assert!(json_of(resp).await["error"].as_str().expect("an error").starts_with("no API route GET /api"), "{uri}");
    }
    let delete = bearer(Method::DELETE, "/api/devices").header(header::CONTENT_TYPE, "application/json");
    let resp = hub.call(delete.body(Body::empty()).expect("a valid request")).await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(json_of(resp).await, json!({"error": "DELETE is not allowed on /api/devices"}));
}

fn login_form(token: &str) -> Request<Body> {
    request(Method::POST, "/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={token}")))
        .expect("a valid request")
}

fn assert_session_cookie(cookie: &str) {
    assert!(cookie.starts_with("fieldlink_session="), "{cookie}");
    assert!(!cookie.contains(TOKEN), "the cookie never holds the token: {cookie}");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.split("; ").any(|a| a == attribute), "{attribute} missing: {cookie}");
    }
}

#[tokio::test]
async fn the_login_form_sets_the_cookie_and_a_wrong_token_gets_the_form_again_with_401() {
    let hub = Hub::new().await;
    let page = hub.call(request(Method::GET, "/login").body(Body::empty()).expect("a valid request")).await;
    assert_eq!(page.status(), StatusCode::OK);
    let html = body_text(page).await;
    assert!(html.contains(r#"<form id="login" method="post" action="/login">"#), "{html}");
    assert!(!html.contains("login-error\""), "no error before a try");

    let wrong = hub.call(login_form("guess")).await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get(header::SET_COOKIE).is_none());
    assert!(body_text(wrong).await.contains(r#"<p id="login-error" role="alert">wrong token</p>"#));

    let empty = hub.call(request(Method::POST, "/login").body(Body::empty()).expect("a valid request")).await;
    assert_eq!(empty.status(), StatusCode::BAD_REQUEST);

    let right = hub.call(login_form(&format!("{TOKEN}%0A"))).await; // a pasted newline is forgiven
    assert_eq!(right.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&right), "/");
    let cookie = set_cookie(&right).to_string();
    assert_session_cookie(&cookie);

    let pair = cookie.split(';').next().expect("name=value").to_string();
    let dashboard = request(Method::GET, "/").header(header::COOKIE, &pair).body(Body::empty()).expect("a request");
    assert_eq!(hub.call(dashboard).await.status(), StatusCode::OK);
    let devices =
        request(Method::GET, "/api/devices").header(header::COOKIE, &pair).body(Body::empty()).expect("a request");
    assert_eq!(hub.call(devices).await.status(), StatusCode::OK);
    let login_again =
        request(Method::GET, "/login").header(header::COOKIE, &pair).body(Body::empty()).expect("a request");
    let resp = hub.call(login_again).await;
    assert_eq!((resp.status(), location(&resp)), (StatusCode::SEE_OTHER, "/"), "signed in: straight to the dashboard");
}

fn with_cookie(method: Method, uri: &str, cookie: &str) -> axum::http::request::Builder {
    request(method, uri).header(header::COOKIE, cookie)
}

#[tokio::test]
async fn a_session_cookie_stops_working_after_logout() {
    let hub = Hub::new().await;
    let session = hub.sign_in().await;
    let devices = || with_cookie(Method::GET, "/api/devices", &session).body(Body::empty()).expect("a request");
    assert_eq!(hub.call(devices()).await.status(), StatusCode::OK);

    let logout = with_cookie(Method::POST, "/logout", &session)
        .header("sec-fetch-site", "same-origin")
        .body(Body::empty())
        .expect("a request");
    let resp = hub.call(logout).await;
    assert_eq!((resp.status(), location(&resp)), (StatusCode::SEE_OTHER, "/login"));
    let cookie = set_cookie(&resp);
    assert!(cookie.starts_with("fieldlink_session=;") && cookie.contains("Max-Age=0"), "{cookie}");

    // The browser forgets it; someone who copied it cannot use it either.
    assert_eq!(hub.call(devices()).await.status(), StatusCode::UNAUTHORIZED);
    let page = hub.call(with_cookie(Method::GET, "/", &session).body(Body::empty()).expect("a request")).await;
    assert_eq!((page.status(), location(&page)), (StatusCode::SEE_OTHER, "/login"));
}

#[tokio::test]
async fn a_login_link_signs_in_once_and_a_replayed_one_is_refused() {
    let hub = Hub::new().await;
    let link = hub.state.access.login_link().expect("random");
    assert!(link.starts_with("/login/once/") && !link.contains(TOKEN), "{link}");

    let resp = hub.call(request(Method::GET, &link).body(Body::empty()).expect("a request")).await;
    assert_eq!((resp.status(), location(&resp)), (StatusCode::SEE_OTHER, "/"), "to the clean URL");
    assert_session_cookie(set_cookie(&resp));
    let session = set_cookie(&resp).split(';').next().expect("name=value").to_string();
    let page = hub.call(with_cookie(Method::GET, "/", &session).body(Body::empty()).expect("a request")).await;
    assert_eq!(page.status(), StatusCode::OK);

    let replay = hub.call(request(Method::GET, &link).body(Body::empty()).expect("a request")).await;
    assert_eq!(replay.status(), StatusCode::UNAUTHORIZED);
    assert!(replay.headers().get(header::SET_COOKIE).is_none());
    assert!(body_text(replay).await.contains("already used or has expired"));
    assert_eq!(hub.state.access.failed_logins(), 1, "the replay counts as a failed sign-in");

    // The old `/?token=` shortcut is gone: the token in a URL signs nobody in.
    let old = hub.call(request(Method::GET, &format!("/?token={TOKEN}")).body(Body::empty()).expect("a request")).await;
    assert_eq!((old.status(), location(&old)), (StatusCode::SEE_OTHER, "/login"));
    assert!(old.headers().get(header::SET_COOKIE).is_none());
}

#[tokio::test]
async fn a_cross_origin_post_is_refused_and_sends_no_command() {
    let hub = Hub::new().await;
    let session = hub.sign_in().await;
    let relay = "/api/devices/pi-1/relays/pump?wait=10ms";
    let post = |origin: Option<&str>, site: Option<&str>| {
        let mut req = with_cookie(Method::POST, relay, &session)
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(o) = origin {
            req = req.header(header::ORIGIN, o);
        }
        if let Some(s) = site {
            req = req.header("sec-fetch-site", s);
        }
        req.body(Body::from(r#"{"state":"on"}"#)).expect("a request")
    };
    for (origin, site) in [
        (Some("http://127.0.0.1:9999"), None),
        (Some("http://127.0.0.1:9999"), Some("same-site")),
        (Some("null"), None),
        (None, Some("cross-site")),
    ] {
        let resp = hub.call(post(origin, site)).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{origin:?} {site:?}");
        let body = json_of(resp).await;
        assert!(body["error"].as_str().expect("an error").starts_with("cross-origin request refused"), "{body}");
        assert!(body.get("command_id").is_none(), "no command was created: {body}");
    }
    // The same request from the dashboard's own origin goes through.
    let resp = hub.call(post(Some("http://127.0.0.1:8080"), Some("same-origin"))).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    // And so does a script with the token and no Origin.
    let resp = hub.call(post_json(relay, r#"{"state":"on"}"#)).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_relay_command_that_is_not_declared_json_is_a_415_and_sends_no_command() {
    let hub = Hub::new().await;
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut req = bearer(Method::POST, "/api/devices/pi-1/relays/pump?wait=10ms");
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let resp = hub.call(req.body(Body::from(r#"{"state":"on"}"#)).expect("a request")).await;
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type:?}");
        let body = json_of(resp).await;
        assert!(body["error"].as_str().expect("an error").starts_with("Content-Type must be application/json"));
        assert!(body.get("command_id").is_none(), "{body}");
    }
    let charset = bearer(Method::POST, "/api/devices/pi-1/relays/pump?wait=10ms")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8");
    let resp = hub.call(charset.body(Body::from(r#"{"state":"on"}"#)).expect("a request")).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn streams_over_the_cap_get_a_503_and_a_closed_one_frees_its_slot() {
    let hub = Hub::with(64, Limits { max_streams: 2, ..Limits::default() }).await;
    let first = hub.call(get("/api/stream")).await;
    let second = hub.call(get("/api/stream")).await;
    assert_eq!((first.status(), second.status()), (StatusCode::OK, StatusCode::OK));
    let third = hub.call(get("/api/stream")).await;
    assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json_of(third).await, json!({"error": "too many live streams open (2); try again in a while"}));
    drop(first);
    assert_eq!(hub.call(get("/api/stream")).await.status(), StatusCode::OK);
}

/// Serves the hub on a free port with `limits`; stops when the sender drops.
async fn serve_on_port(hub: &Hub, limits: Limits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let addr = listener.local_addr().expect("bound");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut state = hub.state.clone();
    state.limits = limits;
    tokio::spawn(serve(listener, state, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// Reads until the server closes the connection (what it sent, if
/// anything); panics if it stays open for `deadline`.
async fn read_until_closed(conn: &mut tokio::net::TcpStream, deadline: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(deadline, read_all).await.expect("the server closed the connection");
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test]
async fn silent_and_half_sent_connections_are_closed_by_the_server() {
    use tokio::io::AsyncWriteExt;
    let hub = Hub::new().await;
    let limits = Limits { header_read_timeout: Duration::from_millis(300), ..Limits::default() };
    let (addr, _stop) = serve_on_port(&hub, limits).await;
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(tokio::net::TcpStream::connect(addr).await.expect("connects"));
    }
    let mut half = tokio::net::TcpStream::connect(addr).await.expect("connects");
    half.write_all(b"GET /api/devices HTTP/1.1\r\nHost: x\r\n").await.expect("sends");
    for conn in silent.iter_mut().chain([&mut half]) {
        // Generous: the timeout is 300 ms; a loaded machine may be slow.
        read_until_closed(conn, Duration::from_secs(30)).await;
    }
    // The server still serves.
    let mut ok = tokio::net::TcpStream::connect(addr).await.expect("connects");
    let req =
        format!("GET /api/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n");
    ok.write_all(req.as_bytes()).await.expect("sends");
    assert!(read_until_closed(&mut ok, Duration::from_secs(30)).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_connection_over_the_cap_gets_a_503_and_is_closed() {
    let hub = Hub::new().await;
    let limits = Limits { max_connections: 3, header_read_timeout: Duration::from_secs(60), ..Limits::default() };
    let (addr, _stop) = serve_on_port(&hub, limits).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(addr).await.expect("connects"));
    }
    // The accept loop takes them in order; the fourth is over the cap.
    let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connects");
    let answer = read_until_closed(&mut extra, Duration::from_secs(30)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too many connections"), "{answer}");
    drop(held);
}

/// The next chunk of an SSE body that carries data, as its `data:` JSON.
async fn next_data(
    body: &mut (impl futures_util::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin),
) -> Value {
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("an event within 5 s")
            .expect("the stream is open")
            .expect("a chunk");
        let text = String::from_utf8(chunk.to_vec()).expect("UTF-8");
        if let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) {
            return serde_json::from_str(data).expect("JSON data");
        }
    }
}

#[tokio::test]
async fn the_stream_sends_each_live_event_as_one_json_data_line() {
    let hub = Hub::new().await;
    let resp = hub.call(get("/api/stream")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body().into_data_stream();

    let status = LiveEvent::Status { device: "pi-1".into(), online: true, at: "2026-11-21T10:00:00.000Z".into() };
    hub.state.live.send(status).expect("the stream is subscribed");
    assert_eq!(
        next_data(&mut body).await,
        json!({"type": "status", "device": "pi-1", "online": true, "at": "2026-11-21T10:00:00.000Z"})
    );
    let Update::Message(m) = button("pi-1", 7) else { unreachable!("button() builds a message") };
    hub.state.live.send(LiveEvent::Message(m)).expect("the stream is subscribed");
    let data = next_data(&mut body).await;
    assert_eq!(
        (data["type"].as_str(), data["kind"].as_str(), data["seq"].as_u64()),
        (Some("message"), Some("button"), Some(7))
    );
}

#[tokio::test]
async fn a_stream_that_falls_behind_is_told_to_reload() {
    let hub = Hub::with_live_capacity(4).await;
    let resp = hub.call(get("/api/stream")).await;
    let mut body = resp.into_body().into_data_stream();
    for i in 0..10 {
        let ev = LiveEvent::Status { device: format!("pi-{i}"), online: true, at: "2026-11-21T10:00:00.000Z".into() };
        hub.state.live.send(ev).expect("the stream is subscribed");
    }
    assert_eq!(next_data(&mut body).await, json!({"type": "reload", "missed": 6}));
    assert_eq!(next_data(&mut body).await["device"], "pi-6", "then it carries on from the oldest kept");
}

#[tokio::test]
async fn serve_ends_open_streams_when_shutdown_fires() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let hub = Hub::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let addr = listener.local_addr().expect("bound");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, hub.state.clone(), async move {
        // A dropped sender also means stop.
        let _ = stopped.await;
    }));

    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connects");
    let req = format!("GET /api/stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    conn.write_all(req.as_bytes()).await.expect("sends");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await.expect("answers").expect("reads");
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream"), "{head}");

    stop.send(()).expect("the server waits for it");
    let done = tokio::time::timeout(Duration::from_secs(5), server).await;
    assert!(matches!(done, Ok(Ok(Ok(())))), "serve returned with the stream open: {done:?}");
}
