//! The [`Store`] implementation: one method per use case; multi-row writes in one transaction.

use async_trait::async_trait;
use otpgate_core::StoreError;
use otpgate_core::model::{
    ApiKey, ApiKeyId, AuditEvent, Challenge, ChallengeId, FactorId, JwtKey, LoginTicket, MessageId,
    OutboxMessage, Session, Tenant, TenantId, TotpFactor, User, UserId,
};
use otpgate_core::policy::PolicyOverrides;
use otpgate_core::store::{
    ChallengeJudge, CodeReplacement, Contact, LoginCompletion, LoginContext, LoginJudge,
    PhoneCompletion, QueryPlan, RangeOutcomes, SealedKind, SealedSecret, SendScope, Settled,
    SettledLogin, Store, StoreResult,
};
use sqlx::postgres::PgRow;
// Dynamic SQL here is built only from the constant column lists in `rows`; every value is bound.
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Row as _, Transaction};
use time::OffsetDateTime;

use crate::rows::{self, ms};
use crate::{PgStore, db, map_error};

type Tx = Transaction<'static, Postgres>;

/// The audit insert of [`bind_audit`]: any number of events in one statement (one round trip).
pub(crate) const INSERT_AUDIT: &str = "INSERT INTO audit_events \
     (tenant_id, user_id, kind, detail, ip, latitude, longitude, mode, at) \
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
     $6::float8[], $7::float8[], $8::text[], $9::int8[])";

/// `INSERT_AUDIT` for a batch: each event comes with the element of one more array (`tag`,
/// as `$n::type[]`) named `name`, and only the events whose tag passes `keep` (a condition on
/// `e.<name>`) are written.
pub(crate) fn tagged_audit_insert(tag: &str, name: &str, keep: &str) -> String {
    format!(
        "INSERT INTO audit_events \
         (tenant_id, user_id, kind, detail, ip, latitude, longitude, mode, at) \
         SELECT e.tenant_id, e.user_id, e.kind, e.detail, e.ip, e.latitude, e.longitude, \
             e.mode, e.at \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::float8[], $7::float8[], $8::text[], $9::int8[], {tag}) \
         AS e(tenant_id, user_id, kind, detail, ip, latitude, longitude, mode, at, {name}) \
         WHERE {keep}"
    )
}

/// Binds `events` as the nine arrays `INSERT_AUDIT` (or a statement ending with it) takes first.
pub(crate) fn bind_audit<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    events: &[AuditEvent],
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    let texts = |f: &dyn Fn(&AuditEvent) -> Option<String>| -> Vec<Option<String>> {
        events.iter().map(f).collect()
    };
    query
        .bind(texts(&|e| Some(e.tenant_id.as_str().to_owned())))
        .bind(texts(&|e| {
            e.user_id.as_ref().map(|u| u.as_str().to_owned())
        }))
        .bind(texts(&|e| Some(e.kind.as_str().to_owned())))
        .bind(texts(&|e| Some(e.detail.clone())))
        .bind(texts(&|e| e.context.ip.clone()))
        .bind(
            events
                .iter()
                .map(|e| e.context.latitude)
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.context.longitude)
                .collect::<Vec<_>>(),
        )
        .bind(texts(&|e| e.context.mode.clone()))
        .bind(events.iter().map(|e| ms(e.at)).collect::<Vec<_>>())
}

async fn insert_audit(conn: &mut PgConnection, events: &[AuditEvent]) -> StoreResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    bind_audit(sqlx::query(INSERT_AUDIT), events)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// A challenge's columns, bound in this order after whatever the statement binds first.
pub(crate) const CHALLENGE_INSERT_COLUMNS: &str = "id, tenant_id, user_id, purpose, channel, destination, \
     code_hash, locale, created_at, expires_at, last_sent_at, send_count, attempts, max_attempts, \
     status";

fn bind_challenge<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    c: &'q Challenge,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(c.id.as_str())
        .bind(c.tenant_id.as_str())
        .bind(c.user_id.as_ref().map(|u| u.as_str()))
        .bind(c.purpose.as_str())
        .bind(c.channel.as_str())
        .bind(&c.destination)
        .bind(&c.code_hash)
        .bind(&c.locale)
        .bind(ms(c.created_at))
        .bind(ms(c.expires_at))
        .bind(ms(c.last_sent_at))
        .bind(i64::from(c.send_count))
        .bind(i64::from(c.attempts))
        .bind(i64::from(c.max_attempts))
        .bind(c.status.as_str())
}

/// An outbox message's columns, bound in this order by [`bind_message`].
pub(crate) const MESSAGE_INSERT_COLUMNS: &str = "id, tenant_id, challenge_id, channel, destination, purpose, \
     locale, body, code, status, attempts, next_attempt_at, created_at, client_ip, user_id";

fn bind_message<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    m: &'q OutboxMessage,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(m.id.as_str())
        .bind(m.tenant_id.as_str())
        .bind(m.challenge_id.as_ref().map(|c| c.as_str()))
        .bind(m.channel.as_str())
        .bind(&m.destination)
        .bind(m.purpose.as_str())
        .bind(&m.locale)
        .bind(&m.body)
        .bind(&m.code)
        .bind(m.status.as_str())
        .bind(i64::from(m.attempts))
        .bind(ms(m.next_attempt_at))
        .bind(ms(m.created_at))
        .bind(&m.client_ip)
        .bind(m.user_id.as_ref().map(|u| u.as_str()))
}

/// `$first, $first+1, …` for `n` columns.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A new challenge with its audit events (`$1`-`$9`), and its first message if it has one,
/// as one statement: one round trip instead of BEGIN, three INSERTs and COMMIT. Built once.
static NEW_CHALLENGE: std::sync::LazyLock<[String; 2]> = std::sync::LazyLock::new(|| {
    let challenge = format!(
        "challenge AS (INSERT INTO challenges ({CHALLENGE_INSERT_COLUMNS}) VALUES ({}))",
        placeholders(10, 15)
    );
    let message = format!(
        "message AS (INSERT INTO outbox ({MESSAGE_INSERT_COLUMNS}) VALUES ({}))",
        placeholders(25, 15)
    );
    [
        format!("WITH {challenge}, audit AS ({INSERT_AUDIT}) SELECT 1"),
        format!("WITH {challenge}, {message}, audit AS ({INSERT_AUDIT}) SELECT 1"),
    ]
});

/// One challenge, and one outbox message, each alone (built once).
static INSERT_CHALLENGE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO challenges ({CHALLENGE_INSERT_COLUMNS}) VALUES ({})",
        placeholders(1, 15)
    )
});
static INSERT_MESSAGE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO outbox ({MESSAGE_INSERT_COLUMNS}) VALUES ({})",
        placeholders(1, 15)
    )
});

async fn insert_challenge(conn: &mut PgConnection, c: &Challenge) -> StoreResult<()> {
    let sql: &'static str = INSERT_CHALLENGE.as_str();
    bind_challenge(sqlx::query(AssertSqlSafe(sql)), c)
        .execute(&mut *conn)
        .await
        .map_err(|e| map_error(e, "challenge"))?;
    Ok(())
}

async fn insert_message(conn: &mut PgConnection, m: &OutboxMessage) -> StoreResult<()> {
    let sql: &'static str = INSERT_MESSAGE.as_str();
    bind_message(sqlx::query(AssertSqlSafe(sql)), m)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// A user's columns, bound in the order of `rows::USER_COLUMNS`.
fn bind_user<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    u: &'q User,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(u.id.as_str())
        .bind(u.tenant_id.as_str())
        .bind(u.username.as_str())
        .bind(u.email.as_ref().map(|e| e.as_str()))
        .bind(u.phone.as_ref().map(|p| p.as_str()))
        .bind(u.role.as_str())
        .bind(&u.password_hash)
        .bind(u.mobile_verified_at.map(ms))
        .bind(u.email_verified_at.map(ms))
        .bind(i64::from(u.failed_logins))
        .bind(u.locked_until.map(ms))
        .bind(ms(u.created_at))
        .bind(u.user_type.map(i64::from))
}

/// Inserts a user; with `or_ignore`, an existing user of the same phone and type (or name) wins.
async fn insert_user(conn: &mut PgConnection, u: &User, or_ignore: bool) -> StoreResult<()> {
    let sql = if or_ignore {
        "INSERT INTO users (id, tenant_id, username, email, phone, role, password_hash, \
         mobile_verified_at, email_verified_at, failed_logins, locked_until, created_at, user_type) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT DO NOTHING"
    } else {
        "INSERT INTO users (id, tenant_id, username, email, phone, role, password_hash, \
         mobile_verified_at, email_verified_at, failed_logins, locked_until, created_at, user_type) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
    };
    bind_user(sqlx::query(sql), u)
        .execute(&mut *conn)
        .await
        .map_err(|e| map_error(e, "username"))?;
    Ok(())
}

async fn insert_session(conn: &mut PgConnection, s: &Session) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO sessions (hash, tenant_id, user_id, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(s.hash.as_slice())
    .bind(s.tenant_id.as_str())
    .bind(s.user_id.as_str())
    .bind(ms(s.created_at))
    .bind(ms(s.expires_at))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// The one statement that consumes a challenge: pending, unexpired, attempts unchanged.
const CONSUME_CHALLENGE: &str = "UPDATE challenges SET status = 'approved', resolved_at = $3 \
     WHERE id = $1 AND attempts = $2 AND status = 'pending' AND expires_at > $3";

/// The send limits' counts: each stops at the limit (`$4`), so a busy scope costs no more
/// than its limit.
const SENDS_TO_DESTINATION: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM outbox \
     WHERE tenant_id = $1 AND destination = $2 AND created_at > $3 LIMIT $4) AS sends";
/// A range on the destination index: every number that starts with the prefix.
const SENDS_TO_COUNTRY: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM outbox \
     WHERE tenant_id = $1 AND destination >= $2 AND destination < $2 || ':' \
     AND created_at > $3 LIMIT $4) AS sends";
