//! The web panel's entry points so far: `GET /external-login?token=` (option 2 of the ACL
//! document: hand a logged-in user over to the panel), the start page and the login page.
//!
//! The token arrives in a URL, so the damage is limited: the answer is never cached and sends no
//! referrer, the redirect drops the token from the address bar, the cookie holds a new panel
//! session of its own (never the API token), and the request log records the path only.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, REFERRER_POLICY, SET_COOKIE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::{ExposeSecret, SecretString};

use crate::AppState;
use crate::context::Ctx;

/// Name of the panel's session cookie.
pub const SESSION_COOKIE: &str = "otpgate_panel";

/// The panel routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/external-login", get(external_login))
        .route("/", get(start_page))
        .route("/login", get(login_page))
}

fn redirect(to: &'static str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(LOCATION, HeaderValue::from_static(to));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// Whether the client reached us over TLS (directly or through a proxy that says so).
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

async fn external_login(
    State(state): State<AppState>,
    Ctx(mut ctx): Ctx,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    ctx.mode = Some("panel".into());
    let Some(token) = query.get("token").filter(|t| !t.trim().is_empty()) else {
        return redirect("/login?error=invalid_token");
    };
    match state
        .core
        .open_panel_session(&SecretString::from(token.clone()), &ctx)
        .await
    {
        Ok(issued) => {
            let max_age = (issued.expires_at - state.core.clock().now()).whole_seconds();
            let cookie = session_cookie(&issued.token, max_age, &headers);
            let mut response = redirect("/");
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(SET_COOKIE, value);
            }
            response
        }
        Err(otpgate_core::CoreError::Unauthorized) => redirect("/login?error=invalid_token"),
        Err(e) => {
            tracing::error!(error = %e, "external login failed");
            redirect("/login?error=unavailable")
        }
    }
}

/// The `Set-Cookie` value of a panel session: HttpOnly, SameSite=Lax, Secure over TLS.
pub fn session_cookie(token: &SecretString, max_age: i64, headers: &HeaderMap) -> String {
    let secure = if over_tls(headers) { "; Secure" } else { "" };
    format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
        token.expose_secret(),
        max_age.max(0)
    )
}

fn cookie_token(headers: &HeaderMap) -> Option<SecretString> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| SecretString::from(value.to_owned()))
}

fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '&' => "&amp;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            other => other.to_string(),
        })
        .collect()
}

fn page(title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"fa\" dir=\"rtl\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title></head><body>{body}</body></html>"
    );
    let mut response = (StatusCode::OK, html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

async fn start_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(token) = cookie_token(&headers) else {
        return redirect("/login");
    };
    match state.core.authenticate_session(&token).await {
        Ok((_, user)) => page(
            "otpgate",
            &format!(
                "<main><h1>otpgate</h1><p>وارد شده با نام کاربری <strong>{}</strong></p>\
                 <p lang=\"en\" dir=\"ltr\">Signed in as <strong>{}</strong></p></main>",
                escape(user.username.as_str()),
                escape(user.username.as_str())
            ),
        ),
        Err(_) => redirect("/login"),
    }
}

async fn login_page(Query(query): Query<HashMap<String, String>>) -> Response {
    // Only fixed texts are shown: nothing from the query is reflected.
    let notice = match query.get("error").map(String::as_str) {
        Some("invalid_token") => {
            "<p role=\"alert\">لینک ورود معتبر نیست یا منقضی شده است. / The sign-in link is invalid or has expired.</p>"
        }
        Some(_) => "<p role=\"alert\">ورود ممکن نشد. / Sign-in failed.</p>",
        None => "",
    };
    page(
        "ورود | otpgate",
        &format!("<main><h1>ورود</h1>{notice}<p>برای ورود از برنامه خود وارد شوید.</p></main>"),
    )
}
