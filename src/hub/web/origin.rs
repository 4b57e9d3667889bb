//! The cross-site request check (CSRF): a state-changing request (any
//! method but GET, HEAD and OPTIONS) that a browser sends from another
//! origin is refused with 403 before it reaches a handler, whatever cookie
//! it carries. SameSite=Strict alone is not enough: a page on another port
//! of the same host is "same site". Owns only the decision from the
//! headers; it must not look at the body or the credentials.
//!
//! * `Sec-Fetch-Site` (every current browser sends it): only `same-origin`
//!   and `none` (typed or bookmarked) pass.
//! * Otherwise `Origin`, if present, must be `http://<Host>` or
//!   `https://<Host>`; `null` never passes.
//! * A request with neither header is not from a browser (curl, a script
//!   with `Authorization: Bearer`) and passes.

use axum::http::{HeaderMap, Method, header};

/// Why the request is refused, or `None` when it may go on.
pub(super) fn cross_origin(method: &Method, headers: &HeaderMap) -> Option<String> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("?");
        return (!matches!(site, "same-origin" | "none")).then(|| format!("Sec-Fetch-Site is '{site}'"));
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("?");
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let same = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host));
    (!same).then(|| format!("Origin '{origin}' is not this hub ({host})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_post_from_another_port_is_refused_and_one_from_this_origin_passes() {
        let host = ("host", "127.0.0.1:8080");
        let post = Method::POST;
        assert_eq!(cross_origin(&post, &headers(&[host, ("origin", "http://127.0.0.1:8080")])), None);
        assert!(cross_origin(&post, &headers(&[host, ("origin", "http://127.0.0.1:9999")])).is_some());
        assert!(cross_origin(&post, &headers(&[host, ("origin", "null")])).is_some());
        assert!(cross_origin(&Method::DELETE, &headers(&[host, ("origin", "http://evil.example")])).is_some());
    }

    #[test]
    fn sec_fetch_site_decides_when_the_browser_sends_it() {
        let post = Method::POST;
        assert_eq!(cross_origin(&post, &headers(&[("sec-fetch-site", "same-origin")])), None);
        assert_eq!(cross_origin(&post, &headers(&[("sec-fetch-site", "none")])), None);
        for site in ["same-site", "cross-site"] {
            let h = headers(&[("sec-fetch-site", site), ("host", "a:1"), ("origin", "http://a:1")]);
            assert!(cross_origin(&post, &h).is_some(), "{site}");
        }
    }

    #[test]
    fn a_client_that_is_not_a_browser_and_every_get_pass() {
        assert_eq!(cross_origin(&Method::POST, &headers(&[("authorization", "Bearer x")])), None);
        assert_eq!(cross_origin(&Method::GET, &headers(&[("sec-fetch-site", "cross-site")])), None);
    }
}
