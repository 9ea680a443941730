//! Row ↔ domain conversions. Times are stored as Unix milliseconds (BIGINT), as in SQLite, so
//! both stores hold the same values.

use otpgate_core::identity::{E164Phone, Email, Username};
use otpgate_core::model::{
    ApiKey, ApiKeyId, AuditEvent, AuditKind, Challenge, ChallengeId, ChallengeStatus, Channel,
    DeliveryStatus, FactorId, JwtKey, KeyId, LoginTicket, MessageId, OutboxMessage, Purpose,
    RequestContext, Role, Session, Tenant, TenantId, TotpFactor, User, UserId,
};
use otpgate_core::otp::{Algorithm, TotpParams};
use sqlx::Row;
use sqlx::postgres::PgRow;
use time::OffsetDateTime;

/// Unix milliseconds of a time.
pub(crate) fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn bad(column: &str, what: &str) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: format!("invalid stored {what}").into(),
    }
}

fn to_time(column: &str, millis: i64) -> sqlx::Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .map_err(|_| bad(column, "time"))
}

fn time_at(row: &PgRow, column: &str) -> sqlx::Result<OffsetDateTime> {
    to_time(column, row.try_get(column)?)
}

fn opt_time_at(row: &PgRow, column: &str) -> sqlx::Result<Option<OffsetDateTime>> {
    let millis: Option<i64> = row.try_get(column)?;
    millis.map(|m| to_time(column, m)).transpose()
}

fn parsed<T>(
    row: &PgRow,
    column: &str,
    parse: impl FnOnce(&str) -> Result<T, otpgate_core::CoreError>,
) -> sqlx::Result<T> {
    let text: &str = row.try_get(column)?;
    parse(text).map_err(|_| bad(column, "value"))
}

fn opt_parsed<T>(
    row: &PgRow,
    column: &str,
    parse: impl FnOnce(&str) -> Result<T, otpgate_core::CoreError>,
) -> sqlx::Result<Option<T>> {
    let text: Option<&str> = row.try_get(column)?;
    text.map(|t| parse(t).map_err(|_| bad(column, "value")))
        .transpose()
}

fn hash32(row: &PgRow, column: &str) -> sqlx::Result<[u8; 32]> {
    let bytes: &[u8] = row.try_get(column)?;
    bytes.try_into().map_err(|_| bad(column, "hash"))
}

fn count(row: &PgRow, column: &str) -> sqlx::Result<u32> {
    let n: i64 = row.try_get(column)?;
    u32::try_from(n).map_err(|_| bad(column, "count"))
}

pub(crate) const TENANT_COLUMNS: &str = "id, name, is_default, created_at, settings";

pub(crate) fn tenant(row: &PgRow) -> sqlx::Result<Tenant> {
    Ok(Tenant {
        id: parsed(row, "id", TenantId::parse)?,
        name: row.try_get("name")?,
        is_default: row.try_get::<i64, _>("is_default")? != 0,
        created_at: time_at(row, "created_at")?,
        settings: serde_json::from_str(&row.try_get::<String, _>("settings")?)
            .map_err(|_| bad("settings", "settings"))?,
    })
}

pub(crate) const USER_COLUMNS: &str = "id, tenant_id, username, email, phone, role, password_hash, \
     mobile_verified_at, email_verified_at, failed_logins, locked_until, created_at, user_type";

/// A user's columns under a prefix (a joined read names them `u_id`, `u_tenant_id`, …), so one
/// mapping serves both reads.
macro_rules! user_named {
    ($row:expr, $p:literal) => {
        User {
            id: parsed($row, concat!($p, "id"), UserId::parse)?,
            tenant_id: parsed($row, concat!($p, "tenant_id"), TenantId::parse)?,
            username: parsed($row, concat!($p, "username"), Username::parse)?,
            email: opt_parsed($row, concat!($p, "email"), Email::parse)?,
            phone: opt_parsed($row, concat!($p, "phone"), E164Phone::parse)?,
            role: parsed($row, concat!($p, "role"), Role::parse)?,
            password_hash: $row.try_get(concat!($p, "password_hash"))?,
            mobile_verified_at: opt_time_at($row, concat!($p, "mobile_verified_at"))?,
            email_verified_at: opt_time_at($row, concat!($p, "email_verified_at"))?,
            failed_logins: count($row, concat!($p, "failed_logins"))?,
            locked_until: opt_time_at($row, concat!($p, "locked_until"))?,
            created_at: time_at($row, concat!($p, "created_at"))?,
            user_type: $row
                .try_get::<Option<i64>, _>(concat!($p, "user_type"))?
                .map(|t| u16::try_from(t).map_err(|_| bad(concat!($p, "user_type"), "user type")))
                .transpose()?,
        }
    };
}
pub(crate) fn user(row: &PgRow) -> sqlx::Result<User> {
    Ok(user_named!(row, ""))
}

