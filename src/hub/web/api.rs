//! The JSON endpoints under `/api` (DESIGN: "HTTP API"). Parameter parsing
//! and the mapping of a command [`Outcome`] to an HTTP answer are plain
//! functions, tested without a server; the handlers only glue them to the
//! [`Store`](crate::hub::store::Store) and the
//! [`Commander`](crate::hub::commands::Commander).
//!
//! Bad input is a 400 whose message names the parameter, quotes the value
//! and says what was expected, like every error in fieldlink:
//! `limit: '5000' is out of range (expected 1..=1000)`.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use std::time::SystemTime;

use axum::Extension;
use axum::http::HeaderMap;

use super::{ApiError, AppState, Peer, auth};
use crate::hub::commands::{Outcome, Requested};
use crate::hub::history::{self, HistoryView, Range};
use crate::hub::model::{Before, CommandRow, EventView, Kind, Requester, SetAsideView};

/// `limit` when the request does not say.
pub(super) const DEFAULT_LIMIT: u32 = 100;
/// The most events one page may hold.
pub(super) const MAX_LIMIT: u32 = 1000;
/// The longest `?wait=` a relay command may ask for.
pub(super) const MAX_WAIT: Duration = Duration::from_secs(60);

type Params = Vec<(String, String)>;

/// The last value of a query parameter (later ones win, as in a form).
fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn query_params(query: Result<Query<Params>, QueryRejection>) -> Result<Params, ApiError> {
    query.map(|Query(p)| p).map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))
}

/// Device ids and relay names end up in MQTT topics: `[A-Za-z0-9_-]{1,64}`
/// keeps `/`, `+` and `#` out of them.
fn name_param(what: &str, value: String) -> Result<String, ApiError> {
    let ok =
        (1..=64).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(value)
    } else {
        Err(ApiError::BadRequest(format!("{what}: '{value}' is not valid (expected [A-Za-z0-9_-]{{1,64}})")))
    }
}

/// What `GET /api/devices/{d}/events` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct EventsQuery {
    pub kind: Option<Kind>,
    pub limit: u32,
    pub before: Option<Before>,
}

/// Parses `kind`, `limit`, `before_seq` and `before_epoch`; other parameters
/// are ignored (a cache-buster, say). A page ends before `(before_epoch,
/// before_seq)`; `before_seq` alone means the device's newest epoch, and
/// `before_epoch` needs `before_seq`.
pub(super) fn events_query(params: &[(String, String)]) -> Result<EventsQuery, ApiError> {
    let kind = match param(params, "kind") {
        None => None,
        Some(k) => Some(Kind::parse(k).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "kind: '{k}' is not an event kind (expected button, relay, heartbeat, sensor or error)"
            ))
        })?),
    };
    let limit = limit_param(params)?;
    let number = |name: &str, what: &str| match param(params, name) {
        None => Ok(None),
        Some(s) => s
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("{name}: '{s}' is not {what} (expected 0..={})", u64::MAX))),
    };
    let before_seq = number("before_seq", "a sequence number")?;
    let before_epoch = number("before_epoch", "an epoch")?;
    let before = match (before_epoch, before_seq) {
        (epoch, Some(seq)) => Some(Before { epoch, seq }),
        (None, None) => None,
        (Some(e), None) => {
            return Err(ApiError::BadRequest(format!(
                "before_epoch: '{e}' needs before_seq (a page ends before an (epoch, seq))"
            )));
        }
    };
    Ok(EventsQuery { kind, limit, before })
}

