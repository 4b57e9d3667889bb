//! The hub's HTTP side (DESIGN: "HTTP API" and the dashboard): the JSON API
//! under `/api`, the live stream of server-sent events, the token login, and
//! the dashboard whose hand-written HTML, CSS and JS are embedded in the
//! binary (`src/hub/assets/`, no CDN, no build step).
//!
//! # Routes
//!
//! ```text
//! GET  /login                         login page (public)
//! POST /login        form token=...   right: cookie + 303 to /; wrong: login page, 401
//! GET  /logout                        clears the cookie, 303 to /login (public)
//! GET  /?token=...                    right: cookie + 303 to /; wrong: login page, 401
//! GET  /                              the dashboard
//! GET  /assets/{app.js,style.css}     its script and style
//! GET  /api/devices                   [DeviceView]
//! GET  /api/devices/{d}/events        [EventView], newest first; ?kind=&limit=&before_seq=
//! POST /api/devices/{d}/relays/{r}    {"state":"on"|"off"|"toggle"}; ?wait=5s
//! GET  /api/commands/{id}             CommandRow
//! GET  /api/stream                    SSE: one `data:` JSON line per LiveEvent
//! ```
//!
//! # Invariants
//!
//! * Every page and API call needs the token, presented as
//!   `Authorization: Bearer <token>` or as the `fieldlink_token` cookie
//!   (HttpOnly, SameSite=Strict, Path=/). Only `/login` and `/logout` are
//!   public, and `/` checks its `?token=` itself. Tokens are compared in
//!   constant time. Without the token the API answers 401
//!   `{"error":"missing or wrong token"}` and pages redirect to `/login`.
//! * Every API error, including unknown routes under `/api` and extractor
//!   rejections, is JSON `{"error":"<message>"}` with a fitting status.
//! * Handlers hold no state of their own: everything is in the [`Store`],
//!   the [`Commander`] and the live broadcast channel, so any number of hubs
//!   can serve the same database.
//! * [`serve`] ends the open event streams when `shutdown` fires, so a
//!   graceful shutdown is not held up by a dashboard left open.
//!
//! # Layout
//!
//! * `auth`: token checks, the cookie, login/logout, the `/` entry point.
//! * `api`: the JSON endpoints, their parameter parsing and the pure mapping
//!   of a command [`Outcome`](super::commands::Outcome) to an HTTP answer.
//! * `stream`: `GET /api/stream`.
//! * `assets`: the embedded dashboard files.

mod api;
mod assets;
mod auth;
mod stream;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use tokio::sync::{broadcast, watch};

use super::commands::{CommandError, Commander};
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
}

/// An API failure: answered as JSON `{"error":"<message>"}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong token")]
    Unauthorized,
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
        .route("/devices/{d}/relays/{r}", post(api::set_relay))
        .route("/commands/{id}", get(api::command))
        .route("/stream", get(stream::stream))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require_for_api))
        .layer(middleware::map_response(no_store));
    let pages = Router::new()
        .route("/assets/app.js", get(assets::app_js))
        .route("/assets/style.css", get(assets::style_css))
        .fallback(assets::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require_for_page));
    Router::new()
        .route("/", get(auth::index))
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/logout", get(auth::logout))
        .nest("/api", api)
        .merge(pages)
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` completes, then ends the
/// open event streams and waits for the requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = router(state).layer(Extension(StreamStop(stop_rx)));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop_tx.send_replace(true);
        })
        .await
}

/// Headers every answer carries: no MIME sniffing, and no `Referer` that
/// could carry a `?token=` elsewhere.
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
