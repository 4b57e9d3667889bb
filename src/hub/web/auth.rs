//! Who may in: the API token as `Authorization: Bearer` (scripts, the
//! agent-side tools), or a browser session (the `fieldlink_session` cookie,
//! see `session`); the two middlewares that guard the API (401 JSON) and
//! the pages (redirect to `/login`); and the public entry points: `/login`
//! (the token in a form), `/login/once/{nonce}` (the one-time link `fieldlink
//! demo` prints) and `POST /logout`.
//!
//! The cookie holds only a random session id, never the token. It is
//! HttpOnly (no script reads it), SameSite=Strict, Path=/, lives at most as
//! long as the session (7 days), and is marked Secure when the request came
//! through a TLS proxy (`X-Forwarded-Proto: https`); the hub itself serves
//! plain HTTP. A failed sign-in is counted per client address, logged at
//! warn with the address, and answered only after a delay that grows with
//! the address's recent failures (`login_failures`).

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::rejection::{FormRejection, PathRejection};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use serde::Deserialize;

use super::session::ABSOLUTE;
use super::{ApiError, AppState, Peer, assets};
use crate::hub::model::Origin;
use crate::hub::token::matches;

/// The cookie's name.
pub(super) const COOKIE: &str = "fieldlink_session";

/// The token of `Authorization: Bearer <token>`, if that header is there.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Every `fieldlink_session` cookie the request carries.
pub(super) fn session_ids(headers: &HeaderMap) -> impl Iterator<Item = &str> + '_ {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).filter_map(
        |pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name.trim() == COOKIE).then(|| value.trim())
        },
    )
}

/// Whether the request presents the token or a live session.
pub(super) fn authorized(st: &AppState, headers: &HeaderMap) -> bool {
    if bearer(headers).is_some_and(|t| matches(&st.token, t)) {
        return true;
    }
    let now = Instant::now();
    // A session id is 256 random bits: looking it up in a hash map tells an
    // attacker nothing usable about other ids.
    session_ids(headers).any(|id| st.access.sessions.check(id, now))
}

/// How an authorized request signed in: the token wins when both are
/// there (a script that also carries a cookie is still a script).
pub(super) fn origin(st: &AppState, headers: &HeaderMap) -> Origin {
    if bearer(headers).is_some_and(|t| matches(&st.token, t)) { Origin::ApiToken } else { Origin::DashboardSession }
}

fn set_cookie(value: &str, max_age_s: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}");
    // A session id is hex, so the cookie is visible ASCII; should that ever
    // change, the browser gets no cookie rather than the hub a panic.
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static("fieldlink_session=; Max-Age=0"))
}

fn behind_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
}

/// The answer to a right token or link: a new session, and off to the
/// dashboard (a clean URL: nothing secret stays in the history).
fn signed_in(st: &AppState, headers: &HeaderMap) -> Response {
    match st.access.sessions.create(Instant::now()) {
        Ok(id) => {
            let mut response = Redirect::to("/").into_response();
            response.headers_mut().insert(header::SET_COOKIE, set_cookie(&id, ABSOLUTE.as_secs(), behind_tls(headers)));
            response
        }
        Err(e) => {
            tracing::error!("web: cannot start a session: the system's random number generator failed: {e}");
            login_form(StatusCode::INTERNAL_SERVER_ERROR, Some("the hub cannot start a session; see its log"))
        }
    }
}