const SENDS_FROM_IP: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM outbox \
     WHERE tenant_id = $1 AND client_ip = $2 AND created_at > $3 LIMIT $4) AS sends";
const SENDS_OF_USER: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM outbox \
     WHERE tenant_id = $1 AND user_id = $2 AND created_at > $3 LIMIT $4) AS sends";

/// Two windows of one scope counted by one statement: the count above twice, the second with
/// `$5` and `$6` for its window and limit (`$1`, `$2` are shared).
fn two_windows(count: &str) -> String {
    let second = count.replace("$3", "$5").replace("$4", "$6");
    format!("SELECT ({count}), ({second})")
}

/// A scope's count statement (one window), its [`two_windows`] form, and the key both bind
/// as `$2`.
fn send_count_of(scope: &SendScope) -> (&'static str, &'static str, String) {
    static TWO_WINDOWS: std::sync::LazyLock<[String; 4]> = std::sync::LazyLock::new(|| {
        [
            SENDS_TO_DESTINATION,
            SENDS_TO_COUNTRY,
            SENDS_FROM_IP,
            SENDS_OF_USER,
        ]
        .map(two_windows)
    });
    let [destination, country, ip, user] = &*TWO_WINDOWS;
    match scope {
        SendScope::Destination(d) => (SENDS_TO_DESTINATION, destination, d.clone()),
        SendScope::CountryPrefix(p) => (SENDS_TO_COUNTRY, country, p.clone()),
        SendScope::Ip(a) => (SENDS_FROM_IP, ip, a.clone()),
        SendScope::User(u) => (SENDS_OF_USER, user, u.to_string()),
    }
}

/// The statements of the hot paths whose plans [`Store::query_plans`] shows: the writes as
/// they run, the reads with the `WHERE` they run with (their column lists change no plan).
const HOT_STATEMENTS: [(&str, &str); 6] = [
    ("session by hash", "SELECT * FROM sessions WHERE hash = $1"),
    ("consume a challenge", CONSUME_CHALLENGE),
    ("sends to a destination", SENDS_TO_DESTINATION),
    ("sends to a country", SENDS_TO_COUNTRY),
    ("sends from an address", SENDS_FROM_IP),
    ("sends of an account", SENDS_OF_USER),
];

/// The usual login's completion as one statement (see `PgStore::complete_code_login`), built
/// once: it runs on every login.
static CODE_LOGIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(code_login_statement);

// The account statements find the user by its primary key and check the tenant on the row:
// `IS NOT DISTINCT FROM` (the same as `=` here, tenant ids are never NULL) is no index
// condition. With `tenant_id = $1` the generic plan of a statement prepared on an empty table
// took the (tenant_id, username) index and walked every user of the tenant on each wrong code.

/// A wrong password or code counted against the account, with its audit events (`$1`-`$9`),
/// as one statement; the count after it comes back (built once).
static COUNT_LOGIN_FAILURE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH counted AS ( \
             UPDATE users SET failed_logins = failed_logins + 1 \
             WHERE id = $11 AND tenant_id IS NOT DISTINCT FROM $10 RETURNING failed_logins), \
         audit AS ({INSERT_AUDIT} WHERE EXISTS (SELECT 1 FROM counted)) \
         SELECT failed_logins FROM counted"
    )
});
const LOCK_ACCOUNT: &str = "UPDATE users SET locked_until = GREATEST(COALESCE(locked_until, 0), $3) \
     WHERE id = $2 AND tenant_id IS NOT DISTINCT FROM $1";
const UNLOCK_ACCOUNT: &str = "UPDATE users SET failed_logins = 0, locked_until = NULL \
     WHERE id = $2 AND tenant_id IS NOT DISTINCT FROM $1";

/// A phone (or e-mail) verification's whole change as one statement: the challenge consumed,
/// the user found by phone and type or inserted (verified already), an existing user marked
/// verified, the device recorded and the events written, each only when the challenge was
/// consumed. `$1`-`$9` are the events (their user is the one chosen here), `$10`-`$12` the
/// challenge, its attempts and the moment, `$13`-`$25` the candidate user's columns, `$26`-`$28`
/// the device. One row comes back: whether the challenge was consumed, and the user after the
/// change (NULL columns when the statement saw none: a user inserted meanwhile by another
/// transaction is outside its snapshot). Built once, for a verified phone and a verified e-mail.
static PHONE_VERIFICATION: std::sync::LazyLock<[String; 2]> = std::sync::LazyLock::new(|| {
    let cols = rows::USER_COLUMNS;
    let statement = |mark_verified: &str| {
        format!(
            "WITH consumed AS ( \
                 UPDATE challenges SET status = 'approved', resolved_at = $12 \
                 WHERE id = $10 AND attempts = $11 AND status = 'pending' AND expires_at > $12 \
                 RETURNING 1), \
             inserted AS ( \
                 INSERT INTO users ({cols}) \
                 SELECT $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25 \
                 WHERE EXISTS (SELECT 1 FROM consumed) \
                 ON CONFLICT DO NOTHING RETURNING {cols}), \
             existing AS ( \
                 SELECT id FROM users \
                 WHERE tenant_id = $14 AND phone = $17 AND user_type = $25 \
                 AND EXISTS (SELECT 1 FROM consumed)), \
             verified AS ( \
                 UPDATE users u SET {mark_verified} FROM existing e WHERE u.id = e.id \
                 RETURNING {}), \
             chosen AS (SELECT id FROM inserted UNION ALL SELECT id FROM existing), \
             device AS ( \
                 INSERT INTO devices (tenant_id, user_id, device_unique_id, device_id, \
                     device_type, first_seen_at, last_seen_at) \
                 SELECT $14, c.id, $26, $27, $28, $12, $12 FROM chosen c \
                 ON CONFLICT (user_id, device_unique_id) DO UPDATE SET \
                 device_id = excluded.device_id, device_type = excluded.device_type, \
                 last_seen_at = excluded.last_seen_at), \
             audit AS ( \
                 INSERT INTO audit_events \
                 (tenant_id, user_id, kind, detail, ip, latitude, longitude, mode, at) \
                 SELECT e.tenant_id, c.id, e.kind, e.detail, e.ip, e.latitude, e.longitude, \
                     e.mode, e.at \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                     $6::float8[], $7::float8[], $8::text[], $9::int8[]) \
                 AS e(tenant_id, user_id, kind, detail, ip, latitude, longitude, mode, at) \
                 CROSS JOIN chosen c) \
             SELECT EXISTS (SELECT 1 FROM consumed) AS consumed, after.* \
             FROM (SELECT 1) AS one LEFT JOIN \
                 (SELECT {cols} FROM inserted UNION ALL SELECT {cols} FROM verified) AS after \
             ON true",
            cols.split(", ")
                .map(|c| format!("u.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    [
        statement("mobile_verified_at = COALESCE(u.mobile_verified_at, $12)"),
        statement(
            "email_verified_at = COALESCE(u.email_verified_at, $12), \
             email = COALESCE(u.email, $16)",
        ),
    ]
});

/// How [`phone_verification_at_once`] ended.
enum AtOnce {
    Completed(Box<User>),
    NotConsumed,
    UserNotSeen,
}

/// [`PHONE_VERIFICATION`] in `tx`.
async fn phone_verification_at_once(tx: &mut Tx, done: &PhoneCompletion) -> StoreResult<AtOnce> {
    let [phone, email] = &*PHONE_VERIFICATION;
    // A new user is inserted verified already: the statement cannot change a row it inserts.
    let mut candidate = done.candidate.clone();
    let sql: &'static str = match done.verified {
        Contact::Phone => {
            candidate.mobile_verified_at = candidate.mobile_verified_at.or(Some(done.now));
            phone
        }
        Contact::Email => {
            candidate.email_verified_at = candidate.email_verified_at.or(Some(done.now));
            email
        }
    };
    let u = &candidate;
    let d = &done.device;
    let query = bind_audit(sqlx::query(AssertSqlSafe(sql)), &done.audit)
        .bind(done.challenge_id.as_str())
        .bind(i64::from(done.expected_attempts))
        .bind(ms(done.now));
    let row = bind_user(query, u)
        .bind(&d.device_unique_id)
        .bind(&d.device_id)
        .bind(&d.device_type)
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| map_error(e, "user"))?;
    let consumed: bool = sqlx::Row::try_get(&row, "consumed").map_err(db)?;
    let seen: Option<String> = sqlx::Row::try_get(&row, "id").map_err(db)?;
    Ok(match (consumed, seen) {
        (false, _) => AtOnce::NotConsumed,
        (true, None) => AtOnce::UserNotSeen,
        (true, Some(_)) => AtOnce::Completed(Box::new(rows::user(&row).map_err(db)?)),
    })
}

/// A message marked sent with its audit events, as one statement (built once).
static MARK_SENT_WITH_AUDIT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH sent AS ( \
             UPDATE outbox SET status = 'sent', body = NULL, code = NULL, \
             provider_message_id = $11, sent_at = $12, last_error = NULL WHERE id = $10) \
         {INSERT_AUDIT}"
    )
});

/// `change` (an `UPDATE … RETURNING 1` on `$10`-`$12`) with the audit events of `$1`-`$9`,
/// written only if it changed a row, as one statement answering whether it did.
fn changed_with_audit(change: &str) -> String {
    format!(
        "WITH changed AS ({change}), \
         audit AS ({INSERT_AUDIT} WHERE EXISTS (SELECT 1 FROM changed)) \
         SELECT EXISTS (SELECT 1 FROM changed)"
    )
}

