//! The native API, v1: verifications (send, check, cancel, read), authenticated by per-tenant
//! API keys (`Authorization: Bearer ogk_…`). Errors are `{"code", "message"}` with a stable
//! machine-readable `code`, plus `field` or `retry_after` where they apply.

use axum::extract::rejection::JsonRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use otpgate_core::CoreError;
use otpgate_core::model::{AuditEvent, Challenge, ChallengeStatus, Channel, Role, TenantId, User};
use otpgate_core::policy::{Policy, PolicyOverrides};
use otpgate_core::service::{DeliveryState, NewUser, StartVerification};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::context::Ctx;
use crate::{AppState, rfc3339};

/// The v1 routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/verifications", post(start_verification))
        .route("/v1/verifications/{id}", get(get_verification))
        .route("/v1/verifications/{id}/check", post(check_verification))
        .route("/v1/verifications/{id}/cancel", post(cancel_verification))
        .route("/v1/users", post(create_user))
        .route("/v1/users/{id}", get(get_user))
        .route("/v1/users/{id}/totp", post(enroll_totp).delete(remove_totp))
        .route("/v1/users/{id}/totp/confirm", post(confirm_totp))
        .route(
            "/v1/users/{id}/recovery_codes",
            post(regenerate_recovery_codes),
        )
        .route("/v1/users/{id}/events", get(user_events))
        .route("/v1/events", get(tenant_events))
        .route("/v1/me", get(me))
        .route("/v1/tokens/revoke", post(revoke_token))
        .route("/v1/jwt_keys/rotate", post(rotate_jwt_key))
        .route("/v1/api_keys", post(create_api_key))
        .route("/v1/api_keys/{id}", axum::routing::delete(revoke_api_key))
        .route(
            "/v1/tenant/settings",
            get(tenant_settings).put(set_tenant_settings),
        )
}

// ------------------------------------------------------------------ errors

/// The v1 error envelope.
#[derive(Debug)]
pub struct V1Error {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<&'static str>,
    retry_after: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

impl V1Error {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        V1Error {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

/// The one place where core errors become v1 statuses and codes.
impl From<CoreError> for V1Error {
    fn from(e: CoreError) -> Self {
        let code = e.code();
        let (status, message) = match &e {
            CoreError::InvalidInput { field, reason } => {
                let mut err =
                    V1Error::new(StatusCode::BAD_REQUEST, code, format!("{field} {reason}"));
                err.field = Some(field);
                return err;
            }
            CoreError::InvalidCredentials => {
                (StatusCode::UNAUTHORIZED, "invalid credentials".into())
            }
            CoreError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "missing or invalid credentials".into(),
            ),
            CoreError::CodeRejected { .. } => {
                (StatusCode::BAD_REQUEST, "the code was not accepted".into())
            }
            CoreError::CodeExpired => (
                StatusCode::BAD_REQUEST,
                "there is no live code: it expired or was used".into(),
            ),
            CoreError::RateLimited { retry_after } => {
                let secs = retry_after.as_secs().max(1);
                let mut err = V1Error::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    code,
                    format!("too many requests; retry after {secs} s"),
                );
                err.retry_after = Some(secs);
                return err;
            }
            CoreError::NotFound => (StatusCode::NOT_FOUND, "not found".into()),
            CoreError::Conflict(why) => (StatusCode::CONFLICT, why.clone()),
            CoreError::Storage(otpgate_core::StoreError::Conflict(what)) => {
                (StatusCode::CONFLICT, format!("{what} already exists"))
            }
            CoreError::Storage(otpgate_core::StoreError::Unavailable(_)) => {
                tracing::error!(error = %e, "store unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service temporarily unavailable".into(),
                )
            }
            CoreError::Delivery(_)
            | CoreError::Storage(_)
            | CoreError::WrongMasterKey
            | CoreError::Internal(_) => {
                // Opaque to the client; the detail goes to the log only.
                tracing::error!(error = %e, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
            }
        };
        V1Error::new(status, code, message)
    }
}

impl IntoResponse for V1Error {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code,
            message: &self.message,
            field: self.field,
            retry_after: self.retry_after,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Describes a JSON rejection without echoing values (they may be codes).
fn describe_rejection(rejection: &JsonRejection) -> (StatusCode, &'static str, String) {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a body with Content-Type: application/json".into(),
        ),
        JsonRejection::JsonSyntaxError(_) => (
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "the body is not valid JSON".into(),
        ),
        JsonRejection::JsonDataError(e) => {
            let text = e.body_text();
            let detail = text
                .split_once("target type: ")
                .map_or(text.as_str(), |(_, rest)| rest);
            let message = if let Some(field) = between_backticks(detail, "missing field `") {
                format!("{field} is required")
            } else if let Some((path, _)) = detail.split_once(": ") {
                format!("{path} has the wrong type or value")
            } else if let Some(field) = between_backticks(detail, "unknown field `") {
                format!("{field} is not a known field")
            } else {
                "the body has the wrong shape".into()
            };
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
        }
        JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body exceeds {} bytes", crate::MAX_BODY_BYTES),
            )
        }
        _ => (
            rejection.status(),
            "bad_request",
            "the body could not be read".into(),
        ),
    }
}