/// Counts a failed sign-in, logs it, and waits the address's delay.
async fn failed(st: &AppState, peer: Option<SocketAddr>, what: &str) {
    let f = st.access.failures.record(peer.map(|a| a.ip()), Instant::now());
    let peer = peer.map_or_else(|| "an unknown address".to_string(), |a| a.ip().to_string());
    tracing::warn!(
        "web: failed sign-in from {peer}: {what} ({} from this address in 15 min, {} since start; answering after {:?})",
        f.recent,
        f.total,
        f.delay
    );
    tokio::time::sleep(f.delay).await;
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The login page, with an error paragraph when there is one.
fn login_form(status: StatusCode, error: Option<&str>) -> Response {
    let error =
        error.map(|e| format!(r#"<p id="login-error" role="alert">{}</p>"#, html_escape(e))).unwrap_or_default();
    let page = assets::LOGIN_HTML.replace("<!-- error -->", &error);
    let mut response = (status, Html(page)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Guards `/api`: 401 JSON without the token or a session.
pub(super) async fn require_for_api(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if authorized(&st, req.headers()) { next.run(req).await } else { ApiError::Unauthorized.into_response() }
}

/// Guards the pages and assets: off to `/login` without the token or a
/// session.
pub(super) async fn require_for_page(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if authorized(&st, req.headers()) { next.run(req).await } else { Redirect::to("/login").into_response() }
}

/// `GET /`: the dashboard, or off to `/login`.
pub(super) async fn index(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if authorized(&st, &headers) { assets::index() } else { Redirect::to("/login").into_response() }
}

/// `GET /login`: the form, or straight to the dashboard when signed in.
pub(super) async fn login_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if authorized(&st, &headers) { Redirect::to("/").into_response() } else { login_form(StatusCode::OK, None) }
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

/// `POST /login` with the form field `token`.
pub(super) async fn login(
    State(st): State<AppState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    match form {
        Ok(Form(LoginForm { token })) if matches(&st.token, token.trim()) => signed_in(&st, &headers),
        Ok(_) => {
            failed(&st, peer.map(|Extension(Peer(a))| a), "wrong token").await;
            login_form(StatusCode::UNAUTHORIZED, Some("wrong token"))
        }
        Err(_) => login_form(StatusCode::BAD_REQUEST, Some("enter the hub's token")),
    }
}

/// `GET /login/once/{nonce}`: a one-time link, exchanged for a session.
pub(super) async fn login_once(
    State(st): State<AppState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    nonce: Result<Path<String>, PathRejection>,
) -> Response {
    if let Ok(Path(nonce)) = nonce
        && st.access.links.redeem(&nonce, Instant::now())
    {
        return signed_in(&st, &headers);
    }
    failed(&st, peer.map(|Extension(Peer(a))| a), "a used, expired or unknown login link").await;
    login_form(
        StatusCode::UNAUTHORIZED,
        Some("this login link was already used or has expired; sign in with the hub's token"),
    )
}

/// `POST /logout`: ends the session and forgets the cookie.
pub(super) async fn logout(State(st): State<AppState>, headers: HeaderMap) -> Response {
    for id in session_ids(&headers) {
        st.access.sessions.revoke(id);
    }
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie("", 0, behind_tls(&headers)));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_str(value).expect("test header"));
        }
        map
    }

    #[test]
    fn the_bearer_token_and_every_session_cookie_are_found() {
        assert_eq!(bearer(&headers(&[(header::AUTHORIZATION, "bearer  tok ")])), Some("tok"));
        assert_eq!(bearer(&headers(&[(header::AUTHORIZATION, "Basic tok")])), None);
        let h = headers(&[(header::COOKIE, "a=b; fieldlink_session=s1"), (header::COOKIE, "fieldlink_session=s2")]);
        assert_eq!(session_ids(&h).collect::<Vec<_>>(), ["s1", "s2"]);
        assert_eq!(session_ids(&headers(&[(header::COOKIE, "fieldlink_token=t")])).count(), 0);
    }

    #[test]
    fn the_cookie_is_secure_only_behind_a_tls_proxy() {
        let plain = set_cookie("abc", 60, false);
        assert_eq!(plain, "fieldlink_session=abc; Path=/; HttpOnly; SameSite=Strict; Max-Age=60");
        assert!(set_cookie("abc", 60, true).to_str().expect("ASCII").ends_with("; Secure"));
        assert!(behind_tls(&headers(&[(header::HeaderName::from_static("x-forwarded-proto"), "https")])));
        assert!(!behind_tls(&HeaderMap::new()));
    }
}
