//! The fintech's phone verification ("dialect digipay"): `POST /digipay/v3/auth/send_otp` and
//! `POST /digipay/v3/auth/verify_otp`, authenticated by an API client of the tenant
//! (`Authorization: Token …`) under the tenant's `CompanyID`. Answers
//! `{"success": 1|0, "error": [codes], "data": {...}}`; the numeric error codes are:
//!
//! | code | meaning |
//! |---|---|
//! | 1001 | a required field is missing or empty |
//! | 1002 | a field has the wrong type, value or length |
//! | 1003 | the dial code or phone number is not valid |
//! | 1004 | wrong code (attempts remain) |
//! | 1005 | no live code: expired, used, or never sent |
//! | 1006 | too many wrong codes: ask for a new one |
//! | 1007 | too many requests: retry after `data.retry_after` seconds |
//! | 1008 | the e-mail address is not valid |
//! | 1009 | the body is not a JSON object |

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use otpgate_core::model::{Channel, TenantId};
use otpgate_core::service::{DeviceInfo, MAX_DEVICE_FIELD, PhoneIdentity};
use otpgate_core::{CoreError, StoreError};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::context::Ctx;

/// The digipay routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/digipay/v3/auth/send_otp", post(send_otp))
        .route("/digipay/v3/auth/verify_otp", post(verify_otp))
}

/// The documented error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u16)]
pub enum ErrorCode {
    /// A required field is missing or empty.
    MissingField = 1001,
    /// A field has the wrong type, value or length.
    InvalidField = 1002,
    /// The dial code or phone number is not valid.
    InvalidPhone = 1003,
    /// Wrong code.
    WrongCode = 1004,
    /// No live code.
    ExpiredCode = 1005,
    /// Too many wrong codes.
    TooManyAttempts = 1006,
    /// Too many requests.
    RateLimited = 1007,
    /// Invalid e-mail address.
    InvalidEmail = 1008,
    /// Not a JSON object.
    MalformedBody = 1009,
}

/// A digipay error answer.
#[derive(Debug)]
pub struct DigipayError {
    status: StatusCode,
    codes: Vec<ErrorCode>,
    fields: Vec<String>,
    retry_after: Option<u64>,
}

impl DigipayError {
    fn new(status: StatusCode, codes: Vec<ErrorCode>) -> Self {
        DigipayError {
            status,
            codes,
            fields: Vec::new(),
            retry_after: None,
        }
    }

    fn bad(code: ErrorCode, field: &str) -> Self {
        DigipayError {
            fields: vec![field.to_owned()],
            ..DigipayError::new(StatusCode::BAD_REQUEST, vec![code])
        }
    }

    fn unauthorized() -> Self {
        DigipayError::new(StatusCode::UNAUTHORIZED, Vec::new())
    }

    /// The one mapping from core errors to digipay answers.
    fn from_core(e: CoreError) -> Self {
        match &e {
            CoreError::InvalidInput { field, .. } => {
                let code = match *field {
                    "phone" | "phone_number" | "dial_code" => ErrorCode::InvalidPhone,
                    "email" | "to" => ErrorCode::InvalidEmail,
                    _ => ErrorCode::InvalidField,
                };
                let field = if *field == "code" { "otp" } else { field };
                DigipayError::bad(code, field)
            }
            CoreError::CodeRejected {
                attempts_left: Some(0),
            } => DigipayError::new(StatusCode::BAD_REQUEST, vec![ErrorCode::TooManyAttempts]),
            CoreError::CodeRejected { .. } => {
                DigipayError::new(StatusCode::BAD_REQUEST, vec![ErrorCode::WrongCode])
            }
            CoreError::CodeExpired => {
                DigipayError::new(StatusCode::BAD_REQUEST, vec![ErrorCode::ExpiredCode])
            }
            CoreError::RateLimited { retry_after } => DigipayError {
                retry_after: Some(retry_after.as_secs().max(1)),
                ..DigipayError::new(StatusCode::TOO_MANY_REQUESTS, vec![ErrorCode::RateLimited])
            },
            CoreError::InvalidCredentials | CoreError::Unauthorized => DigipayError::unauthorized(),
            CoreError::NotFound => DigipayError::new(StatusCode::NOT_FOUND, Vec::new()),
            CoreError::Conflict(_) | CoreError::Storage(StoreError::Conflict(_)) => {
                DigipayError::new(StatusCode::BAD_REQUEST, vec![ErrorCode::InvalidField])
            }
            CoreError::Storage(StoreError::Unavailable(_)) => {
                tracing::error!(error = %e, "store unavailable");
                DigipayError::new(StatusCode::SERVICE_UNAVAILABLE, Vec::new())
            }
            CoreError::Storage(_)
            | CoreError::Delivery(_)
            | CoreError::WrongMasterKey
            | CoreError::Internal(_) => {
                tracing::error!(error = %e, "request failed");
                DigipayError::new(StatusCode::INTERNAL_SERVER_ERROR, Vec::new())
            }
        }
    }
}

