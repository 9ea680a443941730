//! otpgate's HTTP surface: shared state, layers, the operations endpoints and one module per
//! dialect. Each dialect has its own DTOs and error envelope over the same core calls; handlers
//! extract, call one core operation, and render.

pub mod api;
pub mod context;
pub mod ops;
pub mod panel;
pub mod qr;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, header};
use otpgate_core::Otpgate;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

/// Largest request body accepted by any endpoint.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The core service.
    pub core: Arc<Otpgate>,
}

/// RFC 3339 at millisecond precision, the precision the stores keep.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(u32::from(t.millisecond()) * 1_000_000)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn default_header(name: HeaderName, value: &'static str) -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::if_not_present(name, HeaderValue::from_static(value))
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(ops::router())
        .merge(api::v1::router())
        .merge(api::acl::router())
        .merge(api::verify_login::router())
        .merge(api::digipay::router())
        .merge(panel::router())
        .fallback(api::v1::not_found)
        .method_not_allowed_fallback(api::v1::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Every answer: never cached (answers carry tickets, tokens and codes' fates), no
        // referrer, no sniffing or framing, and a CSP under which a page loads nothing.
        .layer(default_header(header::CACHE_CONTROL, "no-store"))
        .layer(default_header(header::REFERRER_POLICY, "no-referrer"))
        .layer(default_header(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(default_header(header::X_FRAME_OPTIONS, "DENY"))
        .layer(default_header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ))
        .layer(
            // Spans name method and path only: query strings and bodies may carry secrets.
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                tracing::info_span!("http", method = %req.method(), path = %req.uri().path())
            }),
        )
        .with_state(state)
}
