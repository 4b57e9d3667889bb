//! The token: where a request may present it (`Authorization: Bearer` or
//! the `fieldlink_token` cookie), the check (constant-time, through
//! `hub::token::matches`), the two middlewares that guard the API (401
//! JSON) and the pages (redirect to `/login`), and the public entry points:
//! `/login`, `/logout` and `/` with its `?token=` shortcut (the URL
//! `fieldlink demo` prints).
//!
//! The cookie is HttpOnly (no script reads it), SameSite=Strict (no other
//! site can make the browser send it, which is what protects the
//! state-changing `POST`s), Path=/, and kept for 30 days. It is not marked
//! Secure because the hub serves plain HTTP by default; put it behind a TLS
//! proxy when it leaves localhost.

use std::collections::HashMap;

use axum::Form;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::{ApiError, AppState, assets};
use crate::hub::token::matches;

/// The cookie's name.
pub(super) const COOKIE: &str = "fieldlink_token";

/// How long the browser keeps the cookie: 30 days.
const COOKIE_MAX_AGE_S: u64 = 30 * 24 * 60 * 60;

/// The token of `Authorization: Bearer <token>`, if that header is there.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Every `fieldlink_token` cookie the request carries, decoded.
fn cookie_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).filter_map(
        |pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name.trim() == COOKIE).then(|| decode_cookie(value.trim()))
        },
    )
}

/// Whether the request presents the right token, by either means.
pub(super) fn authorized(expected: &str, headers: &HeaderMap) -> bool {
    // Every candidate is compared, so the time does not tell which matched.
    let mut ok = bearer(headers).is_some_and(|t| matches(expected, t));
    for presented in cookie_tokens(headers) {
        ok |= matches(expected, &presented);
    }
    ok
}

/// Bytes a cookie value may hold as they are (RFC 6265 cookie-octet, minus
/// `%`, which starts an escape).
fn cookie_safe(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x24 | 0x26..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

/// Percent-encodes what a cookie value cannot hold, so any token (even one
/// hand-edited into the token file) survives the round trip.
fn encode_cookie(token: &str) -> String {
    let mut out = String::with_capacity(token.len());
    for &b in token.as_bytes() {
        if cookie_safe(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_cookie(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], escaped) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn set_cookie(value: &str, max_age_s: u64) -> HeaderValue {
    let cookie = format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}");
    HeaderValue::from_str(&cookie).expect("an encoded cookie is visible ASCII")
}

/// The answer to a right token: the cookie, and off to the dashboard.
fn signed_in(token: &str) -> Response {
    let mut response = Redirect::to("/").into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie(&encode_cookie(token), COOKIE_MAX_AGE_S));
    response
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

/// Guards `/api`: 401 JSON without the token.
pub(super) async fn require_for_api(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if authorized(&st.token, req.headers()) { next.run(req).await } else { ApiError::Unauthorized.into_response() }
}

/// Guards the pages and assets: off to `/login` without the token.
pub(super) async fn require_for_page(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if authorized(&st.token, req.headers()) { next.run(req).await } else { Redirect::to("/login").into_response() }
}

/// `GET /`: the dashboard; or, with `?token=`, the cookie and a redirect to
/// the clean URL.
pub(super) async fn index(
    State(st): State<AppState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if let Ok(Query(query)) = &query
        && let Some(presented) = query.get("token")
    {
        return if matches(&st.token, presented.trim()) {
            signed_in(&st.token)
        } else {
            login_form(StatusCode::UNAUTHORIZED, Some("wrong token"))
        };
    }
    if authorized(&st.token, &headers) { assets::index() } else { Redirect::to("/login").into_response() }
}

/// `GET /login`: the form, or straight to the dashboard when signed in.
pub(super) async fn login_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if authorized(&st.token, &headers) { Redirect::to("/").into_response() } else { login_form(StatusCode::OK, None) }
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

/// `POST /login` with the form field `token`.
pub(super) async fn login(State(st): State<AppState>, form: Result<Form<LoginForm>, FormRejection>) -> Response {
    match form {
        Ok(Form(LoginForm { token })) if matches(&st.token, token.trim()) => signed_in(&st.token),
        Ok(_) => login_form(StatusCode::UNAUTHORIZED, Some("wrong token")),
        Err(_) => login_form(StatusCode::BAD_REQUEST, Some("enter the hub's token")),
    }
}

/// `GET /logout`: forgets the cookie.
pub(super) async fn logout() -> Response {
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie("", 0));
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
    fn a_bearer_header_or_the_cookie_authorizes() {
        assert!(authorized("tok", &headers(&[(header::AUTHORIZATION, "Bearer tok")])));
        assert!(authorized("tok", &headers(&[(header::AUTHORIZATION, "bearer  tok ")])));
        assert!(authorized("tok", &headers(&[(header::COOKIE, "a=b; fieldlink_token=tok; c=d")])));
        assert!(authorized("tok", &headers(&[(header::COOKIE, "a=b"), (header::COOKIE, "fieldlink_token=tok")])));
        assert!(!authorized("tok", &headers(&[(header::AUTHORIZATION, "Basic tok")])));
        assert!(!authorized("tok", &headers(&[(header::COOKIE, "other_token=tok")])));
        assert!(!authorized("tok", &HeaderMap::new()));
    }

    #[test]
    fn a_wrong_bearer_does_not_hide_a_right_cookie() {
        let h = headers(&[(header::AUTHORIZATION, "Bearer old"), (header::COOKIE, "fieldlink_token=tok")]);
        assert!(authorized("tok", &h));
    }

    #[test]
    fn any_token_survives_the_cookie_round_trip() {
        for token in ["abc123", "with space;and,comma", "100%", "quote\"back\\slash", "ünïcode"] {
            let encoded = encode_cookie(token);
            assert!(encoded.bytes().all(|b| cookie_safe(b) || b == b'%'), "{encoded}");
            assert_eq!(decode_cookie(&encoded), token);
        }
        assert_eq!(encode_cookie("0123abcdef"), "0123abcdef");
    }
}