fn status_message(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "BAD_REQUEST",
        StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
        StatusCode::NOT_FOUND => "NOT_FOUND",
        StatusCode::TOO_MANY_REQUESTS => "TOO_MANY_REQUESTS",
        StatusCode::PAYLOAD_TOO_LARGE => "PAYLOAD_TOO_LARGE",
        StatusCode::SERVICE_UNAVAILABLE => "SERVICE_UNAVAILABLE",
        _ => "INTERNAL_SERVER_ERROR",
    }
}

impl IntoResponse for DigipayError {
    fn into_response(self) -> Response {
        let mut codes = self.codes;
        codes.sort_unstable();
        codes.dedup();
        let mut data = Map::new();
        data.insert("message".into(), json!(status_message(self.status)));
        if !self.fields.is_empty() {
            data.insert("fields".into(), json!(self.fields));
        }
        if let Some(seconds) = self.retry_after {
            data.insert("retry_after".into(), json!(seconds));
        }
        let body = json!({
            "success": 0,
            "error": codes.iter().map(|c| *c as u16).collect::<Vec<_>>(),
            "data": data,
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The tenant of a valid API client (`Authorization: Token …`) under its own `CompanyID`.
pub struct Client(TenantId);

impl FromRequestParts<AppState> for Client {
    type Rejection = DigipayError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(DigipayError::unauthorized)?
            .trim();
        let token = header
            .strip_prefix("Token ")
            .or_else(|| header.strip_prefix("Bearer "))
            .ok_or_else(DigipayError::unauthorized)?;
        let tenant = state
            .core
            .authenticate_api_key(&SecretString::from(token.trim().to_owned()))
            .await
            .map_err(DigipayError::from_core)?;
        let company = parts
            .headers
            .get("companyid")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| TenantId::parse(v).ok())
            .ok_or_else(|| DigipayError::new(StatusCode::NOT_FOUND, Vec::new()))?;
        if company != tenant {
            // A client of one company never acts for another: an unknown company is not
            // found, any other refused. Its own company exists (the key belongs to it), so only
            // here is the company looked up: one read less on every request.
            state
                .core
                .tenant(&company)
                .await
                .map_err(DigipayError::from_core)?;
            return Err(DigipayError::unauthorized());
        }
        Ok(Client(tenant))
    }
}

/// The body: a JSON object.
pub struct Body(Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = DigipayError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            DigipayError::new(
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                },
                vec![ErrorCode::MalformedBody],
            )
        })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(Body(map)),
            _ => Err(DigipayError::new(
                StatusCode::BAD_REQUEST,
                vec![ErrorCode::MalformedBody],
            )),
        }
    }
}

/// Collects every field problem, so one answer names them all.
struct Reader<'a> {
    body: &'a Map<String, Value>,
    problems: Vec<(ErrorCode, String)>,
}

impl<'a> Reader<'a> {
    fn new(body: &'a Map<String, Value>) -> Self {
        Reader {
            body,
            problems: Vec::new(),
        }
    }

    fn problem(&mut self, code: ErrorCode, field: &str) {
        self.problems.push((code, field.to_owned()));
    }

    /// A string (numbers are taken as their digits); `None` after recording a problem.
    fn text(&mut self, field: &str, max: usize) -> Option<String> {
        let value = match self.body.get(field) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
            Some(Value::Number(n)) => n.to_string(),
            None | Some(Value::Null) | Some(Value::String(_)) => {
                self.problem(ErrorCode::MissingField, field);
                return None;
            }
            Some(_) => {
                self.problem(ErrorCode::InvalidField, field);
                return None;
            }
        };
        if value.chars().count() > max {
            self.problem(ErrorCode::InvalidField, field);
            return None;
        }
        Some(value)
    }

    /// An integer in `range`, given as a number or a numeric string.
    fn int(&mut self, field: &str, range: std::ops::RangeInclusive<u64>) -> Option<u64> {
        let text = self.text(field, 20)?;
        match text.parse::<u64>() {
            Ok(n) if range.contains(&n) => Some(n),
            _ => {
                self.problem(ErrorCode::InvalidField, field);
                None
            }
        }
    }

    /// `android`, `ios`, `web`, or their integer codes 1, 2, 3.
    fn device_type(&mut self) -> Option<String> {
        let text = self.text("device_type", 16)?.to_ascii_lowercase();
        match text.as_str() {
            "1" | "android" => Some("android".into()),
            "2" | "ios" => Some("ios".into()),
            "3" | "web" => Some("web".into()),
            _ => {
                self.problem(ErrorCode::InvalidField, "device_type");
                None
            }
        }
    }

    fn finish(self) -> Result<(), DigipayError> {
        if self.problems.is_empty() {
            return Ok(());
        }
        let (codes, fields) = self.problems.into_iter().unzip();
        Err(DigipayError {
            fields,
            ..DigipayError::new(StatusCode::BAD_REQUEST, codes)
        })
    }
}

