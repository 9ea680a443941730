//! Row ↔ domain conversions. Times are stored as Unix milliseconds.

use otpgate_core::identity::{E164Phone, Email, Username};
use otpgate_core::model::{
    ApiKey, ApiKeyId, AuditEvent, AuditKind, Challenge, ChallengeId, ChallengeStatus, Channel,
    DeliveryStatus, FactorId, JwtKey, KeyId, LoginTicket, MessageId, OutboxMessage, Purpose,
    RequestContext, Role, Session, Tenant, TenantId, TotpFactor, User, UserId,
};
use otpgate_core::otp::{Algorithm, TotpParams};
use rusqlite::Row;
use rusqlite::types::{Type, ValueRef};
use time::OffsetDateTime;

/// Unix milliseconds of a time.
pub(crate) fn ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn bad(column: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        column,
        Type::Text,
        format!("invalid stored {what}").into(),
    )
}

fn time_at(row: &Row<'_>, column: usize) -> rusqlite::Result<OffsetDateTime> {
    let millis: i64 = row.get(column)?;
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .map_err(|_| bad(column, "time"))
}

fn opt_time_at(row: &Row<'_>, column: usize) -> rusqlite::Result<Option<OffsetDateTime>> {
    let millis: Option<i64> = row.get(column)?;
    millis
        .map(|m| {
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(m) * 1_000_000)
                .map_err(|_| bad(column, "time"))
        })
        .transpose()
}

/// A text column, borrowed from the row (`None` for NULL): parsing it needs no copy of its own.
fn text<'row>(row: &'row Row<'_>, column: usize) -> rusqlite::Result<Option<&'row str>> {
    match row.get_ref(column)? {
        ValueRef::Null => Ok(None),
        ValueRef::Text(bytes) => std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|e| rusqlite::Error::Utf8Error(column, e)),
        other => Err(wrong_type(row, column, other.data_type())),
    }
}

/// The error of a column whose stored type is not the one read, as `Row::get` names it.
fn wrong_type(row: &Row<'_>, column: usize, found: Type) -> rusqlite::Error {
    let name = row
        .as_ref()
        .column_name(column)
        .map(str::to_owned)
        .unwrap_or_default();
    rusqlite::Error::InvalidColumnType(column, name, found)
}

fn parsed<T>(
    row: &Row<'_>,
    column: usize,
    parse: impl FnOnce(&str) -> Result<T, otpgate_core::CoreError>,
) -> rusqlite::Result<T> {
    let text = text(row, column)?.ok_or_else(|| wrong_type(row, column, Type::Null))?;
    parse(text).map_err(|_| bad(column, "value"))
}

fn opt_parsed<T>(
    row: &Row<'_>,
    column: usize,
    parse: impl FnOnce(&str) -> Result<T, otpgate_core::CoreError>,
) -> rusqlite::Result<Option<T>> {
    text(row, column)?
        .map(|t| parse(t).map_err(|_| bad(column, "value")))
        .transpose()
}

fn hash32(row: &Row<'_>, column: usize) -> rusqlite::Result<[u8; 32]> {
    match row.get_ref(column)? {
        ValueRef::Blob(bytes) => bytes.try_into().map_err(|_| bad(column, "hash")),
        other => Err(wrong_type(row, column, other.data_type())),
    }
}

fn count(row: &Row<'_>, column: usize) -> rusqlite::Result<u32> {
    let n: i64 = row.get(column)?;
    u32::try_from(n).map_err(|_| bad(column, "count"))
}

/// How many columns a column list (`a, b, c`) names.
pub(crate) const fn width(columns: &str) -> usize {
    let mut rest = columns.as_bytes();
    let mut commas = 0;
    while let [first, tail @ ..] = rest {
        if *first == b',' {
            commas += 1;
        }
        rest = tail;
    }
    commas + 1
}

pub(crate) const TENANT_COLUMNS: &str = "id, name, is_default, created_at, settings";

pub(crate) fn tenant(row: &Row<'_>) -> rusqlite::Result<Tenant> {
    Ok(Tenant {
        id: parsed(row, 0, TenantId::parse)?,
        name: row.get(1)?,
        is_default: row.get::<_, i64>(2)? != 0,
        created_at: time_at(row, 3)?,
        settings: serde_json::from_str(&row.get::<_, String>(4)?)
            .map_err(|_| bad(4, "settings"))?,
    })
}