pub(crate) const JWT_KEY_COLUMNS: &str = "id, tenant_id, secret_sealed, created_at, verify_until";

pub(crate) fn jwt_key(row: &PgRow) -> sqlx::Result<JwtKey> {
    Ok(JwtKey {
        id: parsed(row, "id", KeyId::parse)?,
        tenant_id: parsed(row, "tenant_id", TenantId::parse)?,
        secret_sealed: row.try_get("secret_sealed")?,
        created_at: time_at(row, "created_at")?,
        verify_until: opt_time_at(row, "verify_until")?,
    })
}

pub(crate) const API_KEY_COLUMNS: &str = "id, tenant_id, name, key_hash, created_at, revoked_at";

pub(crate) fn api_key(row: &PgRow) -> sqlx::Result<ApiKey> {
    Ok(ApiKey {
        id: parsed(row, "id", ApiKeyId::parse)?,
        tenant_id: parsed(row, "tenant_id", TenantId::parse)?,
        name: row.try_get("name")?,
        hash: hash32(row, "key_hash")?,
        created_at: time_at(row, "created_at")?,
        revoked_at: opt_time_at(row, "revoked_at")?,
    })
}

pub(crate) const CHALLENGE_COLUMNS: &str = "id, tenant_id, user_id, purpose, channel, destination, \
     code_hash, locale, created_at, expires_at, last_sent_at, send_count, attempts, max_attempts, status";

/// A challenge's columns under a prefix (`c_id`, … in a joined read).
macro_rules! challenge_named {
    ($row:expr, $p:literal) => {
        Challenge {
            id: parsed($row, concat!($p, "id"), ChallengeId::parse)?,
            tenant_id: parsed($row, concat!($p, "tenant_id"), TenantId::parse)?,
            user_id: opt_parsed($row, concat!($p, "user_id"), UserId::parse)?,
            purpose: parsed($row, concat!($p, "purpose"), Purpose::parse)?,
            channel: parsed($row, concat!($p, "channel"), Channel::parse)?,
            destination: $row.try_get(concat!($p, "destination"))?,
            code_hash: $row.try_get(concat!($p, "code_hash"))?,
            locale: $row.try_get(concat!($p, "locale"))?,
            created_at: time_at($row, concat!($p, "created_at"))?,
            expires_at: time_at($row, concat!($p, "expires_at"))?,
            last_sent_at: time_at($row, concat!($p, "last_sent_at"))?,
            send_count: count($row, concat!($p, "send_count"))?,
            attempts: count($row, concat!($p, "attempts"))?,
            max_attempts: count($row, concat!($p, "max_attempts"))?,
            status: parsed($row, concat!($p, "status"), ChallengeStatus::parse)?,
        }
    };
}
pub(crate) fn challenge(row: &PgRow) -> sqlx::Result<Challenge> {
    Ok(challenge_named!(row, ""))
}

pub(crate) const TICKET_COLUMNS: &str =
    "hash, tenant_id, user_id, challenge_id, channel, created_at, expires_at, used_at";

pub(crate) fn ticket(row: &PgRow) -> sqlx::Result<LoginTicket> {
    Ok(LoginTicket {
        hash: hash32(row, "hash")?,
        tenant_id: parsed(row, "tenant_id", TenantId::parse)?,
        user_id: parsed(row, "user_id", UserId::parse)?,
        challenge_id: parsed(row, "challenge_id", ChallengeId::parse)?,
        channel: parsed(row, "channel", Channel::parse)?,
        created_at: time_at(row, "created_at")?,
        expires_at: time_at(row, "expires_at")?,
        used_at: opt_time_at(row, "used_at")?,
    })
}