/// A wrong code counted against its challenge (the last allowed one ends it), with its events.
static FAILED_CHECK_WITH_AUDIT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    changed_with_audit(
        "UPDATE challenges SET attempts = attempts + 1, \
         status = CASE WHEN attempts + 1 >= max_attempts \
             THEN 'max_attempts_reached' ELSE status END, \
         resolved_at = CASE WHEN attempts + 1 >= max_attempts THEN $12 ELSE resolved_at END \
         WHERE id = $10 AND attempts = $11 AND status = 'pending' AND expires_at > $12 \
         RETURNING 1",
    )
});

/// A code check's consumption, with its events.
static CONSUME_WITH_AUDIT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    changed_with_audit(
        "UPDATE challenges SET status = 'approved', resolved_at = $12 \
         WHERE id = $10 AND attempts = $11 AND status = 'pending' AND expires_at > $12 \
         RETURNING 1",
    )
});

// A login's user is changed by its primary key alone (the user came with the ticket, of the
// same tenant): with `tenant_id = …` beside it, the generic plan took the (tenant_id, username)
// index and walked every user of the tenant on each login.
fn code_login_statement() -> String {
    format!(
        "WITH consumed AS ( \
                 UPDATE challenges SET status = 'approved', resolved_at = $12 \
                 WHERE id = $13 AND attempts = $14 AND status = 'pending' AND expires_at > $12 \
                 AND EXISTS (SELECT 1 FROM login_tickets \
                     WHERE hash = $15 AND used_at IS NULL AND expires_at > $12) \
                 RETURNING 1), \
             spent AS ( \
                 UPDATE login_tickets SET used_at = $12 \
                 WHERE hash = $15 AND used_at IS NULL AND expires_at > $12 \
                 AND EXISTS (SELECT 1 FROM consumed) RETURNING 1), \
             reset AS ( \
                 UPDATE users SET failed_logins = 0, locked_until = NULL \
                 WHERE id = $11 \
                 AND (failed_logins <> 0 OR locked_until IS NOT NULL) \
                 AND EXISTS (SELECT 1 FROM spent)), \
             session AS ( \
                 INSERT INTO sessions (hash, tenant_id, user_id, created_at, expires_at) \
                 SELECT $16, $10, $11, $17, $18 \
                 WHERE $16::bytea IS NOT NULL AND EXISTS (SELECT 1 FROM spent)), \
             audit AS ({INSERT_AUDIT} WHERE EXISTS (SELECT 1 FROM spent)) \
             SELECT EXISTS (SELECT 1 FROM spent)"
    )
}

/// Which moment a sweep statement's `$1` is.
#[derive(Clone, Copy)]
pub(crate) enum SweepCutoff {
    /// Rows that expired by now: tickets, sessions and revocations are dead at expiry.
    Now,
    /// Rows settled longer ago than the retention: challenges and messages are kept that long
    /// for delivery status and send budgets.
    RetentionAgo,
}

/// The sweeper's deletes, `$2` rows at most each, the oldest first. Every one finds its rows
/// through an index (`query_plans` shows it, the contract suite checks it): a sweep costs what
/// it deletes, never the table's size. The `ORDER BY` is what holds the planner to that index:
/// without it, on a table without statistics (a new one, or autovacuum off) it guesses that a
/// third of the rows have expired, and a scan that stops at the `LIMIT` looks cheaper than the
/// index, so a sweep that found nothing read every ticket, or walked every challenge by its key
/// (100,000 live ones: 62 and 151 ms a round). Spent tickets and revoked sessions wait for
/// their expiry (minutes, hours): a spent or revoked row is refused all the same, and an
/// `OR used_at IS NOT NULL` would scan the table.
pub(crate) const SWEEP_STATEMENTS: [(&str, &str, SweepCutoff); 5] = [
    (
        "sweep revocations",
        "DELETE FROM revoked_tokens WHERE jti IN (SELECT jti FROM revoked_tokens \
         WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2)",
        SweepCutoff::Now,
    ),
    (
        "sweep login tickets",
        "DELETE FROM login_tickets WHERE hash IN (SELECT hash FROM login_tickets \
         WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2)",
        SweepCutoff::Now,
    ),
    (
        "sweep sessions",
        "DELETE FROM sessions WHERE hash IN (SELECT hash FROM sessions \
         WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2)",
        SweepCutoff::Now,
    ),
    (
        "sweep settled messages",
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
         WHERE status <> 'queued' AND created_at < $1 ORDER BY created_at LIMIT $2)",
        SweepCutoff::RetentionAgo,
    ),
    (
        "sweep challenges",
        "DELETE FROM challenges WHERE id IN (SELECT c.id FROM challenges c \
         WHERE c.expires_at < $1 \
         AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.challenge_id = c.id) \
         AND NOT EXISTS (SELECT 1 FROM login_tickets t WHERE t.challenge_id = c.id) \
         ORDER BY c.expires_at LIMIT $2)",
        SweepCutoff::RetentionAgo,
    ),
];

/// Numbers the statements [`Store::query_plans`] prepares.
static PLAN_NAMES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The highest `$n` in `sql`: how many parameters a prepared copy of it takes.
fn parameter_count(sql: &str) -> usize {
    sql.split('$')
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<usize>().ok()
        })
        .max()
        .unwrap_or(0)
}

async fn consume(
    conn: &mut PgConnection,
    id: &ChallengeId,
    expected_attempts: u32,
    now: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(CONSUME_CHALLENGE)
        .bind(id.as_str())
        .bind(i64::from(expected_attempts))
        .bind(ms(now))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(done.rows_affected() == 1)
}

fn decode<T>(mapper: fn(&PgRow) -> sqlx::Result<T>) -> impl Fn(PgRow) -> StoreResult<T> {
    move |row| mapper(&row).map_err(db)
}

/// A tenant's audit events (of one user, or of all when `$2` is NULL), newest first: a walk of
/// the `(tenant_id, id)` key backwards, which stops at the limit (`$3`).
pub(crate) static AUDIT_NEWEST_FIRST: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| {
        format!(
            "SELECT {} FROM audit_events \
             WHERE tenant_id = $1 AND ($2::TEXT IS NULL OR user_id = $2) \
             ORDER BY id DESC LIMIT $3",
            rows::AUDIT_COLUMNS
        )
    });

/// Point reads of many keys at once, for the lookup batchers; each statement built once.
static TICKETS_BY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {} FROM login_tickets WHERE hash = ANY($1::bytea[])",
        rows::TICKET_COLUMNS
    )
});
static CHALLENGES_BY_ID: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {} FROM challenges WHERE id = ANY($1::text[])",
        rows::CHALLENGE_COLUMNS
    )
});
static USERS_BY_ID: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {} FROM users WHERE id = ANY($1::text[])",
        rows::USER_COLUMNS
    )
});

/// A login's three rows by its ticket's hash, for many tickets at once: a login step waits for
/// one batch where it waited for two in a row (the ticket, then its user and challenge). The
/// user and the challenge are joined by their primary keys alone, the tenant checked on the
/// rows (as for a user or a challenge by id).
pub(crate) static LOGIN_CONTEXTS_BY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| {
        format!(
            "SELECT {}, {}, {} FROM login_tickets t \
             LEFT JOIN users u ON u.id = t.user_id \
             LEFT JOIN challenges c ON c.id = t.challenge_id \
             WHERE t.hash = ANY($1::bytea[])",
            rows::prefixed(rows::TICKET_COLUMNS, "t", ""),
            rows::prefixed(rows::USER_COLUMNS, "u", "u_"),
            rows::prefixed(rows::CHALLENGE_COLUMNS, "c", "c_"),
        )
    });

type Fetched<K, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = StoreResult<Vec<(K, T)>>> + Send>>;

pub(crate) fn fetch_tickets(
    store: PgStore,
    hashes: Vec<[u8; 32]>,
) -> Fetched<[u8; 32], LoginTicket> {
    fetch_by_hash(store, TICKETS_BY_HASH.as_str(), hashes, rows::ticket, |t| {
        t.hash
    })
}

pub(crate) fn fetch_login_contexts(
    store: PgStore,
    hashes: Vec<[u8; 32]>,
) -> Fetched<[u8; 32], LoginContext> {
    fetch_by_hash(
        store,
        LOGIN_CONTEXTS_BY_HASH.as_str(),
        hashes,
        rows::login_context,
        |c| c.ticket.hash,
    )
}

/// The rows of `sql` (a `hash = ANY($1)` read of login tickets) keyed by their ticket's hash.
fn fetch_by_hash<T: Send + 'static>(
    store: PgStore,
    sql: &'static str,
    hashes: Vec<[u8; 32]>,
    mapper: fn(&PgRow) -> sqlx::Result<T>,
    hash_of: fn(&T) -> [u8; 32],
) -> Fetched<[u8; 32], T> {
    Box::pin(async move {
        let hashes: Vec<Vec<u8>> = hashes.iter().map(|h| h.to_vec()).collect();
        let query = sqlx::query(AssertSqlSafe(sql)).bind(hashes);
        let found = store.fetch_all(query, mapper).await?;
        Ok(found.into_iter().map(|row| (hash_of(&row), row)).collect())
    })
}

pub(crate) fn fetch_users(store: PgStore, ids: Vec<String>) -> Fetched<String, User> {
    fetch_by_id(store, USERS_BY_ID.as_str(), ids, rows::user, |u| {
        u.id.as_str()
    })
}

pub(crate) fn fetch_challenges(store: PgStore, ids: Vec<String>) -> Fetched<String, Challenge> {
    fetch_by_id(
        store,
        CHALLENGES_BY_ID.as_str(),
        ids,
        rows::challenge,
        |c| c.id.as_str(),
    )
}

/// What the send path asks of a destination before it queues a code: its newest pending
/// challenge of a purpose (a lookup of the `pending` batcher).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct PendingOf {
    tenant: String,
    purpose: String,
    destination: String,
    now: i64,
}

