//! The dashboard's files, embedded in the binary from `src/hub/assets/`
//! (hand-written HTML, CSS and JS: no CDN, no build step). The pages carry
//! a Content-Security-Policy that allows only this origin's own script,
//! style and connections.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

const INDEX_HTML: &str = include_str!("../assets/index.html");
pub(super) const LOGIN_HTML: &str = include_str!("../assets/login.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

const DASHBOARD_CSP: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// An embedded file; `no-cache` so a new hub version's files are picked up
/// at once (the browser revalidates; they are small).
fn file(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /` (signed in).
pub(super) fn index() -> Response {
    let mut response = Html(INDEX_HTML).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(DASHBOARD_CSP));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /assets/app.js`
pub(super) async fn app_js() -> Response {
    file("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /assets/style.css`
pub(super) async fn style_css() -> Response {
    file("text/css; charset=utf-8", STYLE_CSS)
}

/// Unknown pages (signed in).
pub(super) async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found\n")
}
