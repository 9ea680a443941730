//! The SMS panel's two-step login ("dialect acl"), exactly as its document says: step 1
//! `login` (username and password → temporary ticket), step 2 `confirm_otp` (ticket and code →
//! final 32-hex token, 10 hours), plus resend, `me`, logout and the user's own authenticator.
//! Every answer is `{data, meta{status, message, message_parameters, message_code[, errors]}}`.

pub mod messages;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use axum::{Json, Router};
use data_encoding::BASE64;
use otpgate_core::model::{RequestContext, User};
use otpgate_core::{CoreError, StoreError};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

use self::messages::{AclMessage, Lang};
use crate::context::{Ctx, preferred_language};
use crate::{AppState, rfc3339};

/// The acl routes, each under its full path (`/api/acl/auth/...`). Every other path under
/// `/api/acl`, and a known path asked with another method, is the acl's own 404.
///
/// They are not a router nested under `/api/acl/auth`: each level of nesting wraps every
/// request in another route service, which strips its prefix into a new URI and is polled
/// through again each time the handler wakes (a code check's step wakes once more, for its
/// store).
pub fn router() -> Router<AppState> {
    let route = |handler: MethodRouter<AppState>| handler.fallback(not_found);
    Router::new()
        .route("/api/acl/auth/login", route(post(login)))
        .route("/api/acl/auth/confirm_otp", route(post(confirm_otp)))
        .route("/api/acl/auth/resend_otp", route(post(resend_otp)))
        .route("/api/acl/auth/me", route(get(me)))
        .route("/api/acl/auth/logout", route(post(logout)))
        .route(
            "/api/acl/auth/totp",
            route(post(enroll_totp).delete(remove_totp)),
        )
        .route("/api/acl/auth/totp/confirm", route(post(confirm_totp)))
        .route(
            "/api/acl/auth/recovery_codes",
            route(post(regenerate_recovery_codes)),
        )
        .route("/api/acl", any(not_found))
        .route("/api/acl/", any(not_found))
        .route("/api/acl/{*rest}", any(not_found))
}

// ------------------------------------------------------------------ envelope

/// An acl error answer: the message, its language, and the per-field errors.
#[derive(Debug)]
pub struct AclError {
    message: AclMessage,
    lang: Lang,
    errors: Map<String, Value>,
}

impl AclError {
    fn new(message: AclMessage, lang: Lang) -> Self {
        AclError {
            message,
            lang,
            errors: Map::new(),
        }
    }

    /// Field errors (422): each field names its message; the envelope's message is the first.
    fn fields(problems: Vec<AclMessage>, lang: Lang) -> Self {
        let mut errors = Map::new();
        for problem in &problems {
            if let AclMessage::Required(field) | AclMessage::InvalidFormat(field) = problem {
                errors.insert(field.clone(), json!([problem.text(lang)]));
            }
        }
        let first = problems
            .into_iter()
            .next()
            .unwrap_or(AclMessage::MalformedBody);
        AclError {
            message: first,
            lang,
            errors,
        }
    }

    /// The one mapping from core errors to acl messages.
    fn from_core(e: CoreError, lang: Lang) -> Self {
        let message = match &e {
            CoreError::InvalidInput { field, .. } => {
                let field = if *field == "code" { "otp" } else { field };
                return AclError::fields(vec![AclMessage::InvalidFormat(field.to_owned())], lang);
            }
            CoreError::InvalidCredentials
            | CoreError::Unauthorized
            | CoreError::CodeRejected { .. }
            | CoreError::CodeExpired => AclMessage::InvalidCredentials,
            CoreError::RateLimited { retry_after } => {
                AclMessage::TooManyRequests(retry_after.as_secs().max(1))
            }
            CoreError::NotFound => AclMessage::NotFound,
            CoreError::Conflict(_) | CoreError::Storage(StoreError::Conflict(_)) => {
                AclMessage::Conflict
            }
            CoreError::Storage(StoreError::Unavailable(_)) => {
                tracing::error!(error = %e, "store unavailable");
                AclMessage::Unavailable
            }
            CoreError::Storage(_)
            | CoreError::Delivery(_)
            | CoreError::WrongMasterKey
            | CoreError::Internal(_) => {
                tracing::error!(error = %e, "request failed");
                AclMessage::ServerError
            }
        };
        AclError::new(message, lang)
    }
}