pub(crate) const USER_COLUMNS: &str = "id, tenant_id, username, email, phone, role, password_hash, \
     mobile_verified_at, email_verified_at, failed_logins, locked_until, created_at, user_type";

pub(crate) fn user(row: &Row<'_>) -> rusqlite::Result<User> {
    user_from(row, 0)
}

/// A user whose columns start at `base` (of a join).
pub(crate) fn user_from(row: &Row<'_>, base: usize) -> rusqlite::Result<User> {
    Ok(User {
        id: parsed(row, base, UserId::parse)?,
        tenant_id: parsed(row, base + 1, TenantId::parse)?,
        username: parsed(row, base + 2, Username::parse)?,
        email: opt_parsed(row, base + 3, Email::parse)?,
        phone: opt_parsed(row, base + 4, E164Phone::parse)?,
        role: parsed(row, base + 5, Role::parse)?,
        password_hash: row.get(base + 6)?,
        mobile_verified_at: opt_time_at(row, base + 7)?,
        email_verified_at: opt_time_at(row, base + 8)?,
        failed_logins: count(row, base + 9)?,
        locked_until: opt_time_at(row, base + 10)?,
        created_at: time_at(row, base + 11)?,
        user_type: row
            .get::<_, Option<i64>>(base + 12)?
            .map(|t| u16::try_from(t).map_err(|_| bad(base + 12, "user type")))
            .transpose()?,
    })
}

pub(crate) const JWT_KEY_COLUMNS: &str = "id, tenant_id, secret_sealed, created_at, verify_until";

pub(crate) fn jwt_key(row: &Row<'_>) -> rusqlite::Result<JwtKey> {
    Ok(JwtKey {
        id: parsed(row, 0, KeyId::parse)?,
        tenant_id: parsed(row, 1, TenantId::parse)?,
        secret_sealed: row.get(2)?,
        created_at: time_at(row, 3)?,
        verify_until: opt_time_at(row, 4)?,
    })
}

pub(crate) const API_KEY_COLUMNS: &str = "id, tenant_id, name, key_hash, created_at, revoked_at";

pub(crate) fn api_key(row: &Row<'_>) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        id: parsed(row, 0, ApiKeyId::parse)?,
        tenant_id: parsed(row, 1, TenantId::parse)?,
        name: row.get(2)?,
        hash: hash32(row, 3)?,
        created_at: time_at(row, 4)?,
        revoked_at: opt_time_at(row, 5)?,
    })
}

pub(crate) const CHALLENGE_COLUMNS: &str = "id, tenant_id, user_id, purpose, channel, destination, \
     code_hash, locale, created_at, expires_at, last_sent_at, send_count, attempts, max_attempts, status";

pub(crate) fn challenge(row: &Row<'_>) -> rusqlite::Result<Challenge> {
    challenge_from(row, 0)
}

/// A challenge whose columns start at `base` (of a join).
pub(crate) fn challenge_from(row: &Row<'_>, base: usize) -> rusqlite::Result<Challenge> {
    Ok(Challenge {
        id: parsed(row, base, ChallengeId::parse)?,
        tenant_id: parsed(row, base + 1, TenantId::parse)?,
        user_id: opt_parsed(row, base + 2, UserId::parse)?,
        purpose: parsed(row, base + 3, Purpose::parse)?,
        channel: parsed(row, base + 4, Channel::parse)?,
        destination: row.get(base + 5)?,
        code_hash: row.get(base + 6)?,
        locale: row.get(base + 7)?,
        created_at: time_at(row, base + 8)?,
        expires_at: time_at(row, base + 9)?,
        last_sent_at: time_at(row, base + 10)?,
        send_count: count(row, base + 11)?,
        attempts: count(row, base + 12)?,
        max_attempts: count(row, base + 13)?,
        status: parsed(row, base + 14, ChallengeStatus::parse)?,
    })
}

pub(crate) const TICKET_COLUMNS: &str =
    "hash, tenant_id, user_id, challenge_id, channel, created_at, expires_at, used_at";

pub(crate) fn ticket(row: &Row<'_>) -> rusqlite::Result<LoginTicket> {
    ticket_from(row, 0)
}