/// `?limit=` (1..=[`MAX_LIMIT`]), or [`DEFAULT_LIMIT`].
pub(super) fn limit_param(params: &[(String, String)]) -> Result<u32, ApiError> {
    let Some(l) = param(params, "limit") else { return Ok(DEFAULT_LIMIT) };
    match l.parse::<u32>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Ok(_) => Err(ApiError::BadRequest(format!("limit: '{l}' is out of range (expected 1..={MAX_LIMIT})"))),
        Err(e) if matches!(e.kind(), std::num::IntErrorKind::PosOverflow) => {
            Err(ApiError::BadRequest(format!("limit: '{l}' is out of range (expected 1..={MAX_LIMIT})")))
        }
        Err(_) => Err(ApiError::BadRequest(format!("limit: '{l}' is not a number (expected 1..={MAX_LIMIT})"))),
    }
}

/// `?wait=` (humantime, at most [`MAX_WAIT`]), or `default`.
pub(super) fn wait_param(params: &[(String, String)], default: Duration) -> Result<Duration, ApiError> {
    let Some(w) = param(params, "wait") else {
        return Ok(default);
    };
    let wait = humantime::parse_duration(w).map_err(|_| {
        ApiError::BadRequest(format!("wait: '{w}' is not a duration (expected e.g. '5s', at most 60s)"))
    })?;
    if wait > MAX_WAIT {
        return Err(ApiError::BadRequest(format!("wait: '{w}' is too long (expected at most 60s)")));
    }
    Ok(wait)
}

/// `?range=` (1h, 24h or 7d), or 1h.
pub(super) fn range_param(params: &[(String, String)]) -> Result<Range, ApiError> {
    let Some(r) = param(params, "range") else { return Ok(Range::Hour) };
    Range::parse(r).ok_or_else(|| ApiError::BadRequest(format!("range: '{r}' is not a range (expected 1h, 24h or 7d)")))
}

#[derive(Deserialize)]
struct RelayBody {
    state: String,
}