impl IntoResponse for AclError {
    fn into_response(self) -> Response {
        let body = json!({
            "data": null,
            "meta": {
                "status": false,
                "message": self.message.text(self.lang),
                "message_parameters": self.message.parameters(),
                "message_code": self.message.code(),
                "errors": self.errors,
            }
        });
        let mut response = (self.message.status(), Json(body)).into_response();
        if let AclMessage::TooManyRequests(seconds) = self.message {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A success answer in the document's shape.
fn done(data: impl serde::Serialize, lang: Lang) -> Response {
    Json(envelope(data, lang)).into_response()
}

fn envelope<T: serde::Serialize>(data: T, lang: Lang) -> Envelope<T> {
    let message = AclMessage::Done;
    Envelope {
        data,
        meta: Meta {
            message: message.text(lang),
            message_code: message.code(),
            message_parameters: [],
            status: true,
        },
    }
}

/// The document's answer: written straight from these fields rather than through a
/// `serde_json::Value` tree (a map and a string per key, on every login). Fields are declared in
/// the order a `Value` map writes them (by name), so the bytes are the same either way.
#[derive(serde::Serialize)]
struct Envelope<T> {
    data: T,
    meta: Meta,
}

#[derive(serde::Serialize)]
struct Meta {
    message: String,
    message_code: &'static str,
    message_parameters: [(); 0],
    status: bool,
}

/// The final token of a login's second step.
#[derive(serde::Serialize)]
struct IssuedToken<'a> {
    method: &'static str,
    token: &'a str,
}

/// The request's language and context.
pub struct AclCtx {
    lang: Lang,
    ctx: RequestContext,
}

impl<S: Send + Sync> FromRequestParts<S> for AclCtx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Ctx(mut ctx) = Ctx::from_request_parts(parts, state).await?;
        let lang = Lang::from_preference(ctx.locale.as_deref());
        ctx.mode = Some("acl".into());
        ctx.locale = Some(match lang {
            Lang::Fa => "fa".into(),
            Lang::En => "en".into(),
        });
        Ok(AclCtx { lang, ctx })
    }
}

/// A JSON object body, with the document's validation answers: 422 `400-2` naming every
/// missing or empty field.
pub struct AclBody {
    fields: Map<String, Value>,
    lang: Lang,
}

impl<S: Send + Sync> FromRequest<S> for AclBody {
    type Rejection = AclError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        // Only the language: the handler's own `AclCtx` builds the rest of the context (the
        // client's address as text, among others), which this extractor used to build again.
        let lang = Lang::from_preference(preferred_language(&parts).as_deref());
        let is_json = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        let bytes = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(|rejection| {
                let message = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    AclMessage::BodyTooLarge
                } else {
                    AclMessage::MalformedBody
                };
                AclError::new(message, lang)
            })?;
        if !is_json {
            return Err(AclError::new(AclMessage::UnsupportedMediaType, lang));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(fields)) => Ok(AclBody { fields, lang }),
            _ => Err(AclError::new(AclMessage::MalformedBody, lang)),
        }
    }
}

impl AclBody {
    /// The named string fields, or a 422 listing every one that is missing, empty or not a
    /// string.
    fn strings<const N: usize>(&self, names: [&str; N]) -> Result<[String; N], AclError> {
        let mut problems = Vec::new();
        let values = names.map(|name| match self.fields.get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            None | Some(Value::Null) | Some(Value::String(_)) => {
                problems.push(AclMessage::Required(name.to_owned()));
                String::new()
            }
            Some(_) => {
                problems.push(AclMessage::InvalidFormat(name.to_owned()));
                String::new()
            }
        });
        if problems.is_empty() {
            Ok(values)
        } else {
            Err(AclError::fields(problems, self.lang))
        }
    }
}

/// The holder of a valid final token: `Authorization: Bearer <token>` or the bare token.
pub struct AclUser {
    user: User,
    token: SecretString,
}