fn between_backticks<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let start = text.find(prefix)? + prefix.len();
    let rest = text.get(start..)?;
    rest.split('`').next()
}

impl From<JsonRejection> for V1Error {
    fn from(rejection: JsonRejection) -> Self {
        let (status, code, message) = describe_rejection(&rejection);
        V1Error::new(status, code, message)
    }
}

/// JSON body extractor whose rejections use the v1 envelope.
pub struct V1Json<T>(pub T);

impl<S, T> FromRequest<S> for V1Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = V1Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(V1Json(value))
    }
}

/// An optional body: absent when the request carries no `Content-Type`; otherwise it must be
/// valid JSON of the right shape.
impl<S, T> axum::extract::OptionalFromRequest<S> for V1Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = V1Error;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        if !req.headers().contains_key(axum::http::header::CONTENT_TYPE) {
            return Ok(None);
        }
        <Self as FromRequest<S>>::from_request(req, state)
            .await
            .map(Some)
    }
}

/// The tenant of a valid API key (`Authorization: Bearer …`).
pub struct ApiTenant(pub TenantId);

impl FromRequestParts<AppState> for ApiTenant {
    type Rejection = V1Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                V1Error::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing Authorization: Bearer <api key>",
                )
            })?;
        let key = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .unwrap_or(header);
        let tenant = state
            .core
            .authenticate_api_key(&SecretString::from(key.trim().to_owned()))
            .await
            .map_err(|e| match e {
                CoreError::Unauthorized => {
                    V1Error::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid API key")
                }
                other => V1Error::from(other),
            })?;
        Ok(ApiTenant(tenant))
    }
}