/// `columns` (a `*_COLUMNS` list) of `table`, each named `{prefix}{column}`: the select list
/// of a joined read whose rows [`login_context`] maps.
pub(crate) fn prefixed(columns: &str, table: &str, prefix: &str) -> String {
    columns
        .split(',')
        .map(|c| format!("{table}.{c} AS {prefix}{c}", c = c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A login ticket with its user (`u_` columns) and challenge (`c_` columns), as a left join
/// read them: `None` where the row is missing or belongs to another tenant.
pub(crate) fn login_context(row: &PgRow) -> sqlx::Result<otpgate_core::store::LoginContext> {
    let ticket = ticket(row)?;
    // A missing row of a left join reads as NULLs: its key says whether there is one.
    let user = match row.try_get::<Option<&str>, _>("u_id")? {
        Some(_) => Some(user_named!(row, "u_")),
        None => None,
    }
    .filter(|u: &User| u.tenant_id == ticket.tenant_id);
    let challenge = match row.try_get::<Option<&str>, _>("c_id")? {
        Some(_) => Some(challenge_named!(row, "c_")),
        None => None,
    }
    .filter(|c: &Challenge| c.tenant_id == ticket.tenant_id);
    Ok(otpgate_core::store::LoginContext {
        ticket,
        user,
        challenge,
    })
}

pub(crate) const SESSION_COLUMNS: &str =
    "hash, tenant_id, user_id, created_at, expires_at, revoked_at";

pub(crate) fn session(row: &PgRow) -> sqlx::Result<Session> {
    Ok(Session {
        hash: hash32(row, "hash")?,
        tenant_id: parsed(row, "tenant_id", TenantId::parse)?,
        user_id: parsed(row, "user_id", UserId::parse)?,
        created_at: time_at(row, "created_at")?,
        expires_at: time_at(row, "expires_at")?,
        revoked_at: opt_time_at(row, "revoked_at")?,
    })
}

pub(crate) const FACTOR_COLUMNS: &str = "id, tenant_id, user_id, secret_sealed, algorithm, digits, \
     period, confirmed_at, last_step, created_at";

pub(crate) fn factor(row: &PgRow) -> sqlx::Result<TotpFactor> {
    let digits: i64 = row.try_get("digits")?;
    let period: i64 = row.try_get("period")?;
    Ok(TotpFactor {
        id: parsed(row, "id", FactorId::parse)?,
        tenant_id: parsed(row, "tenant_id", TenantId::parse)?,
        user_id: parsed(row, "user_id", UserId::parse)?,
        secret_sealed: row.try_get("secret_sealed")?,
        params: TotpParams {
            algorithm: parsed(row, "algorithm", Algorithm::parse)?,
            digits: u8::try_from(digits).map_err(|_| bad("digits", "digits"))?,
            period: u32::try_from(period).map_err(|_| bad("period", "period"))?,
        },
        confirmed_at: opt_time_at(row, "confirmed_at")?,
        last_step: row.try_get("last_step")?,
        created_at: time_at(row, "created_at")?,
    })
}

pub(crate) const MESSAGE_COLUMNS: &str = "id, tenant_id, challenge_id, channel, destination, purpose, \
     locale, body, code, status, attempts, next_attempt_at, created_at, provider_message_id, last_error, \
     client_ip, user_id";

pub(crate) fn message(row: &PgRow) -> sqlx::Result<OutboxMessage> {
    Ok(OutboxMessage {
        id: parsed(row, "id", MessageId::parse)?,
        tenant_id: parsed(row, "tenant_id", TenantId::parse)?,
        challenge_id: opt_parsed(row, "challenge_id", ChallengeId::parse)?,
        channel: parsed(row, "channel", Channel::parse)?,
        destination: row.try_get("destination")?,
        purpose: parsed(row, "purpose", Purpose::parse)?,
        locale: row.try_get("locale")?,
        body: row.try_get("body")?,
        code: row.try_get("code")?,
        status: parsed(row, "status", DeliveryStatus::parse)?,
        attempts: count(row, "attempts")?,
        next_attempt_at: time_at(row, "next_attempt_at")?,
        created_at: time_at(row, "created_at")?,
        provider_message_id: row.try_get("provider_message_id")?,
        last_error: row.try_get("last_error")?,
        client_ip: row.try_get("client_ip")?,
        user_id: opt_parsed(row, "user_id", UserId::parse)?,
    })
}

pub(crate) const AUDIT_COLUMNS: &str =
    "tenant_id, user_id, kind, detail, ip, latitude, longitude, mode, at";

pub(crate) fn audit(row: &PgRow) -> sqlx::Result<AuditEvent> {
    Ok(AuditEvent {
        tenant_id: parsed(row, "tenant_id", TenantId::parse)?,
        user_id: opt_parsed(row, "user_id", UserId::parse)?,
        kind: parsed(row, "kind", AuditKind::parse)?,
        detail: row.try_get("detail")?,
        context: RequestContext {
            ip: row.try_get("ip")?,
            latitude: row.try_get("latitude")?,
            longitude: row.try_get("longitude")?,
            mode: row.try_get("mode")?,
            locale: None,
        },
        at: time_at(row, "at")?,
    })
}
