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

fn bad(column: impl std::fmt::Display, what: &str) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: format!("invalid stored {what}").into(),
    }
}

/// Where a mapping finds a column: its name (`&str`), or its position (`usize`) in a select list
/// built from the `*_COLUMNS` constants, which spares the row a lookup of the name (see
/// [`login_context`]).
trait ColumnKey: sqlx::ColumnIndex<PgRow> + std::fmt::Display + Copy {}
impl ColumnKey for &str {}
impl ColumnKey for usize {}

fn to_time(column: impl std::fmt::Display, millis: i64) -> sqlx::Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .map_err(|_| bad(column, "time"))
}

fn time_at(row: &PgRow, column: impl ColumnKey) -> sqlx::Result<OffsetDateTime> {
    to_time(column, row.try_get(column)?)
}

fn opt_time_at(row: &PgRow, column: impl ColumnKey) -> sqlx::Result<Option<OffsetDateTime>> {
    let millis: Option<i64> = row.try_get(column)?;
    millis.map(|m| to_time(column, m)).transpose()
}

fn parsed<T>(
    row: &PgRow,
    column: impl ColumnKey,
    parse: impl FnOnce(&str) -> Result<T, otpgate_core::CoreError>,
) -> sqlx::Result<T> {
    let text: &str = row.try_get(column)?;
    parse(text).map_err(|_| bad(column, "value"))
}

fn opt_parsed<T>(
    row: &PgRow,
    column: impl ColumnKey,
    parse: impl FnOnce(&str) -> Result<T, otpgate_core::CoreError>,
) -> sqlx::Result<Option<T>> {
    let text: Option<&str> = row.try_get(column)?;
    text.map(|t| parse(t).map_err(|_| bad(column, "value")))
        .transpose()
}

fn hash32(row: &PgRow, column: impl ColumnKey) -> sqlx::Result<[u8; 32]> {
    let bytes: &[u8] = row.try_get(column)?;
    bytes.try_into().map_err(|_| bad(column, "hash"))
}

