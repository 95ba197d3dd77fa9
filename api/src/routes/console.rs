//! The web console: static assets compiled into the binary and served at `/console`.
//!
//! The assets hold no data, so they need no key; the page asks for the tenant's key and sends it
//! on every `/v1` call itself. Nothing is read from disk at run time, so a deployed binary always
//! serves the console it was built with.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// The only sources the page may load from or talk to: its own origin. No inline script or style,
/// so an injected string cannot run even if escaping failed somewhere.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: HeaderValue,
}

impl Asset {
    fn new(name: &'static str, content_type: &'static str, body: &'static [u8]) -> Self {
        let digest = Sha256::digest(body);
        let etag = HeaderValue::from_str(&format!("\"{}\"", hex::encode(&digest[..12])))
            .expect("a hex ETag is a valid header value");
        Self {
            name,
            content_type,
            body,
            etag,
        }
    }
}

/// One embedded asset: `asset!("name", "content type")` includes `api/console/name`.
macro_rules! asset {
    ($name:literal, $type:literal) => {
        Asset::new(
            $name,
            $type,
            include_bytes!(concat!("../../console/", $name)),
        )
    };
}

/// The page first: [`index`] serves it.
static ASSETS: LazyLock<[Asset; 7]> = LazyLock::new(|| {
    [
        asset!("index.html", "text/html; charset=utf-8"),
        asset!("app.js", "text/javascript; charset=utf-8"),
        asset!("api.js", "text/javascript; charset=utf-8"),
        asset!("ui.js", "text/javascript; charset=utf-8"),
        asset!("batch.js", "text/javascript; charset=utf-8"),
        asset!("style.css", "text/css; charset=utf-8"),
        asset!("icon.svg", "image/svg+xml"),
    ]
});

/// `/console`, `/console/` (the page) and `/console/{asset}`; no state, no key.
pub(crate) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/{asset}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve(&ASSETS[0], &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(found) => serve(found, &headers),
        None => ApiError::NotFound {
            message: "No such console asset.".to_owned(),
        }
        .into_response(),
    }
}

fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let unchanged = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|t| t.trim() == "*" || t.trim() == asset.etag)
        });
    // `no-cache` = revalidate every time: the names are not fingerprinted, so a page and a script
    // from two different builds must never meet; the ETag keeps the revalidation a bodiless 304.
    let headers = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, asset.etag.clone()),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
    ];
    if unchanged {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (
        headers,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        )],
        asset.body,
    )
        .into_response()
}