/// Each asked destination's newest pending challenge, one statement for the batch: `k.i` says
/// whose row it is.
static PENDING_BY_DESTINATION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT k.i, c.* \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[]) \
              WITH ORDINALITY AS k(tenant_id, purpose, destination, now_ms, i) \
         CROSS JOIN LATERAL ( \
             SELECT {} FROM challenges \
             WHERE tenant_id = k.tenant_id AND destination = k.destination \
             AND purpose = k.purpose AND status = 'pending' AND expires_at > k.now_ms \
             ORDER BY created_at DESC, id DESC LIMIT 1) AS c",
        rows::CHALLENGE_COLUMNS
    )
});

pub(crate) fn fetch_pending(store: PgStore, keys: Vec<PendingOf>) -> Fetched<PendingOf, Challenge> {
    Box::pin(async move {
        let sql: &'static str = PENDING_BY_DESTINATION.as_str();
        let query = sqlx::query(AssertSqlSafe(sql))
            .bind(keys.iter().map(|k| k.tenant.clone()).collect::<Vec<_>>())
            .bind(keys.iter().map(|k| k.purpose.clone()).collect::<Vec<_>>())
            .bind(
                keys.iter()
                    .map(|k| k.destination.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(keys.iter().map(|k| k.now).collect::<Vec<_>>());
        let found = store
            .fetch_all(query, |row| Ok((ordinal(row)?, rows::challenge(row)?)))
            .await?;
        keyed_by_ordinal(&keys, found)
    })
}

/// A number's two send limits (window and day) as the send path counts them: a lookup of the
/// `destination_sends` batcher.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct DestinationWindows {
    tenant: String,
    destination: String,
    /// Each window's start and the most it counts to.
    windows: [(i64, i64); 2],
}

/// Each asked number's sends in its two windows, one statement for the batch (each count stops
/// at its limit, as [`SENDS_TO_DESTINATION`] does).
const SENDS_TO_DESTINATIONS: &str = "SELECT k.i, \
     (SELECT COUNT(*) FROM (SELECT 1 FROM outbox WHERE tenant_id = k.tenant_id \
         AND destination = k.destination AND created_at > k.since_1 LIMIT k.most_1) AS sends), \
     (SELECT COUNT(*) FROM (SELECT 1 FROM outbox WHERE tenant_id = k.tenant_id \
         AND destination = k.destination AND created_at > k.since_2 LIMIT k.most_2) AS sends) \
     FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[]) \
          WITH ORDINALITY AS k(tenant_id, destination, since_1, most_1, since_2, most_2, i)";

pub(crate) fn fetch_destination_sends(
    store: PgStore,
    keys: Vec<DestinationWindows>,
) -> Fetched<DestinationWindows, (i64, i64)> {
    Box::pin(async move {
        let window = |first: bool| {
            keys.iter().map(move |k| {
                let [one, two] = k.windows;
                if first { one } else { two }
            })
        };
        let query = sqlx::query(AssertSqlSafe(SENDS_TO_DESTINATIONS))
            .bind(keys.iter().map(|k| k.tenant.clone()).collect::<Vec<_>>())
            .bind(
                keys.iter()
                    .map(|k| k.destination.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(window(true).map(|w| w.0).collect::<Vec<_>>())
            .bind(window(true).map(|w| w.1).collect::<Vec<_>>())
            .bind(window(false).map(|w| w.0).collect::<Vec<_>>())
            .bind(window(false).map(|w| w.1).collect::<Vec<_>>());
        let found = store
            .fetch_all(query, |row| {
                Ok((
                    ordinal(row)?,
                    (row.try_get::<i64, _>(1)?, row.try_get::<i64, _>(2)?),
                ))
            })
            .await?;
        keyed_by_ordinal(&keys, found)
    })
}

/// The `WITH ORDINALITY` number of a batched read's row (1 for the first key).
fn ordinal(row: &PgRow) -> sqlx::Result<i64> {
    row.try_get("i")
}

/// Pairs each row of a batched read with the key it was read for.
fn keyed_by_ordinal<K: Clone, T>(keys: &[K], found: Vec<(i64, T)>) -> StoreResult<Vec<(K, T)>> {
    found
        .into_iter()
        .map(|(i, row)| {
            let key = usize::try_from(i - 1).ok().and_then(|i| keys.get(i));
            key.map(|k| (k.clone(), row))
                .ok_or_else(|| StoreError::Other(format!("a batched read answered for key {i}")))
        })
        .collect()
}

/// The rows of `sql` (an `id = ANY($1)` read) keyed by their id.
fn fetch_by_id<T: Send + 'static>(
    store: PgStore,
    sql: &'static str,
    ids: Vec<String>,
    mapper: fn(&PgRow) -> sqlx::Result<T>,
    id_of: fn(&T) -> &str,
) -> Fetched<String, T> {
    Box::pin(async move {
        let query = sqlx::query(AssertSqlSafe(sql)).bind(ids);
        let found = store.fetch_all(query, mapper).await?;
        Ok(found
            .into_iter()
            .map(|row| (id_of(&row).to_owned(), row))
            .collect())
    })
}

impl PgStore {
    /// Runs one of the [`changed_with_audit`] statements on a challenge: whether it changed.
    async fn change_challenge(
        &self,
        sql: &'static str,
        id: &ChallengeId,
        expected_attempts: u32,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        bind_audit(sqlx::query(AssertSqlSafe(sql)), audit)
            .bind(id.as_str())
            .bind(i64::from(expected_attempts))
            .bind(ms(now))
            .fetch_one(self.pool())
            .await
            .map_err(db)?
            .try_get(0)
            .map_err(db)
    }

    async fn begin(&self) -> StoreResult<Tx> {
        self.pool().begin().await.map_err(db)
    }

    async fn fetch_optional<T>(
        &self,
        query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
        mapper: fn(&PgRow) -> sqlx::Result<T>,
    ) -> StoreResult<Option<T>> {
        query
            .fetch_optional(self.pool())
            .await
            .map_err(db)?
            .map(decode(mapper))
            .transpose()
    }

    async fn fetch_all<T>(
        &self,
        query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
        mapper: fn(&PgRow) -> sqlx::Result<T>,
    ) -> StoreResult<Vec<T>> {
        query
            .fetch_all(self.pool())
            .await
            .map_err(db)?
            .into_iter()
            .map(decode(mapper))
            .collect()
    }

    /// Runs one conditional statement plus its audit events; true when exactly one row changed.
    async fn conditional(
        &self,
        query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let changed = query.execute(&mut *tx).await.map_err(db)?.rows_affected();
        if changed != 1 {
            return Ok(false);
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }
}

/// The table of each kind of sealed secret; every one keeps it in `id` and `secret_sealed`.
fn sealed_table(kind: SealedKind) -> &'static str {
    match kind {
        SealedKind::TotpFactor => "totp_factors",
        SealedKind::JwtKey => "tenant_keys",
        SealedKind::ServerSecret => "server_secrets",
    }
}

impl PgStore {
    /// The common login (a ticket and its SMS or e-mail code, nothing else to spend or mark) in
    /// one statement, so one round trip and no explicit transaction: the challenge is consumed
    /// only while the ticket is still unspent, the ticket spent only if the challenge was, and
    /// the failure reset, the session and the audit events written only if both were. A
    /// statement is atomic, so either all of it commits or none. The ticket and its challenge
    /// change together everywhere, and a concurrent consumer waits on the challenge's row lock
    /// and then finds it approved, so "consumed but not spent" cannot happen; were it to, the
    /// answer is still `false` (fail closed).
    /// A new challenge with its first message and audit rows, in one statement of its own.
    pub(crate) async fn insert_new_challenge(
        &self,
        challenge: &Challenge,
        message: Option<&OutboxMessage>,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let [alone, with_message] = &*NEW_CHALLENGE;
        let sql: &'static str = if message.is_some() {
            with_message
        } else {
            alone
        };
        let query = bind_challenge(
            bind_audit(sqlx::query(AssertSqlSafe(sql)), audit),
            challenge,
        );
        let query = match message {
            Some(m) => bind_message(query, m),
            None => query,
        };
        query
            .execute(self.pool())
            .await
            .map_err(|e| map_error(e, "challenge"))?;
        Ok(())
    }

    /// Marks one message sent, with its audit rows, in one statement of its own.
    pub(crate) async fn mark_one_message_sent(
        &self,
        id: &MessageId,
        provider_message_id: Option<&str>,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let sql: &'static str = MARK_SENT_WITH_AUDIT.as_str();
        bind_audit(sqlx::query(AssertSqlSafe(sql)), audit)
            .bind(id.as_str())
            .bind(provider_message_id)
            .bind(audit.first().map(|e| ms(e.at)))
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Counts one wrong code with its audit rows, in one statement of its own.
    pub(crate) async fn count_failed_check(
        &self,
        id: &ChallengeId,
        expected_attempts: u32,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        self.change_challenge(&FAILED_CHECK_WITH_AUDIT, id, expected_attempts, now, audit)
            .await
    }

    /// Counts one failed login with its audit rows, in one statement of its own.
    pub(crate) async fn count_login_failure(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &[AuditEvent],
    ) -> StoreResult<u32> {
        let sql: &'static str = COUNT_LOGIN_FAILURE.as_str();
        let row = bind_audit(sqlx::query(AssertSqlSafe(sql)), audit)
            .bind(tenant.as_str())
            .bind(user.as_str())
            .fetch_one(self.pool())
            .await
            .map_err(db)?;
        let failures: i64 = sqlx::Row::try_get(&row, 0).map_err(db)?;
        Ok(u32::try_from(failures).unwrap_or(u32::MAX))
    }

    pub(crate) async fn complete_code_login(
        &self,
        done: &LoginCompletion,
        ticket: &[u8; 32],
    ) -> StoreResult<bool> {
        let sql: &'static str = CODE_LOGIN.as_str();
        let session = done.session.as_ref();
        let done_ok: bool = bind_audit(sqlx::query(AssertSqlSafe(sql)), &done.audit)
            .bind(done.tenant_id.as_str())
            .bind(done.user_id.as_str())
            .bind(ms(done.now))
            .bind(done.challenge_id.as_str())
            .bind(i64::from(done.expected_attempts))
            .bind(ticket.as_slice())
            .bind(session.map(|s| s.hash.to_vec()))
            .bind(session.map(|s| ms(s.created_at)))
            .bind(session.map(|s| ms(s.expires_at)))
            .fetch_one(self.pool())
            .await
            .map_err(db)?
            .try_get(0)
            .map_err(db)?;
        Ok(done_ok)
    }
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> StoreResult<()> {
        // Every idle connection, held at once so that each ping meets another one. Connections
        // are not tested before use (see `connect`), and the batched statements use only a few
        // of them, so after a database restart the others would stay in the pool, dead, each
        // failing one request later; a probe drops them instead, and so heals the pool.
        // Ready once one connection answers and no idle one is left untried; every connection
        // of the pool and one new one at most.
        let mut held = Vec::new();
        let mut last_error = None;
        for _ in 0..=self.pool().size() {
            let mut conn = self.pool().acquire().await.map_err(db)?;
            match sqlx::Connection::ping(&mut *conn).await {
                Ok(()) => held.push(conn),
                Err(e) => {
                    conn.close_on_drop();
                    last_error = Some(e);
                }
            }
            if !held.is_empty() && self.pool().num_idle() == 0 {
                return Ok(());
            }
        }
        match last_error {
            Some(e) if held.is_empty() => Err(db(e)),
            _ => Ok(()),
        }
    }

    async fn insert_tenant(&self, t: &Tenant) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO tenants (id, name, is_default, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(t.id.as_str())
        .bind(&t.name)
        .bind(i64::from(t.is_default))
        .bind(ms(t.created_at))
        .execute(self.pool())
        .await
        .map_err(|e| map_error(e, "tenant"))?;
        Ok(())
    }

    async fn ensure_default_tenant(&self, t: &Tenant) -> StoreResult<Tenant> {
        sqlx::query(
            "INSERT INTO tenants (id, name, is_default, created_at) VALUES ($1, $2, 1, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(t.id.as_str())
        .bind(&t.name)
        .bind(ms(t.created_at))
        .execute(self.pool())
        .await
        .map_err(|e| map_error(e, "tenant"))?;
        let sql = format!(
            "SELECT {} FROM tenants WHERE is_default = 1",
            rows::TENANT_COLUMNS
        );
        self.fetch_optional(sqlx::query(AssertSqlSafe(sql)), rows::tenant)
            .await?
            .ok_or_else(|| StoreError::Other("default tenant missing".into()))
    }

    async fn set_tenant_settings(
        &self,
        id: &TenantId,
        settings: &PolicyOverrides,
    ) -> StoreResult<bool> {
        let json = serde_json::to_string(settings).map_err(|e| StoreError::Other(e.to_string()))?;
        let done = sqlx::query("UPDATE tenants SET settings = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(json)
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    async fn get_tenant(&self, id: &TenantId) -> StoreResult<Option<Tenant>> {
        let sql = format!("SELECT {} FROM tenants WHERE id = $1", rows::TENANT_COLUMNS);
        self.fetch_optional(
            sqlx::query(AssertSqlSafe(sql)).bind(id.as_str()),
            rows::tenant,
        )
        .await
    }

    async fn insert_user(&self, u: &User, audit: &[AuditEvent]) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        insert_user(&mut tx, u, false).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn find_user_by_username(
        &self,
        tenant: &TenantId,
        username: &str,
    ) -> StoreResult<Option<User>> {
        let sql = format!(
            "SELECT {} FROM users WHERE tenant_id = $1 AND username = $2",
            rows::USER_COLUMNS
        );
        self.fetch_optional(
            sqlx::query(AssertSqlSafe(sql))
                .bind(tenant.as_str())
                .bind(username),
            rows::user,
        )
        .await
    }

    async fn find_user_by_phone(
        &self,
        tenant: &TenantId,
        phone: &str,
    ) -> StoreResult<Option<User>> {
        let sql = format!(
            "SELECT {} FROM users WHERE tenant_id = $1 AND phone = $2 ORDER BY created_at LIMIT 1",
            rows::USER_COLUMNS
        );
        self.fetch_optional(
            sqlx::query(AssertSqlSafe(sql))
                .bind(tenant.as_str())
                .bind(phone),
            rows::user,
        )
        .await
    }

    async fn get_user(&self, tenant: &TenantId, id: &UserId) -> StoreResult<Option<User>> {
        // By the primary key alone, the tenant checked on the row: with `tenant_id = $1` in the
        // WHERE, a prepared statement planned while the table was empty could settle on the
        // (tenant_id, username) index and later walk every user of the tenant.
        Ok(
            crate::lookup::look_up(&self.users, self, id.as_str().to_owned())
                .await?
                .filter(|user| user.tenant_id == *tenant),
        )
    }

    async fn record_login_failure(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &[AuditEvent],
    ) -> StoreResult<u32> {
        // A wrong code is what an attacker sends most: the counts that arrive together share
        // a statement (see the `failures` module).
        self.login_failures
            .ask(
                |reply| crate::failures::LoginFailure {
                    store: self.clone(),
                    tenant: tenant.clone(),
                    user: user.clone(),
                    audit: audit.to_vec(),
                    reply,
                },
                "failed login",
            )
            .await
    }

    async fn unlock_user(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        self.conditional(
            sqlx::query(UNLOCK_ACCOUNT)
                .bind(tenant.as_str())
                .bind(user.as_str()),
            audit,
        )
        .await
    }

    async fn lock_user(
        &self,
        tenant: &TenantId,
        user: &UserId,
        until: OffsetDateTime,
    ) -> StoreResult<()> {
        sqlx::query(LOCK_ACCOUNT)
            .bind(tenant.as_str())
            .bind(user.as_str())
            .bind(ms(until))
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn insert_api_key(&self, k: &ApiKey, audit: &[AuditEvent]) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, key_hash, created_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(k.id.as_str())
        .bind(k.tenant_id.as_str())
        .bind(&k.name)
        .bind(k.hash.as_slice())
        .bind(ms(k.created_at))
        .bind(k.revoked_at.map(ms))
        .execute(&mut *tx)
        .await
        .map_err(|e| map_error(e, "api key"))?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn find_api_key(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiKey>> {
        let sql = format!(
            "SELECT {} FROM api_keys WHERE key_hash = $1",
            rows::API_KEY_COLUMNS
        );
        self.fetch_optional(
            sqlx::query(AssertSqlSafe(sql)).bind(hash.as_slice()),
            rows::api_key,
        )
        .await
    }

    async fn insert_challenge(
        &self,
        challenge: &Challenge,
        message: Option<&OutboxMessage>,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        self.new_challenges
            .ask(
                |reply| crate::send_writes::NewChallenge {
                    store: self.clone(),
                    challenge: challenge.clone(),
                    message: message.cloned(),
                    audit: audit.to_vec(),
                    reply,
                },
                "new challenge",
            )
            .await
    }

    async fn get_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
    ) -> StoreResult<Option<Challenge>> {
        // By the primary key alone, the tenant checked on the row (as for a user by id).
        Ok(
            crate::lookup::look_up(&self.challenges, self, id.as_str().to_owned())
                .await?
                .filter(|challenge| challenge.tenant_id == *tenant),
        )
    }

    async fn find_pending_challenge(
        &self,
        tenant: &TenantId,
        purpose: &str,
        destination: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Challenge>> {
        let key = PendingOf {
            tenant: tenant.as_str().to_owned(),
            purpose: purpose.to_owned(),
            destination: destination.to_owned(),
            now: ms(now),
        };
        crate::lookup::look_up(&self.pending, self, key).await
    }

    async fn resend_challenge(
        &self,
        r: &CodeReplacement,
        message: &OutboxMessage,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let changed = sqlx::query(
            "UPDATE challenges SET code_hash = $3, last_sent_at = $4, expires_at = $5, \
             send_count = send_count + 1 \
             WHERE id = $1 AND send_count = $2 AND status = 'pending' AND expires_at > $4",
        )
        .bind(r.id.as_str())
        .bind(i64::from(r.expected_sends))
        .bind(&r.code_hash)
        .bind(ms(r.sent_at))
        .bind(ms(r.expires_at))
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if changed != 1 {
            return Ok(false);
        }
        insert_message(&mut tx, message).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn record_failed_check(
        &self,
        id: &ChallengeId,
        expected_attempts: u32,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        // A wrong code is what an attacker sends most: the ones that arrive together share a
        // statement (see the `failures` module).
        self.failed_checks
            .ask(
                |reply| crate::failures::FailedCheck {
                    store: self.clone(),
                    id: id.clone(),
                    expected_attempts,
                    now,
                    audit: audit.to_vec(),
                    reply,
                },
                "wrong code",
            )
            .await
    }

    async fn consume_challenge(
        &self,
        id: &ChallengeId,
        expected_attempts: u32,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        // One statement, so one round trip and no explicit transaction (BEGIN, UPDATE,
        // INSERT, COMMIT were four): its audit rows are written only if it consumed.
        self.change_challenge(&CONSUME_WITH_AUDIT, id, expected_attempts, now, audit)
            .await
    }

    async fn settle_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        judge: ChallengeJudge,
    ) -> StoreResult<Option<Settled>> {
        self.settles
            .ask(
                |reply| crate::settle::SettleRequest {
                    store: self.clone(),
                    tenant: tenant.clone(),
                    id: id.clone(),
                    judge,
                    reply,
                },
                "code check",
            )
            .await
    }

    async fn cancel_challenge(
        &self,
        id: &ChallengeId,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        self.conditional(
            sqlx::query(
                "UPDATE challenges SET status = 'canceled', resolved_at = $2 \
                 WHERE id = $1 AND status = 'pending' AND expires_at > $2",
            )
            .bind(id.as_str())
            .bind(ms(now)),
            audit,
        )
        .await
    }

    async fn count_sends(
        &self,
        tenant: &TenantId,
        scope: &SendScope,
        since: OffsetDateTime,
        at_most: u32,
    ) -> StoreResult<u32> {
        let (sql, _, key) = send_count_of(scope);
        let n: i64 = sqlx::query_scalar(sql)
            .bind(tenant.as_str())
            .bind(key)
            .bind(ms(since))
            .bind(i64::from(at_most))
            .fetch_one(self.pool())
            .await
            .map_err(db)?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    async fn count_sends_in_windows(
        &self,
        tenant: &TenantId,
        scope: &SendScope,
        windows: &[(OffsetDateTime, u32)],
    ) -> StoreResult<Vec<u32>> {
        let &[(first_since, first_most), (second_since, second_most)] = windows else {
            return otpgate_core::store::count_sends_one_window_at_a_time(
                self, tenant, scope, windows,
            )
            .await;
        };
        if let SendScope::Destination(destination) = scope {
            // Every send counts its number's two windows: those counts share a statement.
            let key = DestinationWindows {
                tenant: tenant.as_str().to_owned(),
                destination: destination.clone(),
                windows: [
                    (ms(first_since), i64::from(first_most)),
                    (ms(second_since), i64::from(second_most)),
                ],
            };
            let (first, second) = crate::lookup::look_up(&self.destination_sends, self, key)
                .await?
                .ok_or_else(|| StoreError::Other("a number's send count went missing".into()))?;
            return Ok([first, second]
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
                .to_vec());
        }
        let (_, sql, key) = send_count_of(scope);
        let (first, second): (i64, i64) = sqlx::query_as(AssertSqlSafe(sql))
            .bind(tenant.as_str())
            .bind(key)
            .bind(ms(first_since))
            .bind(i64::from(first_most))
            .bind(ms(second_since))
            .bind(i64::from(second_most))
            .fetch_one(self.pool())
            .await
            .map_err(db)?;
        Ok([first, second]
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
            .to_vec())
    }

    async fn sms_range_outcomes(
        &self,
        tenant: &TenantId,
        prefix: &str,
        since: OffsetDateTime,
        now: OffsetDateTime,
    ) -> StoreResult<RangeOutcomes> {
        let (settled, verified): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE status = 'approved') FROM challenges \
             WHERE tenant_id = $1 AND created_at > $3 AND channel = 'sms' \
             AND starts_with(destination, $2) \
             AND status <> 'canceled' AND (status <> 'pending' OR expires_at <= $4)",
        )
        .bind(tenant.as_str())
        .bind(prefix)
        .bind(ms(since))
        .bind(ms(now))
        .fetch_one(self.pool())
        .await
        .map_err(db)?;
        Ok(RangeOutcomes {
            settled: u32::try_from(settled).unwrap_or(u32::MAX),
            verified: u32::try_from(verified).unwrap_or(u32::MAX),
        })
    }

    async fn insert_login_ticket(
        &self,
        t: &LoginTicket,
        challenge: &Challenge,
        message: Option<&OutboxMessage>,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        insert_challenge(&mut tx, challenge).await?;
        if let Some(m) = message {
            insert_message(&mut tx, m).await?;
        }
        sqlx::query(
            "INSERT INTO login_tickets (hash, tenant_id, user_id, challenge_id, channel, \
             created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(t.hash.as_slice())
        .bind(t.tenant_id.as_str())
        .bind(t.user_id.as_str())
        .bind(t.challenge_id.as_str())
        .bind(t.channel.as_str())
        .bind(ms(t.created_at))
        .bind(ms(t.expires_at))
        .execute(&mut *tx)
        .await
        .map_err(|e| map_error(e, "login ticket"))?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn get_login_ticket(&self, hash: &[u8; 32]) -> StoreResult<Option<LoginTicket>> {
        crate::lookup::look_up(&self.tickets, self, *hash).await
    }

    async fn get_login_context(&self, hash: &[u8; 32]) -> StoreResult<Option<LoginContext>> {
        crate::lookup::look_up(&self.login_contexts, self, *hash).await
    }

    async fn settle_login(
        &self,
        ticket_hash: &[u8; 32],
        judge: LoginJudge,
    ) -> StoreResult<Option<SettledLogin>> {
        self.login_settles
            .ask(
                |reply| crate::login::SettleLoginRequest {
                    store: self.clone(),
                    ticket: *ticket_hash,
                    judge,
                    reply,
                },
                "login",
            )
            .await
    }

    async fn complete_login(&self, done: &LoginCompletion) -> StoreResult<bool> {
        if let Some(ticket) = crate::login::code_login_ticket(done) {
            return self
                .logins
                .ask(
                    |reply| crate::login::LoginRequest {
                        store: self.clone(),
                        done: done.clone(),
                        ticket,
                        reply,
                    },
                    "login",
                )
                .await;
        }
        // Few round trips: each costs more here than the work of its statement. Returning
        // false drops the transaction, which rolls back whatever it did.
        let mut tx = self.begin().await?;
        let now = ms(done.now);
        let consumed = match &done.ticket_hash {
            // The ticket is spent and its challenge consumed by one statement.
            Some(ticket) => {
                sqlx::query(
                    "WITH spent AS ( \
                     UPDATE login_tickets SET used_at = $3 \
                     WHERE hash = $4 AND used_at IS NULL AND expires_at > $3 RETURNING 1) \
                 UPDATE challenges SET status = 'approved', resolved_at = $3 \
                 WHERE id = $1 AND attempts = $2 AND status = 'pending' AND expires_at > $3 \
                 AND EXISTS (SELECT 1 FROM spent)",
                )
                .bind(done.challenge_id.as_str())
                .bind(i64::from(done.expected_attempts))
                .bind(now)
                .bind(ticket.as_slice())
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected()
                    == 1
            }
            None => {
                consume(
                    &mut tx,
                    &done.challenge_id,
                    done.expected_attempts,
                    done.now,
                )
                .await?
            }
        };
        if !consumed {
            return Ok(false);
        }
        if let Some(hash) = &done.recovery_code {
            let spent = sqlx::query(
                "UPDATE recovery_codes SET used_at = $4 \
                 WHERE tenant_id = $1 AND user_id = $2 AND code_hash = $3 AND used_at IS NULL",
            )
            .bind(done.tenant_id.as_str())
            .bind(done.user_id.as_str())
            .bind(hash.as_slice())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            if spent.rows_affected() != 1 {
                return Ok(false);
            }
        }
        if let Some((factor, step)) = &done.totp_step {
            let advanced = sqlx::query(
                "UPDATE totp_factors SET last_step = $2 \
                 WHERE id = $1 AND confirmed_at IS NOT NULL \
                 AND (last_step IS NULL OR last_step < $2)",
            )
            .bind(factor.as_str())
            .bind(step)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            if advanced.rows_affected() != 1 {
                return Ok(false);
            }
        }
        if let Some(contact) = done.verified {
            sqlx::query(match contact {
                Contact::Phone => {
                    "UPDATE users SET mobile_verified_at = COALESCE(mobile_verified_at, $3) \
                     WHERE tenant_id = $1 AND id = $2"
                }
                Contact::Email => {
                    "UPDATE users SET email_verified_at = COALESCE(email_verified_at, $3) \
                     WHERE tenant_id = $1 AND id = $2"
                }
            })
            .bind(done.tenant_id.as_str())
            .bind(done.user_id.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        // The failure count reset, the session and the audit events: one statement. The user
        // by its primary key alone, as in `code_login_statement` (`$10` is bound all the same).
        let finish = format!(
            "WITH reset AS ( \
                 UPDATE users SET failed_logins = 0, locked_until = NULL \
                 WHERE id = $11 AND $10::text IS NOT NULL \
                 AND (failed_logins <> 0 OR locked_until IS NOT NULL)), \
             session AS ( \
                 INSERT INTO sessions (hash, tenant_id, user_id, created_at, expires_at) \
                 SELECT $12, $15, $16, $13, $14 WHERE $12::bytea IS NOT NULL) \
             {INSERT_AUDIT}"
        );
        let session = done.session.as_ref();
        bind_audit(sqlx::query(AssertSqlSafe(finish)), &done.audit)
            .bind(done.tenant_id.as_str())
            .bind(done.user_id.as_str())
            .bind(session.map(|s| s.hash.to_vec()))
            .bind(session.map(|s| ms(s.created_at)))
            .bind(session.map(|s| ms(s.expires_at)))
            .bind(session.map(|s| s.tenant_id.as_str().to_owned()))
            .bind(session.map(|s| s.user_id.as_str().to_owned()))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn insert_session(&self, session: &Session, audit: &[AuditEvent]) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        insert_session(&mut tx, session).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn get_session(&self, hash: &[u8; 32]) -> StoreResult<Option<Session>> {
        let sql = format!(
            "SELECT {} FROM sessions WHERE hash = $1",
            rows::SESSION_COLUMNS
        );
        self.fetch_optional(
            sqlx::query(AssertSqlSafe(sql)).bind(hash.as_slice()),
            rows::session,
        )
        .await
    }

    async fn revoke_session(
        &self,
        hash: &[u8; 32],
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        self.conditional(
            sqlx::query(
                "UPDATE sessions SET revoked_at = $2 \
                 WHERE hash = $1 AND revoked_at IS NULL AND expires_at > $2",
            )
            .bind(hash.as_slice())
            .bind(ms(now)),
            audit,
        )
        .await
    }

    async fn insert_totp_factor(&self, f: &TotpFactor, audit: &[AuditEvent]) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO totp_factors (id, tenant_id, user_id, secret_sealed, algorithm, digits, \
             period, confirmed_at, last_step, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(f.id.as_str())
        .bind(f.tenant_id.as_str())
        .bind(f.user_id.as_str())
        .bind(&f.secret_sealed)
        .bind(f.params.algorithm.as_str())
        .bind(i64::from(f.params.digits))
        .bind(i64::from(f.params.period))
        .bind(f.confirmed_at.map(ms))
        .bind(f.last_step)
        .bind(ms(f.created_at))
        .execute(&mut *tx)
        .await
        .map_err(|e| map_error(e, "factor"))?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn list_totp_factors(
        &self,
        tenant: &TenantId,
        user: &UserId,
    ) -> StoreResult<Vec<TotpFactor>> {
        let sql = format!(
            "SELECT {} FROM totp_factors WHERE tenant_id = $1 AND user_id = $2 \
             ORDER BY created_at DESC, id DESC",
            rows::FACTOR_COLUMNS
        );
        self.fetch_all(
            sqlx::query(AssertSqlSafe(sql))
                .bind(tenant.as_str())
                .bind(user.as_str()),
            rows::factor,
        )
        .await
    }

    async fn accept_totp_step(
        &self,
        factor: &FactorId,
        step: i64,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        self.conditional(
            sqlx::query(
                "UPDATE totp_factors SET last_step = $2, confirmed_at = COALESCE(confirmed_at, $3) \
                 WHERE id = $1 AND (last_step IS NULL OR last_step < $2)",
            )
            .bind(factor.as_str())
            .bind(step)
            .bind(ms(now)),
            audit,
        )
        .await
    }

    async fn delete_totp_factors(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        for sql in [
            "DELETE FROM totp_factors WHERE tenant_id = $1 AND user_id = $2",
            "DELETE FROM recovery_codes WHERE tenant_id = $1 AND user_id = $2",
        ] {
            sqlx::query(sql)
                .bind(tenant.as_str())
                .bind(user.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn replace_recovery_codes(
        &self,
        tenant: &TenantId,
        user: &UserId,
        hashes: &[[u8; 32]],
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM recovery_codes WHERE tenant_id = $1 AND user_id = $2")
            .bind(tenant.as_str())
            .bind(user.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        for hash in hashes {
            sqlx::query(
                "INSERT INTO recovery_codes (tenant_id, user_id, code_hash, created_at) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(tenant.as_str())
            .bind(user.as_str())
            .bind(hash.as_slice())
            .bind(ms(now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn has_unused_recovery_code(
        &self,
        tenant: &TenantId,
        user: &UserId,
        hash: &[u8; 32],
    ) -> StoreResult<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM recovery_codes WHERE tenant_id = $1 AND user_id = $2 \
             AND code_hash = $3 AND used_at IS NULL)",
        )
        .bind(tenant.as_str())
        .bind(user.as_str())
        .bind(hash.as_slice())
        .fetch_one(self.pool())
        .await
        .map_err(db)
    }

    async fn count_unused_recovery_codes(
        &self,
        tenant: &TenantId,
        user: &UserId,
    ) -> StoreResult<u32> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM recovery_codes WHERE tenant_id = $1 AND user_id = $2 AND used_at IS NULL",
        )
        .bind(tenant.as_str())
        .bind(user.as_str())
        .fetch_one(self.pool())
        .await
        .map_err(db)?;
        Ok(u32::try_from(n).unwrap_or(0))
    }

    async fn find_user_by_phone_and_type(
        &self,
        tenant: &TenantId,
        phone: &str,
        user_type: u16,
    ) -> StoreResult<Option<User>> {
        let sql = format!(
            "SELECT {} FROM users WHERE tenant_id = $1 AND phone = $2 AND user_type = $3",
            rows::USER_COLUMNS
        );
        self.fetch_optional(
            sqlx::query(AssertSqlSafe(sql))
                .bind(tenant.as_str())
                .bind(phone)
                .bind(i64::from(user_type)),
            rows::user,
        )
        .await
    }

    async fn latest_challenge(
        &self,
        tenant: &TenantId,
        purpose: &str,
        destination: &str,
    ) -> StoreResult<Option<Challenge>> {
        let sql = format!(
            "SELECT {} FROM challenges WHERE tenant_id = $1 AND destination = $2 AND purpose = $3 \
             ORDER BY created_at DESC, id DESC LIMIT 1",
            rows::CHALLENGE_COLUMNS
        );
        self.fetch_optional(
            sqlx::query(AssertSqlSafe(sql))
                .bind(tenant.as_str())
                .bind(destination)
                .bind(purpose),
            rows::challenge,
        )
        .await
    }

    async fn complete_phone_verification(
        &self,
        done: &PhoneCompletion,
    ) -> StoreResult<Option<User>> {
        let mut tx = self.begin().await?;
        match phone_verification_at_once(&mut tx, done).await? {
            AtOnce::Completed(user) => {
                tx.commit().await.map_err(db)?;
                return Ok(Some(*user));
            }
            AtOnce::NotConsumed => return Ok(None),
            // The user was inserted by someone else after this statement's snapshot was taken
            // (or another constraint held the insert back): undone, and done step by step.
            AtOnce::UserNotSeen => {
                tx.rollback().await.map_err(db)?;
                tx = self.begin().await?;
            }
        }
        if !consume(
            &mut tx,
            &done.challenge_id,
            done.expected_attempts,
            done.now,
        )
        .await?
        {
            return Ok(None);
        }
        let candidate = &done.candidate;
        insert_user(&mut tx, candidate, true).await?;
        let select = format!(
            "SELECT {} FROM users WHERE tenant_id = $1 AND phone = $2 AND user_type = $3",
            rows::USER_COLUMNS
        );
        let tenant = candidate.tenant_id.as_str();
        let phone = candidate.phone.as_ref().map(|p| p.as_str());
        let user_type = candidate.user_type.map(i64::from);
        let row = sqlx::query(AssertSqlSafe(select.clone()))
            .bind(tenant)
            .bind(phone)
            .bind(user_type)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let user = rows::user(&row).map_err(db)?;
        let now = ms(done.now);
        match done.verified {
            Contact::Phone => sqlx::query(
                "UPDATE users SET mobile_verified_at = COALESCE(mobile_verified_at, $2) WHERE id = $1",
            )
            .bind(user.id.as_str())
            .bind(now),
            Contact::Email => sqlx::query(
                "UPDATE users SET email_verified_at = COALESCE(email_verified_at, $2), \
                 email = COALESCE(email, $3) WHERE id = $1",
            )
            .bind(user.id.as_str())
            .bind(now)
            .bind(candidate.email.as_ref().map(|e| e.as_str())),
        }
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let d = &done.device;
        sqlx::query(
            "INSERT INTO devices (tenant_id, user_id, device_unique_id, device_id, device_type, \
             first_seen_at, last_seen_at) VALUES ($1, $2, $3, $4, $5, $6, $6) \
             ON CONFLICT (user_id, device_unique_id) DO UPDATE SET device_id = excluded.device_id, \
             device_type = excluded.device_type, last_seen_at = excluded.last_seen_at",
        )
        .bind(tenant)
        .bind(user.id.as_str())
        .bind(&d.device_unique_id)
        .bind(&d.device_id)
        .bind(&d.device_type)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let audit: Vec<AuditEvent> = done
            .audit
            .iter()
            .cloned()
            .map(|mut e| {
                e.user_id = Some(user.id.clone());
                e
            })
            .collect();
        insert_audit(&mut tx, &audit).await?;
        let row = sqlx::query(AssertSqlSafe(select))
            .bind(tenant)
            .bind(phone)
            .bind(user_type)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let user = rows::user(&row).map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(Some(user))
    }

    async fn ensure_jwt_key(&self, k: &JwtKey) -> StoreResult<JwtKey> {
        sqlx::query(
            "INSERT INTO tenant_keys (id, tenant_id, secret_sealed, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(k.id.as_str())
        .bind(k.tenant_id.as_str())
        .bind(&k.secret_sealed)
        .bind(ms(k.created_at))
        .execute(self.pool())
        .await
        .map_err(db)?;
        let sql = format!(
            "SELECT {} FROM tenant_keys WHERE tenant_id = $1 AND verify_until IS NULL",
            rows::JWT_KEY_COLUMNS
        );
        self.fetch_optional(
            sqlx::query(AssertSqlSafe(sql)).bind(k.tenant_id.as_str()),
            rows::jwt_key,
        )
        .await?
        .ok_or_else(|| StoreError::Other("no active key".into()))
    }

    async fn rotate_jwt_key(
        &self,
        k: &JwtKey,
        retire_until: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE tenant_keys SET verify_until = $2 WHERE tenant_id = $1 AND verify_until IS NULL")
            .bind(k.tenant_id.as_str())
            .bind(ms(retire_until))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("INSERT INTO tenant_keys (id, tenant_id, secret_sealed, created_at) VALUES ($1, $2, $3, $4)")
            .bind(k.id.as_str())
            .bind(k.tenant_id.as_str())
            .bind(&k.secret_sealed)
            .bind(ms(k.created_at))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn verifying_jwt_keys(
        &self,
        tenant: &TenantId,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<JwtKey>> {
        let sql = format!(
            "SELECT {} FROM tenant_keys WHERE tenant_id = $1 AND (verify_until IS NULL OR verify_until > $2) \
             ORDER BY created_at DESC",
            rows::JWT_KEY_COLUMNS
        );
        self.fetch_all(
            sqlx::query(AssertSqlSafe(sql))
                .bind(tenant.as_str())
                .bind(ms(now)),
            rows::jwt_key,
        )
        .await
    }

    async fn revoke_jti(
        &self,
        tenant: &TenantId,
        jti: &str,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        self.conditional(
            sqlx::query(
                "INSERT INTO revoked_tokens (jti, tenant_id, revoked_at, expires_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(jti)
            .bind(tenant.as_str())
            .bind(ms(now))
            .bind(ms(expires_at)),
            audit,
        )
        .await
    }

    async fn is_jti_revoked(&self, jti: &str) -> StoreResult<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = $1)")
            .bind(jti)
            .fetch_one(self.pool())
            .await
            .map_err(db)
    }

    async fn revoke_api_key(
        &self,
        tenant: &TenantId,
        id: &ApiKeyId,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        self.conditional(
            sqlx::query(
                "UPDATE api_keys SET revoked_at = $3 WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL",
            )
            .bind(tenant.as_str())
            .bind(id.as_str())
            .bind(ms(now)),
            audit,
        )
        .await
    }

    async fn claim_outbox(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<OutboxMessage>> {
        // SKIP LOCKED: workers of several instances each take different rows, none waits.
        let sql = format!(
            "UPDATE outbox SET next_attempt_at = $2, attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM outbox WHERE status = 'queued' AND next_attempt_at <= $1 \
                          ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING {}",
            rows::MESSAGE_COLUMNS
        );
        self.fetch_all(
            sqlx::query(AssertSqlSafe(sql))
                .bind(ms(now))
                .bind(ms(lease_until))
                .bind(i64::from(limit)),
            rows::message,
        )
        .await
    }

    async fn mark_message_sent(
        &self,
        id: &MessageId,
        provider_message_id: Option<&str>,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        // The delivery worker marks every message it sends, beside the requests that queue
        // them: the marks that arrive together share a statement.
        self.sent_marks
            .ask(
                |reply| crate::send_writes::SentMark {
                    store: self.clone(),
                    id: id.clone(),
                    provider_message_id: provider_message_id.map(str::to_owned),
                    audit: audit.to_vec(),
                    reply,
                },
                "sent mark",
            )
            .await
    }

    async fn mark_message_retry(
        &self,
        id: &MessageId,
        next_attempt_at: OffsetDateTime,
        error: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE outbox SET next_attempt_at = $2, last_error = $3 WHERE id = $1 AND status = 'queued'",
        )
        .bind(id.as_str())
        .bind(ms(next_attempt_at))
        .bind(error)
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn mark_message_failed(
        &self,
        id: &MessageId,
        error: &str,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE outbox SET status = 'failed', body = NULL, code = NULL, last_error = $2 WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(error)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn latest_message_for(
        &self,
        challenge: &ChallengeId,
    ) -> StoreResult<Option<OutboxMessage>> {
        let sql = format!(
            "SELECT {} FROM outbox WHERE challenge_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1",
            rows::MESSAGE_COLUMNS
        );
        self.fetch_optional(
            sqlx::query(AssertSqlSafe(sql)).bind(challenge.as_str()),
            rows::message,
        )
        .await
    }

    async fn sweep(
        &self,
        now: OffsetDateTime,
        retention: std::time::Duration,
        batch: u32,
    ) -> StoreResult<u64> {
        let (now, old, batch) = (ms(now), ms(now - retention), i64::from(batch));
        let statements = SWEEP_STATEMENTS.map(|(_, sql, cutoff)| {
            let cutoff = match cutoff {
                SweepCutoff::Now => now,
                SweepCutoff::RetentionAgo => old,
            };
            (sql, cutoff)
        });
        let mut gone = 0;
        for (sql, cutoff) in statements {
            gone += sqlx::query(sql)
                .bind(cutoff)
                .bind(batch)
                .execute(self.pool())
                .await
                .map_err(db)?
                .rows_affected();
        }
        Ok(gone)
    }

    async fn insert_challenges(&self, challenges: &[Challenge]) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        for challenge in challenges {
            insert_challenge(&mut tx, challenge).await?;
        }
        tx.commit().await.map_err(db)
    }

    async fn query_plans(&self) -> StoreResult<Vec<QueryPlan>> {
        // The generic plan (the one a prepared statement settles on, parameters unknown), with
        // sequential scans priced out: on a small table the planner would rightly pick one, and
        // what this shows is whether an index can serve the statement at all, not whether the
        // planner will choose it (a walk of a whole primary key also counts as an index here):
        // for the sweeps that is measured by a test of its own, in pages read on tables without
        // statistics (`schema::tests`). Nothing runs: EXPLAIN without ANALYZE only plans, and
        // the transaction is rolled back.
        let mut tx = self.begin().await?;
        sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let statements = HOT_STATEMENTS
            .into_iter()
            .chain([
                // Read in batches (the `lookup` module): every key asked at once.
                ("login ticket by hash", TICKETS_BY_HASH.as_str()),
                (
                    "login ticket with its user and challenge",
                    LOGIN_CONTEXTS_BY_HASH.as_str(),
                ),
                ("user by id", USERS_BY_ID.as_str()),
                (
                    "a tenant's audit events, newest first",
                    AUDIT_NEWEST_FIRST.as_str(),
                ),
                ("challenge by id", CHALLENGES_BY_ID.as_str()),
                ("complete a code login", CODE_LOGIN.as_str()),
                ("consume a code with its audit", CONSUME_WITH_AUDIT.as_str()),
                (
                    "count a wrong code with its audit",
                    FAILED_CHECK_WITH_AUDIT.as_str(),
                ),
                (
                    "settle a batch of checks",
                    crate::settle::CARRY_OUT.as_str(),
                ),
                (
                    "complete a batch of code logins",
                    crate::login::CODE_LOGINS.as_str(),
                ),
                ("mark a message sent", MARK_SENT_WITH_AUDIT.as_str()),
                (
                    "mark a batch of messages sent",
                    crate::send_writes::SENT_MARKS.as_str(),
                ),
                ("count a failed login", COUNT_LOGIN_FAILURE.as_str()),
                (
                    "count a batch of failed logins",
                    crate::failures::LOGIN_FAILURES.as_str(),
                ),
                ("lock an account after failed logins", LOCK_ACCOUNT),
                ("unlock an account", UNLOCK_ACCOUNT),
                // Read in batches too: a send's pending challenge and its number's two limits
                // (the statements above serve only a store asked otherwise).
                ("sends to a batch of destinations", SENDS_TO_DESTINATIONS),
                (
                    "pending challenges of a batch of destinations",
                    PENDING_BY_DESTINATION.as_str(),
                ),
            ])
            .chain(SWEEP_STATEMENTS.map(|(purpose, sql, _)| (purpose, sql)));
        let mut plans = Vec::new();
        for (purpose, sql) in statements {
            // A name of its own each time: a statement left prepared by a failed call (PREPARE
            // outlives the rolled-back transaction) never collides with the next one.
            let name = format!(
                "otpgate_plan_{}",
                PLAN_NAMES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            sqlx::raw_sql(AssertSqlSafe(format!("PREPARE {name} AS {sql}")))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            let nulls = vec!["NULL"; parameter_count(sql)].join(", ");
            let explain = if nulls.is_empty() {
                format!("EXPLAIN EXECUTE {name}")
            } else {
                format!("EXPLAIN EXECUTE {name}({nulls})")
            };
            let steps: Vec<String> = sqlx::query_scalar(AssertSqlSafe(explain))
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
            sqlx::raw_sql(AssertSqlSafe(format!("DEALLOCATE {name}")))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            plans.push(QueryPlan {
                purpose,
                full_scan: steps.iter().any(|step| step.contains("Seq Scan")),
                plan: steps.join("\n"),
            });
        }
        tx.rollback().await.map_err(db)?;
        Ok(plans)
    }

    async fn ensure_server_secret(&self, name: &str, candidate: &[u8]) -> StoreResult<Vec<u8>> {
        sqlx::query(
            "INSERT INTO server_secrets (id, secret_sealed) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(name)
        .bind(candidate)
        .execute(self.pool())
        .await
        .map_err(db)?;
        sqlx::query_scalar("SELECT secret_sealed FROM server_secrets WHERE id = $1")
            .bind(name)
            .fetch_one(self.pool())
            .await
            .map_err(db)
    }

    async fn sealed_secrets(&self) -> StoreResult<Vec<SealedSecret>> {
        let mut all = Vec::new();
        for kind in [
            SealedKind::TotpFactor,
            SealedKind::JwtKey,
            SealedKind::ServerSecret,
        ] {
            let sql = format!(
                "SELECT id, secret_sealed FROM {} ORDER BY id",
                sealed_table(kind)
            );
            let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(AssertSqlSafe(sql))
                .fetch_all(self.pool())
                .await
                .map_err(db)?;
            all.extend(
                rows.into_iter()
                    .map(|(id, sealed)| SealedSecret { kind, id, sealed }),
            );
        }
        Ok(all)
    }

    async fn reseal_secrets(&self, changes: &[(SealedSecret, Vec<u8>)]) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        for (old, new) in changes {
            let sql = format!(
                "UPDATE {} SET secret_sealed = $1 WHERE id = $2 AND secret_sealed = $3",
                sealed_table(old.kind)
            );
            let done = sqlx::query(AssertSqlSafe(sql))
                .bind(new)
                .bind(&old.id)
                .bind(&old.sealed)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            if done.rows_affected() != 1 {
                // Dropping the transaction rolls it back.
                return Err(StoreError::Conflict(
                    "a sealed secret changed during the rotation",
                ));
            }
        }
        tx.commit().await.map_err(db)
    }

    async fn insert_audit(&self, events: &[AuditEvent]) -> StoreResult<()> {
        // One statement is all or nothing by itself: no BEGIN and COMMIT around it.
        if events.is_empty() {
            return Ok(());
        }
        bind_audit(sqlx::query(INSERT_AUDIT), events)
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn list_audit(
        &self,
        tenant: &TenantId,
        user: Option<&UserId>,
        limit: u32,
    ) -> StoreResult<Vec<AuditEvent>> {
        self.fetch_all(
            sqlx::query(AssertSqlSafe(AUDIT_NEWEST_FIRST.as_str()))
                .bind(tenant.as_str())
                .bind(user.map(|u| u.as_str()))
                .bind(i64::from(limit)),
            rows::audit,
        )
        .await
    }
}