fn count(row: &PgRow, column: impl ColumnKey) -> sqlx::Result<u32> {
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

/// A user from its columns, each found by `$at(position in USER_COLUMNS, name)`: by name in a
/// read of the table, by position in the joined read of [`login_context`], so one mapping serves
/// both.
macro_rules! user_from {
    ($row:expr, $at:expr) => {{
        let at = $at;
        User {
            id: parsed($row, at(0, "id"), UserId::parse)?,
            tenant_id: parsed($row, at(1, "tenant_id"), TenantId::parse)?,
            username: parsed($row, at(2, "username"), Username::parse)?,
            email: opt_parsed($row, at(3, "email"), Email::parse)?,
            phone: opt_parsed($row, at(4, "phone"), E164Phone::parse)?,
            role: parsed($row, at(5, "role"), Role::parse)?,
            password_hash: $row.try_get(at(6, "password_hash"))?,
            mobile_verified_at: opt_time_at($row, at(7, "mobile_verified_at"))?,
            email_verified_at: opt_time_at($row, at(8, "email_verified_at"))?,
            failed_logins: count($row, at(9, "failed_logins"))?,
            locked_until: opt_time_at($row, at(10, "locked_until"))?,
            created_at: time_at($row, at(11, "created_at"))?,
            user_type: $row
                .try_get::<Option<i64>, _>(at(12, "user_type"))?
                .map(|t| u16::try_from(t).map_err(|_| bad(at(12, "user_type"), "user type")))
                .transpose()?,
        }
    }};
}
pub(crate) fn user(row: &PgRow) -> sqlx::Result<User> {
    Ok(user_from!(row, |_, name| name))
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

/// A challenge from its columns, each found by `$at(position in CHALLENGE_COLUMNS, name)`, as
/// [`user_from`].
macro_rules! challenge_from {
    ($row:expr, $at:expr) => {{
        let at = $at;
        Challenge {
            id: parsed($row, at(0, "id"), ChallengeId::parse)?,
            tenant_id: parsed($row, at(1, "tenant_id"), TenantId::parse)?,
            user_id: opt_parsed($row, at(2, "user_id"), UserId::parse)?,
            purpose: parsed($row, at(3, "purpose"), Purpose::parse)?,
            channel: parsed($row, at(4, "channel"), Channel::parse)?,
            destination: $row.try_get(at(5, "destination"))?,
            code_hash: $row.try_get(at(6, "code_hash"))?,
            locale: $row.try_get(at(7, "locale"))?,
            created_at: time_at($row, at(8, "created_at"))?,
            expires_at: time_at($row, at(9, "expires_at"))?,
            last_sent_at: time_at($row, at(10, "last_sent_at"))?,
            send_count: count($row, at(11, "send_count"))?,
            attempts: count($row, at(12, "attempts"))?,
            max_attempts: count($row, at(13, "max_attempts"))?,
            status: parsed($row, at(14, "status"), ChallengeStatus::parse)?,
        }
    }};
}
pub(crate) fn challenge(row: &PgRow) -> sqlx::Result<Challenge> {
    Ok(challenge_from!(row, |_, name| name))
}

pub(crate) const TICKET_COLUMNS: &str =
    "hash, tenant_id, user_id, challenge_id, channel, created_at, expires_at, used_at";

pub(crate) fn ticket(row: &PgRow) -> sqlx::Result<LoginTicket> {
    ticket_from(row, |_, name| name)
}

/// A login ticket from its columns, each found by `at(position in TICKET_COLUMNS, name)`.
fn ticket_from<C: ColumnKey>(
    row: &PgRow,
    at: impl Fn(usize, &'static str) -> C,
) -> sqlx::Result<LoginTicket> {
    Ok(LoginTicket {
        hash: hash32(row, at(0, "hash"))?,
        tenant_id: parsed(row, at(1, "tenant_id"), TenantId::parse)?,
        user_id: parsed(row, at(2, "user_id"), UserId::parse)?,
        challenge_id: parsed(row, at(3, "challenge_id"), ChallengeId::parse)?,
        channel: parsed(row, at(4, "channel"), Channel::parse)?,
        created_at: time_at(row, at(5, "created_at"))?,
        expires_at: time_at(row, at(6, "expires_at"))?,
        used_at: opt_time_at(row, at(7, "used_at"))?,
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

/// Where the joined read of a login's rows (`LOGIN_CONTEXTS_BY_HASH`) puts each table's
/// columns: the ticket's first, then the user's, then the challenge's, each in the order of its
/// `*_COLUMNS` list.
const USER_AT: usize = width(TICKET_COLUMNS);
const CHALLENGE_AT: usize = USER_AT + width(USER_COLUMNS);

/// The columns a `*_COLUMNS` list names (as the SQLite store's `rows::width`).
const fn width(columns: &str) -> usize {
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

/// The position of the joined read's column `prefix` + `name`, found at `at`: the select list
/// is built from the `*_COLUMNS` constants ([`prefixed`]), so a row is read by position, which
/// spares it a lookup of each of its 36 names in the statement's map of them (decoding the row
/// was a tenth of the server's CPU a login on PostgreSQL by `perf`; by position it takes a fifth
/// fewer instructions by callgrind). Debug builds, and so the tests, check the name there.
fn joined_column(row: &PgRow, at: usize, prefix: &str, name: &str) -> usize {
    debug_assert!(
        row.try_column(at)
            .is_ok_and(|c| sqlx::Column::name(c).strip_prefix(prefix) == Some(name)),
        "column {at} of the login read is not {prefix}{name}"
    );
    at
}

/// A login ticket with its user (`u_` columns) and challenge (`c_` columns), as a left join
/// read them: `None` where the row is missing or belongs to another tenant.
pub(crate) fn login_context(row: &PgRow) -> sqlx::Result<otpgate_core::store::LoginContext> {
    let ticket = ticket_from(row, |i, name| joined_column(row, i, "", name))?;
    // A missing row of a left join reads as NULLs: its key says whether there is one.
    let user = match row.try_get::<Option<&str>, _>(joined_column(row, USER_AT, "u_", "id"))? {
        Some(_) => Some(user_from!(row, |i, name| {
            joined_column(row, USER_AT + i, "u_", name)
        })),
        None => None,
    }
    .filter(|u: &User| u.tenant_id == ticket.tenant_id);
    let challenge =
        match row.try_get::<Option<&str>, _>(joined_column(row, CHALLENGE_AT, "c_", "id"))? {
            Some(_) => Some(challenge_from!(row, |i, name| {
                joined_column(row, CHALLENGE_AT + i, "c_", name)
            })),
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