/// The body of `POST /api/devices/{d}/relays/{r}`: `{"state":"on"|"off"|"toggle"}`
/// (any case, as the agent accepts).
pub(super) fn relay_body(body: &[u8]) -> Result<Requested, ApiError> {
    let RelayBody { state } = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!(r#"body: expected JSON {{"state":"on"|"off"|"toggle"}} ({e})"#)))?;
    Requested::parse(&state.to_ascii_lowercase()).ok_or_else(|| {
        ApiError::BadRequest(format!("state: '{state}' is not a relay command (expected on, off or toggle)"))
    })
}

/// The HTTP answer a command outcome stands for: 200 confirmed, 202
/// pending, 409 rejected; the body is the outcome itself.
pub(super) fn outcome_answer(outcome: &Outcome) -> (StatusCode, Value) {
    let status = match outcome {
        Outcome::Confirmed { .. } => StatusCode::OK,
        Outcome::Pending { .. } => StatusCode::ACCEPTED,
        Outcome::Rejected { .. } => StatusCode::CONFLICT,
    };
    let body = serde_json::to_value(outcome).expect("an outcome is a map of strings");
    (status, body)
}

/// `GET /api/devices`: the `DeviceView`s, as the store writes them
/// ([`crate::hub::store::Store::devices_json`]).
pub(super) async fn devices(State(st): State<AppState>) -> Result<Response, ApiError> {
    let body = st.store.devices_json().await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `GET /api/devices/{d}/events?kind=&limit=&before_seq=&before_epoch=`,
/// newest (greatest `(epoch, seq)`) first. An unknown device has no events:
/// `[]`.
pub(super) async fn events(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Vec<EventView>>, ApiError> {
    let Path(device) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let device = name_param("device", device)?;
    let q = events_query(&query_params(query)?)?;
    Ok(Json(st.store.events(&device, q.kind, q.limit, q.before).await?))
}

/// `GET /api/devices/{d}/history?range=1h|24h|7d`: the device's charts
/// (downsampled), outages, reconnects and lateness over the range ending
/// now (`hub::history`). An unknown device has an empty history.
pub(super) async fn history(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Json<HistoryView>, ApiError> {
    let Path(device) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let device = name_param("device", device)?;
    let range = range_param(&query_params(query)?)?;
    let to = SystemTime::now();
    let from = to - range.duration();
    let (before, status) = st.store.status_events(&device, from, to).await?;
    let rows = st.store.range(&device, from, to).await?;
    Ok(Json(history::build(range, to, before.as_ref(), status, &rows)))
}

/// `GET /api/devices/{d}/commands?limit=`: the device's relay commands,
/// newest first, with who asked and when they were answered.
pub(super) async fn device_commands(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Vec<CommandRow>>, ApiError> {
    let Path(device) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let device = name_param("device", device)?;
    let limit = limit_param(&query_params(query)?)?;
    Ok(Json(st.store.device_commands(&device, limit).await?))
}

/// `GET /api/set-aside?limit=`: the messages the collector set aside,
/// newest first.
pub(super) async fn set_aside(
    State(st): State<AppState>,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Vec<SetAsideView>>, ApiError> {
    let limit = limit_param(&query_params(query)?)?;
    Ok(Json(st.store.set_aside(limit).await?))
}

/// `POST /api/devices/{d}/relays/{r}?wait=` with `{"state":...}`.
pub(super) async fn set_relay(
    State(st): State<AppState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<Params>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((device, relay)) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let device = name_param("device", device)?;
    let relay = name_param("relay", relay)?;
    let wait = wait_param(&query_params(query)?, st.command_wait)?;
    let body = body.map_err(|e| ApiError::BadRequest(format!("body: {}", e.body_text())))?;
    let requested = relay_body(&body)?;
    let by =
        Requester { origin: auth::origin(&st, &headers), client: peer.map(|Extension(Peer(a))| a.ip().to_string()) };
    let outcome = st.commander.send(&device, &relay, requested, wait, &by).await?;
    let (status, body) = outcome_answer(&outcome);
    Ok((status, Json(body)).into_response())
}

/// `GET /api/commands/{id}`
pub(super) async fn command(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CommandRow>, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    match st.store.command(&id).await? {
        Some(row) => Ok(Json(row)),
        None => Err(ApiError::NotFound(format!("no command '{id}'"))),
    }
}

/// Unknown routes under `/api`.
pub(super) async fn not_found(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::NotFound(format!("no API route {method} {}", uri.path()))
}

/// Known routes, wrong method.
pub(super) async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn bad(r: Result<impl std::fmt::Debug, ApiError>) -> String {
        match r {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn events_default_to_a_hundred_of_every_kind() {
        assert_eq!(events_query(&[]).expect("valid"), EventsQuery { kind: None, limit: 100, before: None });
    }

    #[test]
    fn events_parameters_are_parsed_and_unknown_ones_ignored() {
        let q = events_query(&params(&[("kind", "heartbeat"), ("limit", "1000"), ("before_seq", "42"), ("_", "1")]))
            .expect("valid");
        assert_eq!(
            q,
            EventsQuery { kind: Some(Kind::Heartbeat), limit: 1000, before: Some(Before { epoch: None, seq: 42 }) }
        );
        let q = events_query(&params(&[("before_seq", "42"), ("before_epoch", "7")])).expect("valid");
        assert_eq!(q.before, Some(Before { epoch: Some(7), seq: 42 }));
    }

    #[test]
    fn a_bad_events_parameter_is_named_and_quoted() {
        assert_eq!(
            bad(events_query(&params(&[("kind", "weather")]))),
            "kind: 'weather' is not an event kind (expected button, relay, heartbeat, sensor or error)"
        );
        assert_eq!(
            bad(events_query(&params(&[("limit", "5000")]))),
            "limit: '5000' is out of range (expected 1..=1000)"
        );
        assert_eq!(bad(events_query(&params(&[("limit", "0")]))), "limit: '0' is out of range (expected 1..=1000)");
        assert_eq!(bad(events_query(&params(&[("limit", "ten")]))), "limit: 'ten' is not a number (expected 1..=1000)");
        assert!(bad(events_query(&params(&[("before_seq", "-1")]))).starts_with("before_seq: '-1'"));
        assert!(
            bad(events_query(&params(&[("before_epoch", "x"), ("before_seq", "1")]))).starts_with("before_epoch: 'x'")
        );
        assert!(bad(events_query(&params(&[("before_epoch", "3")]))).contains("needs before_seq"));
        assert_eq!(
            bad(limit_param(&params(&[("limit", "99999999999")]))),
            "limit: '99999999999' is out of range (expected 1..=1000)"
        );
        assert_eq!(limit_param(&params(&[])).expect("default"), 100);
    }

    #[test]
    fn range_defaults_to_an_hour_and_names_what_it_accepts() {
        assert_eq!(range_param(&[]).expect("default"), Range::Hour);
        assert_eq!(range_param(&params(&[("range", "7d")])).expect("valid"), Range::Week);
        assert_eq!(
            bad(range_param(&params(&[("range", "1y")]))),
            "range: '1y' is not a range (expected 1h, 24h or 7d)"
        );
    }

    #[test]
    fn wait_defaults_to_the_configured_wait_and_is_capped_at_a_minute() {
        let default = Duration::from_secs(5);
        assert_eq!(wait_param(&[], default).expect("valid"), default);
        assert_eq!(wait_param(&params(&[("wait", "250ms")]), default).expect("valid"), Duration::from_millis(250));
        assert_eq!(wait_param(&params(&[("wait", "60s")]), default).expect("valid"), MAX_WAIT);
        assert_eq!(
            bad(wait_param(&params(&[("wait", "61s")]), default)),
            "wait: '61s' is too long (expected at most 60s)"
        );
        assert!(bad(wait_param(&params(&[("wait", "soon")]), default)).starts_with("wait: 'soon' is not a duration"));
    }

    #[test]
    fn the_relay_body_is_a_state_in_any_case() {
        assert_eq!(relay_body(br#"{"state":"on"}"#).expect("valid"), Requested::On);
        assert_eq!(relay_body(br#"{"state":"OFF"}"#).expect("valid"), Requested::Off);
        assert_eq!(relay_body(br#"{"state":"Toggle","extra":1}"#).expect("valid"), Requested::Toggle);
        assert_eq!(
            bad(relay_body(br#"{"state":"dim"}"#)),
            "state: 'dim' is not a relay command (expected on, off or toggle)"
        );
        for body in [&b""[..], b"on", br#"{"state":1}"#, br#"{}"#] {
            assert!(bad(relay_body(body)).starts_with(r#"body: expected JSON {"state":"on"|"off"|"toggle"}"#));
        }
    }

    #[test]
    fn names_that_would_change_the_topic_are_refused() {
        assert_eq!(name_param("relay", "pump_1-a".into()).expect("valid"), "pump_1-a");
        for name in ["", "a/b", "+", "#", "a b", &"x".repeat(65)] {
            assert!(bad(name_param("relay", name.to_string())).starts_with("relay: '"), "{name}");
        }
    }

    #[test]
    fn each_outcome_has_its_status_code_and_body() {
        let confirmed = Outcome::Confirmed { command_id: "c1".into(), state: "on".into() };
        assert_eq!(
            outcome_answer(&confirmed),
            (StatusCode::OK, serde_json::json!({"command_id": "c1", "status": "confirmed", "state": "on"}))
        );
        let pending = Outcome::Pending { command_id: "c2".into() };
        assert_eq!(
            outcome_answer(&pending),
            (StatusCode::ACCEPTED, serde_json::json!({"command_id": "c2", "status": "pending"}))
        );
        let rejected = Outcome::Rejected { command_id: "c3".into(), error: "unknown_relay: no relay 'x'".into() };
        assert_eq!(
            outcome_answer(&rejected),
            (
                StatusCode::CONFLICT,
                serde_json::json!({"command_id": "c3", "status": "rejected", "error": "unknown_relay: no relay 'x'"})
            )
        );
    }
}