/// A ticket whose columns start at `base` (of a join).
pub(crate) fn ticket_from(row: &Row<'_>, base: usize) -> rusqlite::Result<LoginTicket> {
    Ok(LoginTicket {
        hash: hash32(row, base)?,
        tenant_id: parsed(row, base + 1, TenantId::parse)?,
        user_id: parsed(row, base + 2, UserId::parse)?,
        challenge_id: parsed(row, base + 3, ChallengeId::parse)?,
        channel: parsed(row, base + 4, Channel::parse)?,
        created_at: time_at(row, base + 5)?,
        expires_at: time_at(row, base + 6)?,
        used_at: opt_time_at(row, base + 7)?,
    })
}

pub(crate) const SESSION_COLUMNS: &str =
    "hash, tenant_id, user_id, created_at, expires_at, revoked_at";

pub(crate) fn session(row: &Row<'_>) -> rusqlite::Result<Session> {
    Ok(Session {
        hash: hash32(row, 0)?,
        tenant_id: parsed(row, 1, TenantId::parse)?,
        user_id: parsed(row, 2, UserId::parse)?,
        created_at: time_at(row, 3)?,
        expires_at: time_at(row, 4)?,
        revoked_at: opt_time_at(row, 5)?,
    })
}

pub(crate) const FACTOR_COLUMNS: &str = "id, tenant_id, user_id, secret_sealed, algorithm, digits, \
     period, confirmed_at, last_step, created_at";

pub(crate) fn factor(row: &Row<'_>) -> rusqlite::Result<TotpFactor> {
    let digits: i64 = row.get(5)?;
    let period: i64 = row.get(6)?;
    Ok(TotpFactor {
        id: parsed(row, 0, FactorId::parse)?,
        tenant_id: parsed(row, 1, TenantId::parse)?,
        user_id: parsed(row, 2, UserId::parse)?,
        secret_sealed: row.get(3)?,
        params: TotpParams {
            algorithm: parsed(row, 4, Algorithm::parse)?,
            digits: u8::try_from(digits).map_err(|_| bad(5, "digits"))?,
            period: u32::try_from(period).map_err(|_| bad(6, "period"))?,
        },
        confirmed_at: opt_time_at(row, 7)?,
        last_step: row.get(8)?,
        created_at: time_at(row, 9)?,
    })
}

pub(crate) const MESSAGE_COLUMNS: &str = "id, tenant_id, challenge_id, channel, destination, purpose, \
     locale, body, code, status, attempts, next_attempt_at, created_at, provider_message_id, last_error, \
     client_ip, user_id";

pub(crate) fn message(row: &Row<'_>) -> rusqlite::Result<OutboxMessage> {
    Ok(OutboxMessage {
        id: parsed(row, 0, MessageId::parse)?,
        tenant_id: parsed(row, 1, TenantId::parse)?,
        challenge_id: opt_parsed(row, 2, ChallengeId::parse)?,
        channel: parsed(row, 3, Channel::parse)?,
        destination: row.get(4)?,
        purpose: parsed(row, 5, Purpose::parse)?,
        locale: row.get(6)?,
        body: row.get(7)?,
        code: row.get(8)?,
        status: parsed(row, 9, DeliveryStatus::parse)?,
        attempts: count(row, 10)?,
        next_attempt_at: time_at(row, 11)?,
        created_at: time_at(row, 12)?,
        provider_message_id: row.get(13)?,
        last_error: row.get(14)?,
        client_ip: row.get(15)?,
        user_id: opt_parsed(row, 16, UserId::parse)?,
    })
}

pub(crate) const AUDIT_COLUMNS: &str =
    "tenant_id, user_id, kind, detail, ip, latitude, longitude, mode, at";

pub(crate) fn audit(row: &Row<'_>) -> rusqlite::Result<AuditEvent> {
    Ok(AuditEvent {
        tenant_id: parsed(row, 0, TenantId::parse)?,
        user_id: opt_parsed(row, 1, UserId::parse)?,
        kind: parsed(row, 2, AuditKind::parse)?,
        detail: row.get(3)?,
        context: RequestContext {
            ip: row.get(4)?,
            latitude: row.get(5)?,
            longitude: row.get(6)?,
            mode: row.get(7)?,
            locale: None,
        },
        at: time_at(row, 8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_lists_width_counts_its_columns() {
        // Arrange, act, assert: the login context's join reads its rows at these offsets.
        assert_eq!(width("a"), 1);
        assert_eq!(width(TICKET_COLUMNS), 8);
        assert_eq!(width(USER_COLUMNS), 13);
        assert_eq!(width(CHALLENGE_COLUMNS), 15);
    }
}
