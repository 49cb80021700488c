//! The web console for operators, served under `/console` from files compiled into the
//! binary (`control-api/console/`): plain HTML, CSS and ES modules, no build step and no
//! third-party code, so it works on a site network with no Internet access. It uses only
//! the public HTTP API with the API key the operator signs in with.
//!
//! Every answer carries a Content-Security-Policy that lets the page load only these files
//! and talk only to this API and the storage endpoint presigned URLs point at (the
//! browser's direct uploads), plus `nosniff`, `no-referrer` and no framing. Files are
//! revalidated on every load (`no-cache` with an ETag), so an upgraded API never serves a
//! stale mix of modules.

use std::sync::OnceLock;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use crate::http::no_such_endpoint;
use crate::AppState;

/// One file of the console.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../../console/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("js/app.js", JS),
    asset!("js/api.js", JS),
    asset!("js/ui.js", JS),
    asset!("js/feed.js", JS),
    asset!("js/fleet.js", JS),
    asset!("js/uploads.js", JS),
    asset!("js/session.js", JS),
    asset!("js/projects.js", JS),
    asset!("js/upload.js", JS),
    asset!("js/hash.js", JS),
];

fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// A strong ETag per file, computed once.
fn etag(asset: &Asset) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| format!("\"{}\"", &hex::encode(Sha256::digest(a.body))[..32]))
            .collect()
    });
    ASSETS
        .iter()
        .position(|a| a.name == asset.name)
        .and_then(|i| tags.get(i))
        .map_or("\"\"", String::as_str)
}

/// The origin (`scheme://host[:port]`) of an endpoint URL, for `connect-src`.
pub fn origin_of(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    match parsed.origin() {
        url::Origin::Tuple(..) => Some(parsed.origin().ascii_serialization()),
        url::Origin::Opaque(_) => None,
    }
}

/// The policy: this API's own files and calls, plus the storage endpoint for uploads.
pub fn content_security_policy(storage_endpoint: &str) -> String {
    let storage = origin_of(storage_endpoint)
        .map(|o| format!(" {o}"))
        .unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{storage}; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
}

fn serve(st: &AppState, asset: &'static Asset, headers: &HeaderMap) -> Response {
    let tag = etag(asset);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let csp = content_security_policy(st.config.public_endpoint());
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = response.headers_mut();
    let static_headers = [
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ];
    for (name, value) in static_headers {
        h.insert(name, HeaderValue::from_static(value));
    }
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    response
}

async fn index(State(st): State<AppState>, headers: HeaderMap) -> Response {
    match find("index.html") {
        Some(a) => serve(&st, a, &headers),
        None => no_such_endpoint().into_response(),
    }
}

async fn file(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    match find(&name).filter(|a| a.name != "index.html") {
        Some(a) => serve(&st, a, &headers),
        None => no_such_endpoint().into_response(),
    }
}

/// `/console` (redirected to `/console/`), `/console/` and its files.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route("/console/", get(index))
        .route("/console/{*name}", get(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_distinct_and_typed() {
        for (i, a) in ASSETS.iter().enumerate() {
            assert!(!a.body.is_empty(), "{} is empty", a.name);
            assert!(
                ASSETS[..i].iter().all(|b| b.name != a.name),
                "{} listed twice",
                a.name
            );
            assert_ne!(etag(a), "\"\"");
        }
    }

    #[test]
    fn the_policy_names_only_self_and_storage() {
        let csp = content_security_policy("https://s3.example:9000/some/path");
        assert!(
            csp.contains("connect-src 'self' https://s3.example:9000;"),
            "{csp}"
        );
        assert!(csp.contains("script-src 'self';"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(origin_of("not a url"), None);
    }

    #[test]
    fn scripts_are_modules_without_inline_code_or_remote_urls() {
        let html = std::str::from_utf8(find("index.html").expect("index").body).expect("utf-8");
        assert!(!html.contains("<script>"), "inline script in index.html");
        assert!(
            !html
                .split_whitespace()
                .any(|w| w.starts_with("on") && w.contains('=')),
            "inline event handler in index.html"
        );
        for a in ASSETS {
            let text = String::from_utf8_lossy(a.body);
            assert!(
                a.name == "favicon.svg" || !(text.contains("https://") || text.contains("http://")),
                "{} names a remote URL",
                a.name
            );
        }
    }
}