fn presented_token(parts: &Parts) -> Option<SecretString> {
    let header = parts.headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .unwrap_or(header)
        .trim();
    (!token.is_empty()).then(|| SecretString::from(token.to_owned()))
}

impl FromRequestParts<AppState> for AclUser {
    type Rejection = AclError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let AclCtx { lang, .. } = match AclCtx::from_request_parts(parts, state).await {
            Ok(ctx) => ctx,
            Err(never) => match never {},
        };
        let token = presented_token(parts)
            .ok_or_else(|| AclError::new(AclMessage::Unauthenticated, lang))?;
        match state.core.authenticate_session(&token).await {
            Ok((_, user)) => Ok(AclUser { user, token }),
            Err(CoreError::Unauthorized) => Err(AclError::new(AclMessage::Unauthenticated, lang)),
            Err(other) => Err(AclError::from_core(other, lang)),
        }
    }
}

async fn not_found(AclCtx { lang, .. }: AclCtx) -> AclError {
    AclError::new(AclMessage::NotFound, lang)
}

// ------------------------------------------------------------------ handlers

async fn login(
    State(state): State<AppState>,
    AclCtx { lang, ctx }: AclCtx,
    body: AclBody,
) -> Result<Response, AclError> {
    let [username, password] = body.strings(["username", "password"])?;
    let tenant = state
        .core
        .default_tenant()
        .await
        .map_err(|e| AclError::from_core(e, lang))?;
    let started = state
        .core
        .login(&tenant.id, &username, SecretString::from(password), &ctx)
        .await
        .map_err(|e| AclError::from_core(e, lang))?;
    let now = state.core.clock().now();
    Ok(done(
        json!({
            "token": started.ticket.expose_secret(),
            "method": started.channel.as_str(),
            "expires_at": rfc3339(started.expires_at),
            "expires_in": (started.expires_at - now).whole_seconds().max(0),
            "resend_at": started.resend_at.map(rfc3339),
        }),
        lang,
    ))
}

async fn confirm_otp(
    State(state): State<AppState>,
    AclCtx { lang, ctx }: AclCtx,
    body: AclBody,
) -> Result<Response, AclError> {
    let [token, otp] = body.strings(["token", "otp"])?;
    let issued = state
        .core
        .confirm_login(&SecretString::from(token), &otp, &ctx)
        .await
        .map_err(|e| AclError::from_core(e, lang))?;
    Ok(done(
        IssuedToken {
            method: "login",
            token: issued.token.expose_secret(),
        },
        lang,
    ))
}

async fn resend_otp(
    State(state): State<AppState>,
    AclCtx { lang, ctx }: AclCtx,
    body: AclBody,
) -> Result<Response, AclError> {
    let [token] = body.strings(["token"])?;
    let resent = state
        .core
        .resend_login_code(&SecretString::from(token), &ctx)
        .await
        .map_err(|e| AclError::from_core(e, lang))?;
    let now = state.core.clock().now();
    Ok(done(
        json!({
            "expires_at": rfc3339(resent.expires_at),
            "resend_at": rfc3339(resent.next_resend_at),
            "retry_after": (resent.next_resend_at - now).whole_seconds().max(0),
        }),
        lang,
    ))
}

fn user_view(user: &User, totp_enabled: bool, recovery_codes_left: u32) -> Value {
    json!({
        "id": user.id.as_str(),
        "username": user.username.as_str(),
        "email": user.email.as_ref().map(|e| e.as_str()),
        "phone": user.phone.as_ref().map(|p| p.as_str()),
        "role": user.role.as_str(),
        "mobile_verified_at": user.mobile_verified_at.map(rfc3339),
        "email_verified_at": user.email_verified_at.map(rfc3339),
        "totp_enabled": totp_enabled,
        "recovery_codes_left": recovery_codes_left,
        "created_at": rfc3339(user.created_at),
    })
}