/// Reads the identity and device fields both endpoints take.
fn identity_and_device(reader: &mut Reader<'_>) -> Option<(PhoneIdentity, DeviceInfo)> {
    let dial_code = reader.text("dial_code", 8);
    let phone_number = reader.text("phone_number", 32);
    let user_type = reader.int("user_type", 1..=u64::from(u16::MAX));
    let otp_type = reader.int("otp_type", 1..=2);
    let email = match otp_type {
        Some(2) => reader.text("email", 254),
        _ => None,
    };
    let device_type = reader.device_type();
    let device_id = reader.text("device_id", MAX_DEVICE_FIELD);
    let device_unique_id = reader.text("device_unique_id", MAX_DEVICE_FIELD);
    Some((
        PhoneIdentity {
            dial_code: dial_code?,
            phone_number: phone_number?,
            user_type: u16::try_from(user_type?).ok()?,
            channel: if otp_type? == 2 {
                Channel::Email
            } else {
                Channel::Sms
            },
            email,
        },
        DeviceInfo {
            device_type: device_type?,
            device_id: device_id?,
            device_unique_id: device_unique_id?,
        },
    ))
}

fn success(data: Value) -> Response {
    Json(json!({"success": 1, "error": [], "data": data})).into_response()
}

async fn send_otp(
    State(state): State<AppState>,
    Client(tenant): Client,
    Ctx(mut ctx): Ctx,
    Body(body): Body,
) -> Result<Response, DigipayError> {
    ctx.mode = Some("digipay".into());
    let mut reader = Reader::new(&body);
    let parsed = identity_and_device(&mut reader);
    reader.finish()?;
    let (who, _) = parsed.ok_or_else(|| DigipayError::bad(ErrorCode::InvalidField, "body"))?;
    let challenge = state
        .core
        .send_phone_code(&tenant, &who, &ctx)
        .await
        .map_err(DigipayError::from_core)?;
    let policy = state
        .core
        .policy_for(&tenant)
        .await
        .map_err(DigipayError::from_core)?;
    let now = state.core.clock().now();
    Ok(success(json!({
        "message": "OTP sent successfully.",
        "otp_type": if who.channel == Channel::Email { 2 } else { 1 },
        "expires_in": (challenge.expires_at - now).whole_seconds().max(0),
        "resend_after": policy.resend_cooldown.as_secs(),
    })))
}

async fn verify_otp(
    State(state): State<AppState>,
    Client(tenant): Client,
    Ctx(mut ctx): Ctx,
    Body(body): Body,
) -> Result<Response, DigipayError> {
    ctx.mode = Some("digipay".into());
    let mut reader = Reader::new(&body);
    let parsed = identity_and_device(&mut reader);
    let otp = match body.get("otp") {
        Some(Value::Number(_)) => {
            // A number loses leading zeros: codes travel as strings.
            reader.problem(ErrorCode::InvalidField, "otp");
            None
        }
        _ => reader.text("otp", 16),
    };
    reader.finish()?;
    let ((who, device), otp) = parsed
        .zip(otp)
        .ok_or_else(|| DigipayError::bad(ErrorCode::InvalidField, "body"))?;
    let verified = state
        .core
        .verify_phone_code(&tenant, &who, &otp, &device, &ctx)
        .await
        .map_err(DigipayError::from_core)?;
    let message = match who.channel {
        Channel::Email => "Email successfully verified.",
        _ => "Phone number successfully verified.",
    };
    Ok(success(json!({
        "message": message,
        "token": {"type": "Token", "token": verified.token.expose_secret()},
        "user_id": verified.user.id.as_str(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_errors_map_to_documented_codes() {
        let code_of = |e: CoreError| {
            let mapped = DigipayError::from_core(e);
            (mapped.status, mapped.codes)
        };
        assert_eq!(
            code_of(CoreError::invalid("phone", "x")),
            (StatusCode::BAD_REQUEST, vec![ErrorCode::InvalidPhone])
        );
        assert_eq!(
            code_of(CoreError::CodeRejected {
                attempts_left: Some(2)
            })
            .1,
            vec![ErrorCode::WrongCode]
        );
        assert_eq!(
            code_of(CoreError::CodeRejected {
                attempts_left: Some(0)
            })
            .1,
            vec![ErrorCode::TooManyAttempts]
        );
        assert_eq!(
            code_of(CoreError::CodeExpired).1,
            vec![ErrorCode::ExpiredCode]
        );
        assert_eq!(
            code_of(CoreError::RateLimited {
                retry_after: std::time::Duration::from_secs(3)
            }),
            (StatusCode::TOO_MANY_REQUESTS, vec![ErrorCode::RateLimited])
        );
        assert_eq!(code_of(CoreError::Unauthorized).0, StatusCode::UNAUTHORIZED);
        assert_eq!(code_of(CoreError::NotFound).0, StatusCode::NOT_FOUND);
        assert_eq!(
            code_of(CoreError::Internal("x".into())).0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
