//! The "Verify Login OTP" endpoint (dialect verify_login), at `POST /api/verify_login_otp`, in
//! JSON or as a browser form. Answers `{"status_code": 0..5, "message", ...}`:
//! 0 error, 1 logged in (`url`), 2 validation error, 3 code required, 4 e-mail next (`email`),
//! 5 mobile next. Fields beyond the document's (`token`, `expires_at`, `retry_after`) are added,
//! never changed.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use otpgate_core::code::normalize_digit;
use otpgate_core::model::Role;
use otpgate_core::service::{VerifyLogin, VerifyLoginOutcome, VerifyType};
use otpgate_core::{CoreError, StoreError};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::context::Ctx;
use crate::panel::session_cookie;

/// The route.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/verify_login_otp", post(verify_login_otp))
}

/// An answer: HTTP status, body, and the headers some answers carry.
struct Answer {
    http: StatusCode,
    body: Value,
    retry_after: Option<u64>,
    cookie: Option<String>,
}

impl Answer {
    fn new(status_code: u8, message: impl Into<String>) -> Self {
        Answer {
            http: StatusCode::OK,
            body: json!({"status_code": status_code, "message": message.into()}),
            retry_after: None,
            cookie: None,
        }
    }

    fn with(mut self, field: &str, value: Value) -> Self {
        if let Value::Object(map) = &mut self.body {
            map.insert(field.to_owned(), value);
        }
        self
    }

    fn validation(message: impl Into<String>) -> Self {
        Answer::new(2, message)
    }

    /// The one mapping from core errors to this dialect's answers.
    fn from_core(e: CoreError) -> Self {
        match &e {
            CoreError::InvalidInput { field, reason } => {
                let field = if *field == "code" { "otp" } else { field };
                Answer::validation(format!("{field} {reason}"))
            }
            CoreError::InvalidCredentials | CoreError::Unauthorized => {
                Answer::new(0, "Invalid username or password")
            }
            CoreError::CodeRejected { .. } | CoreError::CodeExpired => {
                Answer::new(0, "Invalid otp entered")
            }
            CoreError::RateLimited { retry_after } => {
                let seconds = retry_after.as_secs().max(1);
                let mut answer = Answer::new(
                    0,
                    format!("Too many requests, try again in {seconds} seconds"),
                )
                .with("retry_after", json!(seconds));
                answer.http = StatusCode::TOO_MANY_REQUESTS;
                answer.retry_after = Some(seconds);
                answer
            }
            CoreError::Conflict(why) => Answer::new(0, capitalise(why)),
            CoreError::NotFound => Answer::new(0, "Not found"),
            CoreError::Storage(StoreError::Unavailable(_)) => {
                tracing::error!(error = %e, "store unavailable");
                let mut answer = Answer::new(0, "Service temporarily unavailable");
                answer.http = StatusCode::SERVICE_UNAVAILABLE;
                answer
            }
            CoreError::Storage(_)
            | CoreError::Delivery(_)
            | CoreError::WrongMasterKey
            | CoreError::Internal(_) => {
                tracing::error!(error = %e, "request failed");
                let mut answer = Answer::new(0, "Internal server error");
                answer.http = StatusCode::INTERNAL_SERVER_ERROR;
                answer
            }
        }
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut response = (self.http, Json(self.body)).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(value) = self.cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
            headers.insert(SET_COOKIE, value);
        }
        response
    }
}

/// The body as a map of fields, from JSON or from a form (whose values are all strings).
struct Fields(Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for Fields {
    type Rejection = Answer;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                let mut answer = Answer::validation("The request body is too large");
                answer.http = StatusCode::PAYLOAD_TOO_LARGE;
                answer
            } else {
                Answer::validation("The request body could not be read")
            }
        })?;
        if content_type.starts_with("application/json") {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(map)) => Ok(Fields(map)),
                _ => Err(Answer::validation(
                    "The request body is not a valid JSON object",
                )),
            }
        } else if content_type.starts_with("application/x-www-form-urlencoded") {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
                .map_err(|_| Answer::validation("The form could not be read"))?;
            Ok(Fields(
                pairs
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect(),
            ))
        } else {
            let mut answer = Answer::validation(
                "Send the request as application/json or application/x-www-form-urlencoded",
            );
            answer.http = StatusCode::UNSUPPORTED_MEDIA_TYPE;
            Err(answer)
        }
    }
}

/// A validated request.
struct Parsed {
    username: String,
    password: String,
    latitude: f64,
    longitude: f64,
    req_mode: ReqMode,
    verify_type: VerifyType,
    code: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReqMode {
    Web,
    App,
}

impl Fields {
    fn text(&self, name: &str) -> Result<String, String> {
        match self.0.get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            None | Some(Value::Null) | Some(Value::String(_)) => Err(format!("{name} is required")),
            Some(_) => Err(format!("{name} must be a string")),
        }
    }