async fn me(
    State(state): State<AppState>,
    AclCtx { lang, .. }: AclCtx,
    AclUser { user, .. }: AclUser,
) -> Result<Response, AclError> {
    let (totp, left) = state
        .core
        .totp_status(&user.tenant_id, &user.id)
        .await
        .map_err(|e| AclError::from_core(e, lang))?;
    Ok(done(user_view(&user, totp, left), lang))
}

async fn logout(
    State(state): State<AppState>,
    AclCtx { lang, ctx }: AclCtx,
    AclUser { token, .. }: AclUser,
) -> Result<Response, AclError> {
    state
        .core
        .revoke_session(&token, &ctx)
        .await
        .map_err(|e| AclError::from_core(e, lang))?;
    Ok(done(Value::Null, lang))
}

fn codes(list: &[SecretString]) -> Vec<&str> {
    list.iter().map(|c| c.expose_secret()).collect()
}

async fn enroll_totp(
    State(state): State<AppState>,
    AclCtx { lang, ctx }: AclCtx,
    AclUser { user, .. }: AclUser,
) -> Result<Response, AclError> {
    let (active, _) = state
        .core
        .totp_status(&user.tenant_id, &user.id)
        .await
        .map_err(|e| AclError::from_core(e, lang))?;
    if active {
        return Err(AclError::new(AclMessage::Conflict, lang));
    }
    let enrolment = state
        .core
        .enroll_totp(&user.tenant_id, &user.id, false, &ctx)
        .await
        .map_err(|e| AclError::from_core(e, lang))?;
    let uri = enrolment.uri.expose_secret();
    let png =
        crate::qr::png(uri).map(|bytes| format!("data:image/png;base64,{}", BASE64.encode(&bytes)));
    Ok(done(
        json!({
            "secret": enrolment.secret_base32.expose_secret(),
            "otpauth_uri": uri,
            "qr_png": png,
            "qr_svg": crate::qr::svg(uri),
            "recovery_codes": codes(&enrolment.recovery_codes),
            "active": enrolment.active,
        }),
        lang,
    ))
}

async fn confirm_totp(
    State(state): State<AppState>,
    AclCtx { lang, ctx }: AclCtx,
    AclUser { user, .. }: AclUser,
    body: AclBody,
) -> Result<Response, AclError> {
    let [otp] = body.strings(["otp"])?;
    state
        .core
        .confirm_totp(&user.tenant_id, &user.id, &otp, &ctx)
        .await
        .map_err(|e| AclError::from_core(e, lang))?;
    Ok(done(json!({"totp_enabled": true}), lang))
}

async fn remove_totp(
    State(state): State<AppState>,
    AclCtx { lang, ctx }: AclCtx,
    AclUser { user, .. }: AclUser,
    body: AclBody,
) -> Result<Response, AclError> {
    let [otp] = body.strings(["otp"])?;
    state
        .core
        .remove_totp(&user.tenant_id, &user.id, &otp, &ctx)
        .await
        .map_err(|e| AclError::from_core(e, lang))?;
    Ok(done(json!({"totp_enabled": false}), lang))
}

async fn regenerate_recovery_codes(
    State(state): State<AppState>,
    AclCtx { lang, ctx }: AclCtx,
    AclUser { user, .. }: AclUser,
) -> Result<Response, AclError> {
    let fresh = state
        .core
        .regenerate_recovery_codes(&user.tenant_id, &user.id, &ctx)
        .await
        .map_err(|e| AclError::from_core(e, lang))?;
    Ok(done(json!({"recovery_codes": codes(&fresh)}), lang))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_typed_answer_writes_the_same_bytes_as_the_documents_json() {
        for lang in [Lang::Fa, Lang::En] {
            // Arrange
            let message = AclMessage::Done;
            let as_value = json!({
                "data": {"token": "ab12", "method": "login"},
                "meta": {
                    "status": true,
                    "message": message.text(lang),
                    "message_parameters": [],
                    "message_code": message.code(),
                }
            });
            let typed = envelope(
                IssuedToken {
                    method: "login",
                    token: "ab12",
                },
                lang,
            );
            // Act
            let written = serde_json::to_vec(&typed).unwrap();
            // Assert
            assert_eq!(written, serde_json::to_vec(&as_value).unwrap());
        }
    }
}
