//! The hub's HTTP side (DESIGN: "HTTP API" and the dashboard): the JSON API
//! under `/api`, the live stream of server-sent events, the sign-in with
//! server-side sessions, and the dashboard whose hand-written HTML, CSS and
//! JS are embedded in the binary (`src/hub/assets/`, no CDN, no build step).
//!
//! # Routes
//!
//! ```text
//! GET  /login                         login page (public)
//! POST /login        form token=...   right: session cookie + 303 to /; wrong: login page, 401
//! GET  /login/once/{nonce}            one-time link: session cookie + 303 to /; used/expired: 401
//! POST /logout                        revokes the session, clears the cookie, 303 to /login
//! GET  /                              the dashboard
//! GET  /assets/{app.js,style.css}     its script and style
//! GET  /api/devices                   [DeviceView]
//! GET  /api/devices/{d}/events        [EventView], newest first; ?kind=&limit=&before_seq=
//! GET  /api/devices/{d}/history       HistoryView; ?range=1h|24h|7d (downsampled on the server)
//! GET  /api/devices/{d}/commands      [CommandRow], newest first; ?limit=
//! POST /api/devices/{d}/relays/{r}    {"state":"on"|"off"|"toggle"}; ?wait=5s
//! GET  /api/commands/{id}             CommandRow
//! GET  /api/stream                    SSE: one `data:` JSON line per LiveEvent
//! GET  /metrics                       Prometheus text (token or session, like the API)
//! ```
//!
//! With `[web] metrics_listen` set, [`serve_metrics`] also answers
//! `GET /metrics` on that address, without authentication, and nothing else.
//!
//! # Invariants
//!
//! * Every page and API call needs `Authorization: Bearer <token>` or a live
//!   session (the `fieldlink_session` cookie: a random id the hub keeps in
//!   memory, never the token). Only `/login`, `/login/once/..` and
//!   `/logout` are public. Without either the API answers 401
//!   `{"error":"missing or wrong token"}` and pages redirect to `/login`.
//! * A state-changing request (not GET/HEAD/OPTIONS) from another origin
//!   is refused with 403 before anything else (`origin`); one under `/api`
//!   must say `Content-Type: application/json` (415 otherwise), and its
//!   body is parsed only as JSON.
//! * Every API error, including unknown routes under `/api` and extractor
//!   rejections, is JSON `{"error":"<message>"}` with a fitting status.
//! * Handlers keep no state of their own but the sessions, login links and
//!   failure counts ([`Access`]); the rest is in the [`Store`], the
//!   [`Commander`] and the live broadcast channel.
//! * [`serve`] applies the connection [`Limits`] and ends the open event
//!   streams when `shutdown` fires, so a graceful shutdown is not held up
//!   by a dashboard left open.
//!
//! # Layout
//!
//! * `auth`: bearer and session checks, login/logout, login links.
//! * `session`, `login_link`, `login_failures`: their tables (sans-IO).
//! * `origin`: the cross-origin check.
//! * `server`: the accept loop and its limits.
//! * `api`: the JSON endpoints, their parameter parsing and the pure mapping
//!   of a command [`Outcome`](super::commands::Outcome) to an HTTP answer.
//! * `stream`: `GET /api/stream`.
//! * `assets`: the embedded dashboard files.

mod api;
mod assets;
mod auth;
mod login_failures;
mod login_link;
mod origin;
mod server;
mod session;
mod stream;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use tokio::sync::{Semaphore, broadcast, watch};

pub use server::{Limits, Peer};

use super::commands::{CommandError, Commander};
use super::metrics::Metrics;
use super::model::LiveEvent;
use super::store::{Store, StoreError};

/// Everything a handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub commander: Commander,
    /// Every stored message and status change, for `GET /api/stream`.
    pub live: broadcast::Sender<LiveEvent>,
    /// The token every page and API call must present.
    pub token: Arc<str>,
    /// How long `POST /api/devices/{d}/relays/{r}` waits for the agent's
    /// answer unless the request says `?wait=`.
    pub command_wait: Duration,
    /// Sessions, login links, failed sign-ins and stream slots.
    pub access: Arc<Access>,
    /// The server's limits (see [`serve`]).
    pub limits: Limits,
    /// The counters `GET /metrics` shows.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn new(
        store: Store,
        commander: Commander,
        live: broadcast::Sender<LiveEvent>,
        token: &str,
        command_wait: Duration,
        limits: Limits,
    ) -> AppState {
        let access = Arc::new(Access::new(limits.max_streams));
        let metrics = Arc::default();
        AppState { store, commander, live, token: Arc::from(token), command_wait, access, limits, metrics }
    }

    /// Shows `metrics` (the collector's and the commander's) on `/metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> AppState {
        self.metrics = metrics;
        self
    }
}

/// What the web side remembers between requests, all in memory: a hub
/// restart signs everyone out and voids the login links.
#[derive(Debug)]
pub struct Access {
    pub(crate) sessions: session::Sessions,
    links: login_link::LoginLinks,
    failures: login_failures::LoginFailures,
    /// One permit per open `GET /api/stream`.
    streams: Arc<Semaphore>,
}