/// Unknown paths.
pub async fn not_found() -> V1Error {
    V1Error::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// Known paths with the wrong method.
pub async fn method_not_allowed() -> V1Error {
    V1Error::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

// ------------------------------------------------------------------ DTOs

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    to: String,
    channel: String,
    #[serde(default)]
    locale: Option<String>,
}

impl TryFrom<StartRequest> for StartVerification {
    type Error = CoreError;

    fn try_from(req: StartRequest) -> Result<Self, Self::Error> {
        let channel = match Channel::parse(req.channel.trim())? {
            Channel::Totp => return Err(CoreError::invalid("channel", "must be sms or email")),
            c => c,
        };
        Ok(StartVerification {
            to: req.to,
            channel,
            locale: req.locale,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    code: String,
}

#[derive(Serialize)]
struct DeliveryView {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider_message_id: Option<String>,
}

#[derive(Serialize)]
struct VerificationView {
    id: String,
    status: &'static str,
    channel: &'static str,
    to: String,
    attempts_left: u32,
    send_count: u32,
    created_at: String,
    expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery: Option<DeliveryView>,
}

fn view(
    c: &Challenge,
    now: time::OffsetDateTime,
    delivery: Option<DeliveryState>,
) -> VerificationView {
    let status = c.status_at(now);
    VerificationView {
        id: c.id.to_string(),
        status: status.as_str(),
        channel: c.channel.as_str(),
        to: c.destination.clone(),
        attempts_left: if status == ChallengeStatus::Pending {
            c.attempts_left()
        } else {
            0
        },
        send_count: c.send_count,
        created_at: rfc3339(c.created_at),
        expires_at: rfc3339(c.expires_at),
        delivery: delivery.map(|d| DeliveryView {
            status: d.status.as_str(),
            provider_message_id: d.provider_message_id,
        }),
    }
}

#[derive(Serialize)]
struct CheckView {
    id: String,
    status: &'static str,
    attempts_left: u32,
}

// ------------------------------------------------------------------ handlers

async fn start_verification(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Ctx(ctx): Ctx,
    V1Json(body): V1Json<StartRequest>,
) -> Result<(StatusCode, Json<VerificationView>), V1Error> {
    let request = StartVerification::try_from(body)?;
    let started = state
        .core
        .start_verification(&tenant, request, &ctx)
        .await?;
    let now = state.core.clock().now();
    Ok((
        StatusCode::CREATED,
        Json(view(&started.challenge, now, started.delivery)),
    ))
}

async fn get_verification(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Path(id): Path<String>,
) -> Result<Json<VerificationView>, V1Error> {
    let challenge = state.core.get_verification(&tenant, &id).await?;
    let delivery = state.core.delivery_state(&challenge.id).await?;
    Ok(Json(view(&challenge, state.core.clock().now(), delivery)))
}

async fn check_verification(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    V1Json(body): V1Json<CheckRequest>,
) -> Result<Json<CheckView>, V1Error> {
    let outcome = state
        .core
        .check_verification(&tenant, &id, &body.code, &ctx)
        .await?;
    Ok(Json(CheckView {
        id,
        status: outcome.status.as_str(),
        attempts_left: outcome.attempts_left,
    }))
}

async fn cancel_verification(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<Json<VerificationView>, V1Error> {
    let challenge = state.core.cancel_verification(&tenant, &id, &ctx).await?;
    let delivery = state.core.delivery_state(&challenge.id).await?;
    Ok(Json(view(&challenge, state.core.clock().now(), delivery)))
}

// ------------------------------------------------------------------ users and their factors

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUserRequest {
    username: String,
    password: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    phone: Option<String>,
    #[serde(default)]
    role: Option<String>,
}

impl TryFrom<CreateUserRequest> for NewUser {
    type Error = CoreError;

    fn try_from(req: CreateUserRequest) -> Result<Self, Self::Error> {
        Ok(NewUser {
            username: req.username,
            password: SecretString::from(req.password),
            email: req.email.filter(|e| !e.trim().is_empty()),
            phone: req.phone.filter(|p| !p.trim().is_empty()),
            role: Role::parse(req.role.as_deref().unwrap_or("user"))?,
        })
    }
}

#[derive(Serialize)]
struct UserView {
    id: String,
    username: String,
    email: Option<String>,
    phone: Option<String>,
    role: &'static str,
    mobile_verified_at: Option<String>,
    email_verified_at: Option<String>,
    totp_enabled: bool,
    recovery_codes_left: u32,
    created_at: String,
}

async fn user_view(state: &AppState, user: &User) -> Result<UserView, V1Error> {
    let (totp_enabled, recovery_codes_left) =
        state.core.totp_status(&user.tenant_id, &user.id).await?;
    Ok(UserView {
        id: user.id.to_string(),
        username: user.username.as_str().to_owned(),
        email: user.email.as_ref().map(|e| e.as_str().to_owned()),
        phone: user.phone.as_ref().map(|p| p.as_str().to_owned()),
        role: user.role.as_str(),
        mobile_verified_at: user.mobile_verified_at.map(rfc3339),
        email_verified_at: user.email_verified_at.map(rfc3339),
        totp_enabled,
        recovery_codes_left,
        created_at: rfc3339(user.created_at),
    })
}

async fn create_user(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Ctx(ctx): Ctx,
    V1Json(body): V1Json<CreateUserRequest>,
) -> Result<(StatusCode, Json<UserView>), V1Error> {
    let user = state
        .core
        .create_user(&tenant, NewUser::try_from(body)?, &ctx)
        .await?;
    Ok((StatusCode::CREATED, Json(user_view(&state, &user).await?)))
}

async fn get_user(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Path(id): Path<String>,
) -> Result<Json<UserView>, V1Error> {
    let user = state.core.user(&tenant, &id).await?;
    Ok(Json(user_view(&state, &user).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    #[serde(default)]
    activate: bool,
}

#[derive(Serialize)]
struct EnrolmentView {
    factor_id: String,
    secret: String,
    otpauth_uri: String,
    qr_png: Option<String>,
    qr_svg: Option<String>,
    recovery_codes: Vec<String>,
    active: bool,
}

fn expose_all(codes: &[SecretString]) -> Vec<String> {
    codes.iter().map(|c| c.expose_secret().to_owned()).collect()
}

async fn enroll_totp(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    body: Option<V1Json<EnrollRequest>>,
) -> Result<(StatusCode, Json<EnrolmentView>), V1Error> {
    let activate = body.map(|V1Json(b)| b.activate).unwrap_or_default();
    let user = state.core.user(&tenant, &id).await?;
    let e = state
        .core
        .enroll_totp(&tenant, &user.id, activate, &ctx)
        .await?;
    let uri = e.uri.expose_secret();
    Ok((
        StatusCode::CREATED,
        Json(EnrolmentView {
            factor_id: e.factor_id.to_string(),
            secret: e.secret_base32.expose_secret().to_owned(),
            otpauth_uri: uri.to_owned(),
            qr_png: crate::qr::png(uri)
                .map(|b| format!("data:image/png;base64,{}", data_encoding::BASE64.encode(&b))),
            qr_svg: crate::qr::svg(uri),
            recovery_codes: expose_all(&e.recovery_codes),
            active: e.active,
        }),
    ))
}

async fn confirm_totp(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    V1Json(body): V1Json<CheckRequest>,
) -> Result<Json<UserView>, V1Error> {
    let user = state.core.user(&tenant, &id).await?;
    state
        .core
        .confirm_totp(&tenant, &user.id, &body.code, &ctx)
        .await?;
    Ok(Json(user_view(&state, &user).await?))
}

async fn remove_totp(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
    V1Json(body): V1Json<CheckRequest>,
) -> Result<Json<UserView>, V1Error> {
    let user = state.core.user(&tenant, &id).await?;
    state
        .core
        .remove_totp(&tenant, &user.id, &body.code, &ctx)
        .await?;
    Ok(Json(user_view(&state, &user).await?))
}

#[derive(Serialize)]
struct RecoveryCodesView {
    recovery_codes: Vec<String>,
}

async fn regenerate_recovery_codes(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<Json<RecoveryCodesView>, V1Error> {
    let user = state.core.user(&tenant, &id).await?;
    let codes = state
        .core
        .regenerate_recovery_codes(&tenant, &user.id, &ctx)
        .await?;
    Ok(Json(RecoveryCodesView {
        recovery_codes: expose_all(&codes),
    }))
}

#[derive(Serialize)]
struct EventView {
    kind: &'static str,
    detail: String,
    ip: Option<String>,
    latitude: Option<f64>,
    longitude: Option<f64>,
    mode: Option<String>,
    at: String,
}

#[derive(Serialize)]
struct EventsView {
    events: Vec<EventView>,
}

#[derive(Deserialize)]
struct EventsQuery {
    kind: Option<String>,
    limit: Option<u32>,
}

impl From<AuditEvent> for EventView {
    fn from(e: AuditEvent) -> Self {
        EventView {
            kind: e.kind.as_str(),
            detail: e.detail,
            ip: e.context.ip,
            latitude: e.context.latitude,
            longitude: e.context.longitude,
            mode: e.context.mode,
            at: rfc3339(e.at),
        }
    }
}

/// The tenant's audit trail, newest first: `?kind=send_refused` shows every send the limits,
/// the allowlist, the number-type rule or the pumping circuit breaker refused.
async fn tenant_events(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventsView>, V1Error> {
    let Query(query) =
        query.map_err(|_| CoreError::invalid("query", "takes kind and a numeric limit"))?;
    let events = state
        .core
        .tenant_events(&tenant, query.kind.as_deref(), query.limit.unwrap_or(100))
        .await?;
    Ok(Json(EventsView {
        events: events.into_iter().map(EventView::from).collect(),
    }))
}

/// The user's login history: logins, codes, tokens, with where each request came from.
async fn user_events(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Path(id): Path<String>,
) -> Result<Json<EventsView>, V1Error> {
    let user = state.core.user(&tenant, &id).await?;
    let events = state.core.user_events(&tenant, &user.id, 100).await?;
    Ok(Json(EventsView {
        events: events.into_iter().map(EventView::from).collect(),
    }))
}

// ------------------------------------------------------------------ app users' tokens, clients, keys

/// The user of a JWT (`Authorization: Token <jwt>`), presented under its tenant's `CompanyID`
/// from the device it is bound to (`X-Device-Unique-Id`).
pub struct JwtUser(User);

impl FromRequestParts<AppState> for JwtUser {
    type Rejection = V1Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let unauthorized = || {
            V1Error::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid token, CompanyID or X-Device-Unique-Id",
            )
        };
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let token = header("authorization")
            .and_then(|h| {
                h.strip_prefix("Token ")
                    .or_else(|| h.strip_prefix("Bearer "))
            })
            .ok_or_else(unauthorized)?;
        let tenant = header("companyid")
            .and_then(|c| TenantId::parse(c).ok())
            .ok_or_else(unauthorized)?;
        let device = header("x-device-unique-id").ok_or_else(unauthorized)?;
        let (_, user) = state
            .core
            .authenticate_jwt(&tenant, &SecretString::from(token.to_owned()), device)
            .await
            .map_err(|e| match e {
                CoreError::Unauthorized => unauthorized(),
                other => V1Error::from(other),
            })?;
        Ok(JwtUser(user))
    }
}

/// The signed-in app user's own account.
async fn me(
    State(state): State<AppState>,
    JwtUser(user): JwtUser,
) -> Result<Json<UserView>, V1Error> {
    Ok(Json(user_view(&state, &user).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeTokenRequest {
    jti: String,
}

async fn revoke_token(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Ctx(ctx): Ctx,
    V1Json(body): V1Json<RevokeTokenRequest>,
) -> Result<StatusCode, V1Error> {
    state.core.revoke_jwt(&tenant, &body.jti, &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
struct KeyView {
    key_id: String,
}

async fn rotate_jwt_key(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Ctx(ctx): Ctx,
) -> Result<Json<KeyView>, V1Error> {
    let id = state.core.rotate_jwt_key(&tenant, &ctx).await?;
    Ok(Json(KeyView {
        key_id: id.to_string(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateApiKeyRequest {
    name: String,
}

#[derive(Serialize)]
struct ApiKeyView {
    id: String,
    name: String,
    key: String,
    created_at: String,
}

async fn create_api_key(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    V1Json(body): V1Json<CreateApiKeyRequest>,
) -> Result<(StatusCode, Json<ApiKeyView>), V1Error> {
    let (key, secret) = state.core.create_api_key(&tenant, &body.name).await?;
    Ok((
        StatusCode::CREATED,
        Json(ApiKeyView {
            id: key.id.to_string(),
            name: key.name,
            key: secret.expose_secret().to_owned(),
            created_at: rfc3339(key.created_at),
        }),
    ))
}

async fn revoke_api_key(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    Ctx(ctx): Ctx,
    Path(id): Path<String>,
) -> Result<StatusCode, V1Error> {
    state.core.revoke_api_key(&tenant, &id, &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
struct SettingsView {
    /// What the tenant set.
    overrides: PolicyOverrides,
    /// The rules in force.
    effective: EffectivePolicy,
}

#[derive(Serialize)]
struct EffectivePolicy {
    code_length: u8,
    sms_code_ttl_secs: u64,
    email_code_ttl_secs: u64,
    max_checks: u32,
    resend_cooldown_secs: u64,
    max_sends_per_window: u32,
    send_window_secs: u64,
    max_sends_per_day: u32,
    max_sends_per_ip_per_hour: u32,
    max_sends_per_account_per_hour: u32,
    max_sends_per_country_per_hour: u32,
    allowed_country_codes: Option<Vec<String>>,
    refuse_non_mobile_numbers: bool,
    pumping_min_verified_percent: u32,
    pumping_min_sample: u32,
    pumping_window_secs: u64,
    pumping_prefix_digits: u8,
    login_ticket_ttl_secs: u64,
    session_ttl_secs: u64,
    product_name: String,
}

impl From<&Policy> for EffectivePolicy {
    fn from(p: &Policy) -> Self {
        EffectivePolicy {
            code_length: p.code_length,
            sms_code_ttl_secs: p.sms_code_ttl.as_secs(),
            email_code_ttl_secs: p.email_code_ttl.as_secs(),
            max_checks: p.max_checks,
            resend_cooldown_secs: p.resend_cooldown.as_secs(),
            max_sends_per_window: p.max_sends_per_window,
            send_window_secs: p.send_window.as_secs(),
            max_sends_per_day: p.max_sends_per_day,
            max_sends_per_ip_per_hour: p.max_sends_per_ip_per_hour,
            max_sends_per_account_per_hour: p.max_sends_per_account_per_hour,
            max_sends_per_country_per_hour: p.max_sends_per_country_per_hour,
            allowed_country_codes: p.allowed_country_codes.clone(),
            refuse_non_mobile_numbers: p.refuse_non_mobile_numbers,
            pumping_min_verified_percent: p.pumping_min_verified_percent,
            pumping_min_sample: p.pumping_min_sample,
            pumping_window_secs: p.pumping_window.as_secs(),
            pumping_prefix_digits: p.pumping_prefix_digits,
            login_ticket_ttl_secs: p.login_ticket_ttl.as_secs(),
            session_ttl_secs: p.session_ttl.as_secs(),
            product_name: p.product_name.clone(),
        }
    }
}

async fn tenant_settings(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
) -> Result<Json<SettingsView>, V1Error> {
    let overrides = state.core.tenant(&tenant).await?.settings;
    let effective = state.core.policy_for(&tenant).await?;
    Ok(Json(SettingsView {
        overrides,
        effective: EffectivePolicy::from(&effective),
    }))
}

async fn set_tenant_settings(
    State(state): State<AppState>,
    ApiTenant(tenant): ApiTenant,
    V1Json(overrides): V1Json<PolicyOverrides>,
) -> Result<Json<SettingsView>, V1Error> {
    let effective = state
        .core
        .set_tenant_settings(&tenant, overrides.clone())
        .await?;
    Ok(Json(SettingsView {
        overrides,
        effective: EffectivePolicy::from(&effective),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn core_errors_map_to_stable_statuses_and_codes() {
        let cases: Vec<(CoreError, StatusCode, &str)> = vec![
            (
                CoreError::invalid("to", "bad"),
                StatusCode::BAD_REQUEST,
                "invalid_input",
            ),
            (
                CoreError::InvalidCredentials,
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
            ),
            (
                CoreError::Unauthorized,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            ),
            (
                CoreError::CodeRejected {
                    attempts_left: Some(1),
                },
                StatusCode::BAD_REQUEST,
                "code_rejected",
            ),
            (
                CoreError::CodeExpired,
                StatusCode::BAD_REQUEST,
                "code_expired",
            ),
            (
                CoreError::RateLimited {
                    retry_after: Duration::from_secs(30),
                },
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
            ),
            (CoreError::NotFound, StatusCode::NOT_FOUND, "not_found"),
            (
                CoreError::Conflict("x".into()),
                StatusCode::CONFLICT,
                "conflict",
            ),
            (
                CoreError::Storage(otpgate_core::StoreError::Conflict("user")),
                StatusCode::CONFLICT,
                "conflict",
            ),
            (
                CoreError::Storage(otpgate_core::StoreError::Unavailable("down".into())),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                CoreError::Storage(otpgate_core::StoreError::Other("sql".into())),
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage_error",
            ),
            (
                CoreError::Internal("bug".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
            ),
            (
                CoreError::Delivery("smtp".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "delivery_failed",
            ),
        ];
        for (error, status, code) in cases {
            let mapped = V1Error::from(error);
            assert_eq!((mapped.status(), mapped.code()), (status, code));
        }
    }

    #[test]
    fn server_errors_leak_no_detail() {
        let mapped = V1Error::from(CoreError::Internal("secret detail".into()));
        assert_eq!(mapped.message, "internal error");
    }
}