    fn coordinate(&self, name: &str, limit: f64) -> Result<f64, String> {
        let text = self.text(name)?;
        let value: f64 = text
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| format!("{name} must be a number"))?;
        if value.abs() > limit {
            return Err(format!("{name} must be between -{limit} and {limit}"));
        }
        Ok(value)
    }

    /// One digit, given as a JSON number or a one-character string (any script's digit).
    fn digit(&self, name: &str) -> Result<char, String> {
        let bad = || format!("{name} must be a single digit");
        match self.0.get(name) {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(d @ 0..=9) => char::from_digit(d as u32, 10).ok_or_else(bad),
                _ => Err(bad()),
            },
            Some(Value::String(s)) if !s.trim().is_empty() => {
                let mut chars = s.trim().chars().map(normalize_digit);
                match (chars.next(), chars.next()) {
                    (Some(c), None) if c.is_ascii_digit() => Ok(c),
                    _ => Err(bad()),
                }
            }
            None | Some(Value::Null) | Some(Value::String(_)) => Err(format!("{name} is required")),
            Some(_) => Err(bad()),
        }
    }

    fn parse(&self) -> Result<Parsed, String> {
        let username = self.text("username")?;
        let password = match self.0.get("password") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err("password is required".to_owned()),
        };
        let latitude = self.coordinate("latitude", 90.0)?;
        let longitude = self.coordinate("longitude", 180.0)?;
        let req_mode = match self.text("req_mode")?.as_str() {
            "web" => ReqMode::Web,
            "app" => ReqMode::App,
            _ => return Err("req_mode must be web or app".to_owned()),
        };
        let verify_type = VerifyType::parse(&self.text("verify_type")?).ok_or_else(|| {
            "verify_type must be mobile_verify, email_verify or login_verify".to_owned()
        })?;
        const DIGITS: [&str; 6] = ["otp1", "otp2", "otp3", "otp4", "otp5", "otp6"];
        let any_digit = DIGITS.iter().any(|d| {
            !matches!(self.0.get(*d), None | Some(Value::Null))
                && self.0.get(*d) != Some(&Value::String(String::new()))
        });
        let code = if any_digit {
            let mut code = String::with_capacity(6);
            for name in DIGITS {
                code.push(self.digit(name)?);
            }
            Some(code)
        } else {
            None
        };
        Ok(Parsed {
            username,
            password,
            latitude,
            longitude,
            req_mode,
            verify_type,
            code,
        })
    }
}

async fn verify_login_otp(
    State(state): State<AppState>,
    Ctx(mut ctx): Ctx,
    headers: HeaderMap,
    fields: Result<Fields, Answer>,
) -> Answer {
    ctx.mode = Some("verify_login".into());
    let tenant = match state.core.default_tenant().await {
        Ok(t) => t.id,
        Err(e) => return Answer::from_core(e),
    };
    let parsed = match fields.and_then(|f| f.parse().map_err(Answer::validation)) {
        Ok(p) => p,
        Err(answer) => {
            let reason = answer
                .body
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("invalid request")
                .to_owned();
            if let Err(e) = state
                .core
                .record_rejected_request(&tenant, &reason, &ctx)
                .await
            {
                return Answer::from_core(e);
            }
            return answer;
        }
    };
    ctx.latitude = Some(parsed.latitude);
    ctx.longitude = Some(parsed.longitude);
    ctx.mode = Some(match parsed.req_mode {
        ReqMode::Web => "web".into(),
        ReqMode::App => "app".into(),
    });
    let request = VerifyLogin {
        username: parsed.username,
        password: SecretString::from(parsed.password),
        verify_type: parsed.verify_type,
        code: parsed.code,
    };
    match state.core.verify_login(&tenant, request, &ctx).await {
        Ok(VerifyLoginOutcome::CodeRequired) => Answer::new(3, "Login Verification Required"),
        Ok(VerifyLoginOutcome::EmailNext { email }) => {
            Answer::new(4, "Mobile Verified, Email Verification Required")
                .with("email", json!(email))
        }
        Ok(VerifyLoginOutcome::MobileNext) => {
            Answer::new(5, "Email Verified, Mobile Verification Required")
        }
        Ok(VerifyLoginOutcome::LoggedIn(issued)) => {
            let url = match issued.user.role {
                Role::Admin => "admin-dashboard",
                Role::User => "dashboard",
            };
            let mut answer = Answer::new(1, "Login Successful").with("url", json!(url));
            let now = state.core.clock().now();
            answer.cookie = Some(session_cookie(
                &issued.token,
                (issued.expires_at - now).whole_seconds(),
                &headers,
            ));
            if parsed.req_mode == ReqMode::App {
                answer = answer
                    .with("token", json!(issued.token.expose_secret()))
                    .with("expires_at", json!(crate::rfc3339(issued.expires_at)));
            }
            answer
        }
        Err(e) => Answer::from_core(e),
    }
}