impl Access {
    fn new(max_streams: usize) -> Access {
        Access {
            sessions: session::Sessions::default(),
            links: login_link::LoginLinks::default(),
            failures: login_failures::LoginFailures::default(),
            streams: Arc::new(Semaphore::new(max_streams)),
        }
    }

    /// A one-time login path, `/login/once/<nonce>`: valid once, for
    /// [`login_link::TTL`] (10 minutes).
    pub fn login_link(&self) -> Result<String, getrandom::Error> {
        Ok(format!("/login/once/{}", self.links.mint(std::time::Instant::now())?))
    }

    /// Failed sign-ins since the hub started.
    pub fn failed_logins(&self) -> u64 {
        self.failures.total()
    }
}

/// An API failure: answered as JSON `{"error":"<message>"}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong token")]
    Unauthorized,
    #[error("cross-origin request refused: {0}")]
    CrossOrigin(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Command(#[from] CommandError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::CrossOrigin(_) => StatusCode::FORBIDDEN,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Store(_) | ApiError::Command(CommandError::Store(_) | CommandError::Random(_)) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            // The hub cannot reach its broker right now; retrying may help.
            ApiError::Command(CommandError::Publish(_)) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!("web: {self}");
        }
        let mut response = (status, Json(serde_json::json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Tells the open event streams to end (see [`serve`]). Absent when the
/// router is used on its own, as in tests.
#[derive(Clone)]
struct StreamStop(watch::Receiver<bool>);

/// The whole web side: pages, assets and API, with the token checks.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/devices", get(api::devices))
        .route("/devices/{d}/events", get(api::events))
        .route("/devices/{d}/history", get(api::history))
        .route("/devices/{d}/commands", get(api::device_commands))
        .route("/devices/{d}/relays/{r}", post(api::set_relay))
        .route("/commands/{id}", get(api::command))
        .route("/set-aside", get(api::set_aside))
        .route("/stream", get(stream::stream))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(middleware::from_fn(json_only))
        .layer(middleware::from_fn_with_state(state.clone(), auth::require_for_api))
        .layer(middleware::map_response(no_store));
    let pages = Router::new()
        .route("/assets/app.js", get(assets::app_js))
        .route("/assets/style.css", get(assets::style_css))
        .fallback(assets::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require_for_page));
    let metrics = Router::new()
        .route("/metrics", get(metrics_text))
        .layer(middleware::from_fn_with_state(state.clone(), auth::require_for_api))
        .layer(middleware::map_response(no_store));
    Router::new()
        .route("/", get(auth::index))
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/login/once/{nonce}", get(auth::login_once))
        .route("/logout", post(auth::logout))
        .nest("/api", api)
        .merge(metrics)
        .merge(pages)
        .layer(middleware::from_fn(same_origin))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// Serves [`router`] on `listener` with `state.limits` until `shutdown`
/// completes, then ends the open event streams and waits for the requests
/// in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = state.limits;
    let app = router(state).layer(Extension(StreamStop(stop_rx)));
    server::run(listener, app, limits, async move {
        shutdown.await;
        stop_tx.send_replace(true);
    })
    .await
}

/// Serves only `GET /metrics`, without authentication, on `listener`
/// (`[web] metrics_listen`) until `shutdown` completes.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.limits;
    let app = Router::new().route("/metrics", get(metrics_text)).with_state(state);
    server::run(listener, app, limits, shutdown).await
}

/// `GET /metrics`: the Prometheus text format (version 0.0.4).
async fn metrics_text(axum::extract::State(st): axum::extract::State<AppState>) -> Response {
    let online = match st.store.devices_online().await {
        Ok(n) => Some(n),
        Err(e) => {
            st.metrics.db_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("metrics: {e}");
            None
        }
    };
    let mut response = st.metrics.render(online).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

/// Refuses a state-changing request from another origin (see `origin`).
async fn same_origin(req: Request, next: Next) -> Response {
    match origin::cross_origin(req.method(), req.headers()) {
        None => next.run(req).await,
        Some(why) => {
            let peer = req.extensions().get::<Peer>().map(|Peer(a)| a.to_string()).unwrap_or_default();
            tracing::warn!("web: refused {} {} from {peer}: {why}", req.method(), req.uri().path());
            ApiError::CrossOrigin(why).into_response()
        }
    }
}

/// A state-changing API request must be JSON: no form or `text/plain` body
/// (what a page on another site can send without asking) is ever read.
async fn json_only(req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let content_type = req.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("?").to_string());
    let json = content_type.as_deref().is_some_and(|ct| {
        ct.split(';').next().is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
    });
    if json {
        next.run(req).await
    } else {
        let got = content_type.map_or_else(|| "none".to_string(), |ct| format!("'{ct}'"));
        ApiError::UnsupportedMediaType(format!("Content-Type must be application/json (got {got})")).into_response()
    }
}

/// Headers every answer carries: no MIME sniffing, and no `Referer` that
/// could carry a login link elsewhere.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// API answers are live data: never cached.
async fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
