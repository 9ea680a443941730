//! The request context every dialect hands the core: client IP (from the socket) and the
//! preferred locale (from `Accept-Language`).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::ACCEPT_LANGUAGE;
use axum::http::request::Parts;
use otpgate_core::model::RequestContext;

/// Extracts a [`RequestContext`]; never fails.
pub struct Ctx(pub RequestContext);

/// The first language of an `Accept-Language` header (`fa-IR,fa;q=0.9` → `fa-IR`).
pub fn preferred_language(parts: &Parts) -> Option<String> {
    let header = parts.headers.get(ACCEPT_LANGUAGE)?.to_str().ok()?;
    let mut best: Option<(f32, &str)> = None;
    for item in header.split(',') {
        let mut pieces = item.trim().split(';');
        let tag = pieces.next().unwrap_or("").trim();
        if tag.is_empty() || tag == "*" {
            continue;
        }
        let q = pieces
            .find_map(|p| p.trim().strip_prefix("q="))
            .and_then(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        if best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, tag));
        }
    }
    best.map(|(_, tag)| tag.to_owned())
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip().to_string());
        Ok(Ctx(RequestContext {
            ip,
            locale: preferred_language(parts),
            mode: Some("api".into()),
            ..RequestContext::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(header: &str) -> Parts {
        let (parts, ()) = Request::builder()
            .header(ACCEPT_LANGUAGE, header)
            .body(())
            .unwrap_or_default()
            .into_parts();
        parts
    }

    #[test]
    fn the_highest_quality_language_wins() {
        assert_eq!(
            preferred_language(&parts("en;q=0.5, fa-IR")).as_deref(),
            Some("fa-IR")
        );
        assert_eq!(preferred_language(&parts("*")), None);
    }
}
