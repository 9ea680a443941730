//! The [`Store`] implementation: one method per use case, each write one job of the group commit.

use async_trait::async_trait;
use otpgate_core::StoreError;
use otpgate_core::model::{
    ApiKey, ApiKeyId, AuditEvent, Challenge, ChallengeId, FactorId, JwtKey, LoginTicket, MessageId,
    OutboxMessage, Session, Tenant, TenantId, TotpFactor, User, UserId,
};
use otpgate_core::policy::PolicyOverrides;
use otpgate_core::store::{
    ChallengeJudge, CodeReplacement, Contact, LoginCompletion, LoginContext, LoginJudge,
    LoginVerdict, PhoneCompletion, QueryPlan, RangeOutcomes, SealedKind, SealedSecret, SendScope,
    Settled, SettledLogin, Store, StoreResult, Verdict,
};
use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use crate::rows::{self, ms};
use crate::{
    ConditionFailed, JobError, SqliteStore, Statements, Tx, exec, map_error, query_row_cached,
};

const INSERT_AUDIT: &str = "INSERT INTO audit_events \
     (tenant_id, user_id, kind, detail, ip, latitude, longitude, mode, at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

fn insert_audit(conn: &impl Statements, events: &[AuditEvent]) -> Result<(), JobError> {
    fn bind(stmt: &mut rusqlite::Statement<'_>, e: &AuditEvent) -> rusqlite::Result<()> {
        stmt.raw_bind_parameter(1, e.tenant_id.as_str())?;
        stmt.raw_bind_parameter(2, e.user_id.as_ref().map(|u| u.as_str()))?;
        stmt.raw_bind_parameter(3, e.kind.as_str())?;
        stmt.raw_bind_parameter(4, &e.detail)?;
        stmt.raw_bind_parameter(5, &e.context.ip)?;
        stmt.raw_bind_parameter(6, e.context.latitude)?;
        stmt.raw_bind_parameter(7, e.context.longitude)?;
        stmt.raw_bind_parameter(8, &e.context.mode)?;
        stmt.raw_bind_parameter(9, ms(e.at))
    }
    // One statement per event, not one for all: a statement of several rows may fail after
    // its first (a constraint), so SQLite copies each page it touches to a statement journal
    // before changing it, to undo that statement alone; a login's two events in one statement
    // spent more on those copies than the second statement costs (its `sqlite_sequence`
    // update included). The statement is asked for once for all of them.
    conn.with_statement(INSERT_AUDIT, |stmt| {
        for e in events {
            // Every parameter is bound again, and each run resets the statement.
            bind(stmt, e)?;
            stmt.raw_execute()?;
        }
        Ok(())
    })?;
    Ok(())
}

fn insert_challenge(conn: &Connection, c: &Challenge) -> Result<(), JobError> {
    conn.prepare_cached(
        "INSERT INTO challenges (id, tenant_id, user_id, purpose, channel, destination, code_hash, \
         locale, created_at, expires_at, last_sent_at, send_count, attempts, max_attempts, status) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?
    .execute(params![
        c.id.as_str(),
        c.tenant_id.as_str(),
        c.user_id.as_ref().map(|u| u.as_str()),
        c.purpose.as_str(),
        c.channel.as_str(),
        c.destination,
        c.code_hash,
        c.locale,
        ms(c.created_at),
        ms(c.expires_at),
        ms(c.last_sent_at),
        c.send_count,
        c.attempts,
        c.max_attempts,
        c.status.as_str(),
    ])
    .map_err(|e| JobError::Store(map_error(e, "challenge")))?;
    Ok(())
}

fn insert_message(conn: &Connection, m: &OutboxMessage) -> Result<(), JobError> {
    conn.prepare_cached(
        "INSERT INTO outbox (id, tenant_id, challenge_id, channel, destination, purpose, locale, body, \
         code, status, attempts, next_attempt_at, created_at, client_ip, user_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?
    .execute(params![
        m.id.as_str(),
        m.tenant_id.as_str(),
        m.challenge_id.as_ref().map(|c| c.as_str()),
        m.channel.as_str(),
        m.destination,
        m.purpose.as_str(),
        m.locale,
        m.body,
        m.code,
        m.status.as_str(),
        m.attempts,
        ms(m.next_attempt_at),
        ms(m.created_at),
        m.client_ip,
        m.user_id.as_ref().map(|u| u.as_str()),
    ])?;
    Ok(())
}

/// Inserts a user; with `or_ignore`, an existing user of the same phone and type (or name) wins.
fn insert_user(conn: &Connection, u: &User, or_ignore: bool) -> Result<(), JobError> {
    let verb = if or_ignore {
        "INSERT OR IGNORE"
    } else {
        "INSERT"
    };
    conn.prepare_cached(&format!(
        "{verb} INTO users (id, tenant_id, username, email, phone, role, password_hash, \
         mobile_verified_at, email_verified_at, failed_logins, locked_until, created_at, user_type) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
    ))?
    .execute(params![
        u.id.as_str(),
        u.tenant_id.as_str(),
        u.username.as_str(),
        u.email.as_ref().map(|e| e.as_str()),
        u.phone.as_ref().map(|p| p.as_str()),
        u.role.as_str(),
        u.password_hash,
        u.mobile_verified_at.map(ms),
        u.email_verified_at.map(ms),
        u.failed_logins,
        u.locked_until.map(ms),
        ms(u.created_at),
        u.user_type,
    ])
    .map_err(|e| JobError::Store(map_error(e, "username")))?;
    Ok(())
}

fn insert_session(conn: &impl Statements, s: &Session) -> Result<(), JobError> {
    conn.with_statement(
        "INSERT INTO sessions (hash, tenant_id, user_id, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
        |stmt| {
            stmt.execute(params![
                s.hash.as_slice(),
                s.tenant_id.as_str(),
                s.user_id.as_str(),
                ms(s.created_at),
                ms(s.expires_at),
            ])
        },
    )?;
    Ok(())
}

/// Fails the job (rolling its savepoint back) unless exactly one row changed.
fn require_one(changed: usize) -> Result<(), JobError> {
    if changed == 1 {
        Ok(())
    } else {
        Err(JobError::Condition)
    }
}

fn flag(outcome: Result<(), ConditionFailed>) -> bool {
    outcome.is_ok()
}

/// The table of each kind of sealed secret; every one keeps it in `id` and `secret_sealed`.
fn sealed_table(kind: SealedKind) -> &'static str {
    match kind {
        SealedKind::TotpFactor => "totp_factors",
        SealedKind::JwtKey => "tenant_keys",
        SealedKind::ServerSecret => "server_secrets",
    }
}

pub(crate) const CONSUME_CHALLENGE: &str = "UPDATE challenges SET status = 'approved', resolved_at = ?3 \
     WHERE id = ?1 AND attempts = ?2 AND status = 'pending' AND expires_at > ?3";
const SPEND_TICKET: &str = "UPDATE login_tickets SET used_at = ?2 \
     WHERE hash = ?1 AND used_at IS NULL AND expires_at > ?2";
/// The two above for rows that the same transaction has just read ([`read_login_context`]):
/// found by row id, they skip the search of their key's index.
const CONSUME_CHALLENGE_AT: &str = "UPDATE challenges SET status = 'approved', resolved_at = ?3 \
     WHERE rowid = ?1 AND attempts = ?2 AND status = 'pending' AND expires_at > ?3";
const SPEND_TICKET_AT: &str = "UPDATE login_tickets SET used_at = ?2 \
     WHERE rowid = ?1 AND used_at IS NULL AND expires_at > ?2";

/// A login ticket with its user and challenge, in one statement (a login reads them on every
/// step), and where the ticket and challenge rows are: [`rows::ticket_from`]'s columns, then
/// [`rows::user_from`]'s, [`rows::challenge_from`]'s and the two row ids.
static LOGIN_CONTEXT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let of = |table: &str, columns: &str| {
        columns
            .split(',')
            .map(|column| format!("{table}.{}", column.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "SELECT {}, {}, {}, t.rowid, c.rowid FROM login_tickets AS t \
         LEFT JOIN users AS u ON u.tenant_id = t.tenant_id AND u.id = t.user_id \
         LEFT JOIN challenges AS c ON c.tenant_id = t.tenant_id AND c.id = t.challenge_id \
         WHERE t.hash = ?1",
        of("t", rows::TICKET_COLUMNS),
        of("u", rows::USER_COLUMNS),
        of("c", rows::CHALLENGE_COLUMNS),
    )
});

/// A login ticket by hash (built once, as the two below; a login's step reads all three at
/// once, [`LOGIN_CONTEXT`]).
static TICKET_BY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {} FROM login_tickets WHERE hash = ?1",
        rows::TICKET_COLUMNS
    )
});

/// A user by tenant and id.
static USER_BY_ID: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {} FROM users WHERE tenant_id = ?1 AND id = ?2",
        rows::USER_COLUMNS
    )
});

/// A tenant's audit events (of one user, or of all when `?2` is NULL), newest first: a walk of
/// the `tenant_id` index (which holds the row id after it) backwards, which stops at the limit.
static AUDIT_NEWEST_FIRST: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {} FROM audit_events WHERE tenant_id = ?1 AND (?2 IS NULL OR user_id = ?2) \
             ORDER BY id DESC LIMIT ?3",
        rows::AUDIT_COLUMNS
    )
});

/// A challenge by tenant and id (built once: checks read it on every request).
static CHALLENGE_BY_ID: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {} FROM challenges WHERE tenant_id = ?1 AND id = ?2",
        rows::CHALLENGE_COLUMNS
    )
});

/// The send limits' counts: each stops at the limit (`?4`), so a busy scope costs no more
/// than its limit.
pub(crate) const SENDS_TO_DESTINATION: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM outbox \
     WHERE tenant_id = ?1 AND destination = ?2 AND created_at > ?3 LIMIT ?4) AS sends";
/// A range on the destination index: every number that starts with the prefix.
const SENDS_TO_COUNTRY: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM outbox \
     WHERE tenant_id = ?1 AND destination >= ?2 AND destination < ?2 || ':' \
     AND created_at > ?3 LIMIT ?4) AS sends";
const SENDS_FROM_IP: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM outbox \
     WHERE tenant_id = ?1 AND client_ip = ?2 AND created_at > ?3 LIMIT ?4) AS sends";
const SENDS_OF_USER: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM outbox \
     WHERE tenant_id = ?1 AND user_id = ?2 AND created_at > ?3 LIMIT ?4) AS sends";

/// The statements of the hot paths whose plans [`Store::query_plans`] shows: the writes as
/// they run, the reads with the `WHERE` they run with (their column lists change no plan).
const HOT_STATEMENTS: [(&str, &str); 13] = [
    (
        "login ticket by hash",
        "SELECT * FROM login_tickets WHERE hash = ?1",
    ),
    (
        "user by id",
        "SELECT * FROM users WHERE tenant_id = ?1 AND id = ?2",
    ),
    (
        "challenge by id",
        "SELECT * FROM challenges WHERE tenant_id = ?1 AND id = ?2",
    ),
    (
        "pending challenge of a destination",
        "SELECT * FROM challenges WHERE tenant_id = ?1 AND destination = ?2 AND purpose = ?3 \
         AND status = 'pending' AND expires_at > ?4 ORDER BY created_at DESC LIMIT 1",
    ),
    ("session by hash", "SELECT * FROM sessions WHERE hash = ?1"),
    ("consume a challenge", CONSUME_CHALLENGE),
    ("spend a login ticket", SPEND_TICKET),
    ("consume a challenge just read", CONSUME_CHALLENGE_AT),
    ("spend a login ticket just read", SPEND_TICKET_AT),
    ("sends to a destination", SENDS_TO_DESTINATION),
    ("sends to a country", SENDS_TO_COUNTRY),
    ("sends from an address", SENDS_FROM_IP),
    ("sends of an account", SENDS_OF_USER),
];

/// Which moment a sweep statement's `?1` is.
#[derive(Clone, Copy)]
enum SweepCutoff {
    /// Rows that expired by now: tickets, sessions and revocations are dead at expiry.
    Now,
    /// Rows settled longer ago than the retention: challenges and messages are kept that long
    /// for delivery status and send budgets.
    RetentionAgo,
}

/// The sweeper's deletes, `?2` rows at most each, the oldest first (as on PostgreSQL, where the
/// `ORDER BY` is also what holds the planner to the index). Every one finds its rows through an
/// index (`query_plans` shows it, the contract suite checks it): a sweep costs what it deletes,
/// never the table's size.
/// Spent tickets and revoked sessions wait for their expiry (minutes, hours): a spent or
/// revoked row is refused all the same, and an `OR used_at IS NOT NULL` would scan the table.
const SWEEP_STATEMENTS: [(&str, &str, SweepCutoff); 5] = [
    (
        "sweep revocations",
        "DELETE FROM revoked_tokens WHERE rowid IN (SELECT rowid FROM revoked_tokens \
         WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        SweepCutoff::Now,
    ),
    (
        "sweep login tickets",
        "DELETE FROM login_tickets WHERE rowid IN (SELECT rowid FROM login_tickets \
         WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        SweepCutoff::Now,
    ),
    (
        "sweep sessions",
        "DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions \
         WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        SweepCutoff::Now,
    ),
    (
        "sweep settled messages",
        "DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox \
         WHERE status <> 'queued' AND created_at < ?1 ORDER BY created_at LIMIT ?2)",
        SweepCutoff::RetentionAgo,
    ),
    (
        "sweep challenges",
        "DELETE FROM challenges WHERE rowid IN (SELECT rowid FROM challenges c \
         WHERE c.expires_at < ?1 \
         AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.challenge_id = c.id) \
         AND NOT EXISTS (SELECT 1 FROM login_tickets t WHERE t.challenge_id = c.id) \
         ORDER BY c.expires_at LIMIT ?2)",
        SweepCutoff::RetentionAgo,
    ),
];

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        self.read(|c| query_row_cached(c, "SELECT 1", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|_| ())
    }

    async fn insert_tenant(&self, tenant: &Tenant) -> StoreResult<()> {
        let t = tenant.clone();
        self.write(move |c| {
            exec(
                c,
                "INSERT INTO tenants (id, name, is_default, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![
                    t.id.as_str(),
                    t.name,
                    i64::from(t.is_default),
                    ms(t.created_at)
                ],
            )
            .map_err(|e| JobError::Store(map_error(e, "tenant")))?;
            Ok(())
        })
        .await?
        .map_err(|_| StoreError::Other("tenant insert refused".into()))
    }

    async fn ensure_default_tenant(&self, candidate: &Tenant) -> StoreResult<Tenant> {
        let t = candidate.clone();
        let sql = format!(
            "SELECT {} FROM tenants WHERE is_default = 1",
            rows::TENANT_COLUMNS
        );
        self.write(move |c| {
            exec(c,
                "INSERT INTO tenants (id, name, is_default, created_at) \
                 SELECT ?1, ?2, 1, ?3 WHERE NOT EXISTS (SELECT 1 FROM tenants WHERE is_default = 1)",
                params![t.id.as_str(), t.name, ms(t.created_at)],
            )
            .map_err(|e| JobError::Store(map_error(e, "tenant")))?;
            Ok(query_row_cached(c, &sql, [], rows::tenant)?)
        })
        .await?
        .map_err(|_| StoreError::Other("default tenant".into()))
    }

    async fn set_tenant_settings(
        &self,
        id: &TenantId,
        settings: &PolicyOverrides,
    ) -> StoreResult<bool> {
        let id = id.clone();
        let json = serde_json::to_string(settings).map_err(|e| StoreError::Other(e.to_string()))?;
        self.write(move |c| {
            require_one(exec(
                c,
                "UPDATE tenants SET settings = ?2 WHERE id = ?1",
                params![id.as_str(), json],
            )?)
        })
        .await
        .map(flag)
    }

    async fn get_tenant(&self, id: &TenantId) -> StoreResult<Option<Tenant>> {
        let id = id.clone();
        let sql = format!("SELECT {} FROM tenants WHERE id = ?1", rows::TENANT_COLUMNS);
        self.read(move |c| query_row_cached(c, &sql, [id.as_str()], rows::tenant).optional())
            .await
    }

    async fn insert_user(&self, user: &User, audit: &[AuditEvent]) -> StoreResult<()> {
        let u = user.clone();
        let audit = audit.to_vec();
        self.write(move |c| {
            insert_user(c, &u, false)?;
            insert_audit(c, &audit)
        })
        .await?
        .map_err(|_| StoreError::Other("user insert refused".into()))
    }

    async fn find_user_by_username(
        &self,
        tenant: &TenantId,
        username: &str,
    ) -> StoreResult<Option<User>> {
        let (tenant, username) = (tenant.clone(), username.to_owned());
        let sql = format!(
            "SELECT {} FROM users WHERE tenant_id = ?1 AND username = ?2",
            rows::USER_COLUMNS
        );
        self.read(move |c| {
            c.prepare_cached(&sql)?
                .query_row(params![tenant.as_str(), username], rows::user)
                .optional()
        })
        .await
    }

    async fn find_user_by_phone(
        &self,
        tenant: &TenantId,
        phone: &str,
    ) -> StoreResult<Option<User>> {
        let (tenant, phone) = (tenant.clone(), phone.to_owned());
        let sql = format!(
            "SELECT {} FROM users WHERE tenant_id = ?1 AND phone = ?2 ORDER BY created_at LIMIT 1",
            rows::USER_COLUMNS
        );
        self.read(move |c| {
            c.prepare_cached(&sql)?
                .query_row(params![tenant.as_str(), phone], rows::user)
                .optional()
        })
        .await
    }

    async fn get_user(&self, tenant: &TenantId, id: &UserId) -> StoreResult<Option<User>> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.read(move |c| {
            c.prepare_cached(&USER_BY_ID)?
                .query_row(params![tenant.as_str(), id.as_str()], rows::user)
                .optional()
        })
        .await
    }

    async fn record_login_failure(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &[AuditEvent],
    ) -> StoreResult<u32> {
        let (tenant, user, audit) = (tenant.clone(), user.clone(), audit.to_vec());
        self.write(move |c| {
            let failures: i64 = query_row_cached(
                c,
                "UPDATE users SET failed_logins = failed_logins + 1 \
                 WHERE tenant_id = ?1 AND id = ?2 RETURNING failed_logins",
                params![tenant.as_str(), user.as_str()],
                |r| r.get(0),
            )?;
            insert_audit(c, &audit)?;
            Ok(u32::try_from(failures).unwrap_or(u32::MAX))
        })
        .await?
        .map_err(|_| StoreError::Other("login failure refused".into()))
    }

    async fn unlock_user(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        let (tenant, user, audit) = (tenant.clone(), user.clone(), audit.to_vec());
        self.write(move |c| {
            require_one(exec(c,
                "UPDATE users SET failed_logins = 0, locked_until = NULL WHERE tenant_id = ?1 AND id = ?2",
                params![tenant.as_str(), user.as_str()],
            )?)?;
            insert_audit(c, &audit)
        })
        .await
        .map(flag)
    }

    async fn lock_user(
        &self,
        tenant: &TenantId,
        user: &UserId,
        until: OffsetDateTime,
    ) -> StoreResult<()> {
        let (tenant, user) = (tenant.clone(), user.clone());
        self.write(move |c| {
            exec(
                c,
                "UPDATE users SET locked_until = MAX(COALESCE(locked_until, 0), ?3) \
                 WHERE tenant_id = ?1 AND id = ?2",
                params![tenant.as_str(), user.as_str(), ms(until)],
            )?;
            Ok(())
        })
        .await?
        .map_err(|_| StoreError::Other("lock refused".into()))
    }

    async fn insert_api_key(&self, key: &ApiKey, audit: &[AuditEvent]) -> StoreResult<()> {
        let (k, audit) = (key.clone(), audit.to_vec());
        self.write(move |c| {
            exec(
                c,
                "INSERT INTO api_keys (id, tenant_id, name, key_hash, created_at, revoked_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    k.id.as_str(),
                    k.tenant_id.as_str(),
                    k.name,
                    k.hash.as_slice(),
                    ms(k.created_at),
                    k.revoked_at.map(ms)
                ],
            )
            .map_err(|e| JobError::Store(map_error(e, "api key")))?;
            insert_audit(c, &audit)
        })
        .await?
        .map_err(|_| StoreError::Other("api key insert refused".into()))
    }

    async fn find_api_key(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiKey>> {
        let hash = *hash;
        let sql = format!(
            "SELECT {} FROM api_keys WHERE key_hash = ?1",
            rows::API_KEY_COLUMNS
        );
        self.read(move |c| {
            c.prepare_cached(&sql)?
                .query_row([hash.as_slice()], rows::api_key)
                .optional()
        })
        .await
    }

    async fn insert_challenge(
        &self,
        challenge: &Challenge,
        message: Option<&OutboxMessage>,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let (ch, msg, audit) = (challenge.clone(), message.cloned(), audit.to_vec());
        self.write(move |c| {
            insert_challenge(c, &ch)?;
            if let Some(m) = &msg {
                insert_message(c, m)?;
            }
            insert_audit(c, &audit)
        })
        .await?
        .map_err(|_| StoreError::Other("challenge insert refused".into()))
    }

    async fn get_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
    ) -> StoreResult<Option<Challenge>> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.read(move |c| {
            c.prepare_cached(&CHALLENGE_BY_ID)?
                .query_row(params![tenant.as_str(), id.as_str()], rows::challenge)
                .optional()
        })
        .await
    }

    async fn find_pending_challenge(
        &self,
        tenant: &TenantId,
        purpose: &str,
        destination: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Challenge>> {
        let (tenant, purpose, destination) =
            (tenant.clone(), purpose.to_owned(), destination.to_owned());
        let sql = format!(
            "SELECT {} FROM challenges WHERE tenant_id = ?1 AND destination = ?2 AND purpose = ?3 \
             AND status = 'pending' AND expires_at > ?4 ORDER BY created_at DESC LIMIT 1",
            rows::CHALLENGE_COLUMNS
        );
        self.read(move |c| {
            c.prepare_cached(&sql)?
                .query_row(
                    params![tenant.as_str(), destination, purpose, ms(now)],
                    rows::challenge,
                )
                .optional()
        })
        .await
    }

    async fn resend_challenge(
        &self,
        replacement: &CodeReplacement,
        message: &OutboxMessage,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        let (r, msg, audit) = (replacement.clone(), message.clone(), audit.to_vec());
        self.write(move |c| {
            require_one(exec(
                c,
                "UPDATE challenges SET code_hash = ?3, last_sent_at = ?4, expires_at = ?5, \
                 send_count = send_count + 1 \
                 WHERE id = ?1 AND send_count = ?2 AND status = 'pending' AND expires_at > ?4",
                params![
                    r.id.as_str(),
                    r.expected_sends,
                    r.code_hash,
                    ms(r.sent_at),
                    ms(r.expires_at)
                ],
            )?)?;
            insert_message(c, &msg)?;
            insert_audit(c, &audit)
        })
        .await
        .map(flag)
    }

    async fn record_failed_check(
        &self,
        id: &ChallengeId,
        expected_attempts: u32,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        let (id, audit) = (id.clone(), audit.to_vec());
        self.write(move |c| {
            require_one(count_failure(c, &id, expected_attempts, now)?)?;
            insert_audit(c, &audit)
        })
        .await
        .map(flag)
    }

    async fn consume_challenge(
        &self,
        id: &ChallengeId,
        expected_attempts: u32,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        let (id, audit) = (id.clone(), audit.to_vec());
        self.write(move |c| {
            require_one(consume(c, &id, expected_attempts, now)?)?;
            insert_audit(c, &audit)
        })
        .await
        .map(flag)
    }

    /// One job of the writer: the read, the judge and the change share its transaction, and
    /// the read costs next to nothing there, as the change needs the same pages anyway (a
    /// reader would load them again: a read-only connection starts every read with an empty
    /// cache while the writer commits).
    async fn settle_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        judge: ChallengeJudge,
    ) -> StoreResult<Option<Settled>> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.write(move |c| {
            let Some(challenge) = c
                .prepare_cached(&CHALLENGE_BY_ID)?
                .query_row(params![tenant.as_str(), id.as_str()], rows::challenge)
                .optional()?
            else {
                return Ok(None);
            };
            let verdict = judge(&challenge);
            match &verdict {
                Verdict::Consume { now, audit } => {
                    require_one(consume(c, &id, challenge.attempts, *now)?)?;
                    insert_audit(c, audit)?;
                }
                Verdict::CountFailure { now, audit } => {
                    require_one(count_failure(c, &id, challenge.attempts, *now)?)?;
                    insert_audit(c, audit)?;
                }
                Verdict::Leave(_) => {}
            }
            Ok(Some(Settled { challenge, verdict }))
        })
        .await?
        // The challenge cannot change between the read and the write of one transaction.
        .map_err(|_| StoreError::Other("challenge changed inside its own transaction".into()))
    }

    async fn cancel_challenge(
        &self,
        id: &ChallengeId,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        let (id, audit) = (id.clone(), audit.to_vec());
        self.write(move |c| {
            require_one(exec(
                c,
                "UPDATE challenges SET status = 'canceled', resolved_at = ?2 \
                 WHERE id = ?1 AND status = 'pending' AND expires_at > ?2",
                params![id.as_str(), ms(now)],
            )?)?;
            insert_audit(c, &audit)
        })
        .await
        .map(flag)
    }

    async fn count_sends(
        &self,
        tenant: &TenantId,
        scope: &SendScope,
        since: OffsetDateTime,
        at_most: u32,
    ) -> StoreResult<u32> {
        let counts = self
            .count_sends_in_windows(tenant, scope, &[(since, at_most)])
            .await?;
        counts
            .first()
            .copied()
            .ok_or_else(|| StoreError::Other("a send count went missing".into()))
    }

    async fn count_sends_in_windows(
        &self,
        tenant: &TenantId,
        scope: &SendScope,
        windows: &[(OffsetDateTime, u32)],
    ) -> StoreResult<Vec<u32>> {
        // All of a scope's windows in one trip to the blocking pool: every send counts its
        // number's two, and each trip wakes a thread and waits for it.
        let (tenant, scope, windows) = (tenant.clone(), scope.clone(), windows.to_vec());
        self.scan(move |c| {
            let (sql, key) = match &scope {
                SendScope::Destination(d) => (SENDS_TO_DESTINATION, d.clone()),
                SendScope::CountryPrefix(p) => (SENDS_TO_COUNTRY, p.clone()),
                SendScope::Ip(ip) => (SENDS_FROM_IP, ip.clone()),
                SendScope::User(u) => (SENDS_OF_USER, u.to_string()),
            };
            let mut statement = c.prepare_cached(sql)?;
            windows
                .iter()
                .map(|(since, at_most)| {
                    let n: i64 = statement.query_row(
                        params![tenant.as_str(), key, ms(*since), i64::from(*at_most)],
                        |r| r.get(0),
                    )?;
                    Ok(u32::try_from(n).unwrap_or(u32::MAX))
                })
                .collect()
        })
        .await
    }

    async fn sms_range_outcomes(
        &self,
        tenant: &TenantId,
        prefix: &str,
        since: OffsetDateTime,
        now: OffsetDateTime,
    ) -> StoreResult<RangeOutcomes> {
        let (tenant, prefix) = (tenant.clone(), prefix.to_owned());
        self.scan(move |c| {
            let (settled, verified): (i64, i64) = c
                .prepare_cached(
                    "SELECT COUNT(*), COALESCE(SUM(status = 'approved'), 0) FROM challenges \
                     WHERE tenant_id = ?1 AND created_at > ?3 AND channel = 'sms' \
                     AND destination >= ?2 AND destination < ?2 || ':' \
                     AND status <> 'canceled' AND (status <> 'pending' OR expires_at <= ?4)",
                )?
                .query_row(params![tenant.as_str(), prefix, ms(since), ms(now)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            Ok(RangeOutcomes {
                settled: u32::try_from(settled).unwrap_or(u32::MAX),
                verified: u32::try_from(verified).unwrap_or(u32::MAX),
            })
        })
        .await
    }

    async fn insert_login_ticket(
        &self,
        ticket: &LoginTicket,
        challenge: &Challenge,
        message: Option<&OutboxMessage>,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let (t, ch, msg, audit) = (
            ticket.clone(),
            challenge.clone(),
            message.cloned(),
            audit.to_vec(),
        );
        self.write(move |c| {
            insert_challenge(c, &ch)?;
            if let Some(m) = &msg {
                insert_message(c, m)?;
            }
            c.prepare_cached(
                "INSERT INTO login_tickets (hash, tenant_id, user_id, challenge_id, channel, \
                 created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                t.hash.as_slice(),
                t.tenant_id.as_str(),
                t.user_id.as_str(),
                t.challenge_id.as_str(),
                t.channel.as_str(),
                ms(t.created_at),
                ms(t.expires_at),
            ])
            .map_err(|e| JobError::Store(map_error(e, "login ticket")))?;
            insert_audit(c, &audit)
        })
        .await?
        .map_err(|_| StoreError::Other("ticket insert refused".into()))
    }

    async fn get_login_ticket(&self, hash: &[u8; 32]) -> StoreResult<Option<LoginTicket>> {
        let hash = *hash;
        self.read(move |c| {
            c.prepare_cached(&TICKET_BY_HASH)?
                .query_row([hash.as_slice()], rows::ticket)
                .optional()
        })
        .await
    }

    async fn get_login_context(&self, hash: &[u8; 32]) -> StoreResult<Option<LoginContext>> {
        let hash = *hash;
        // One statement: one snapshot for the three rows.
        self.read(move |c| Ok(read_login_context(c, &hash)?.map(|(context, _)| context)))
            .await
    }

    async fn complete_login(&self, completion: &LoginCompletion) -> StoreResult<bool> {
        let done = completion.clone();
        self.write(move |c| complete_login(c, &done, true, Located::default()))
            .await
            .map(flag)
    }

    async fn settle_login(
        &self,
        ticket_hash: &[u8; 32],
        judge: LoginJudge,
    ) -> StoreResult<Option<SettledLogin>> {
        let hash = *ticket_hash;
        // A "leave" changes nothing, and the core turns it into a refusal or a write of its own.
        self.settle(move |c| {
            // The writer's page cache survives commits (they are its own); a reader's is
            // emptied by every commit of another connection, so it would load each page again.
            let Some((context, found)) = read_login_context(c, &hash)? else {
                return Ok(None);
            };
            let verdict = judge(&context);
            if let LoginVerdict::Complete(done) = &verdict {
                // The user was read in this transaction: an account without failures needs
                // no reset (the statement would find the row and change nothing).
                let failures = context
                    .user
                    .as_ref()
                    .is_none_or(|u| u.failed_logins != 0 || u.locked_until.is_some());
                // The rows just read are found again by row id, where the completion names
                // them (it may name other rows: the judge is the core's).
                let located = Located {
                    ticket: found
                        .ticket
                        .filter(|_| done.ticket_hash == Some(context.ticket.hash)),
                    challenge: found.challenge.filter(|_| {
                        context
                            .challenge
                            .as_ref()
                            .is_some_and(|read| read.id == done.challenge_id)
                    }),
                };
                complete_login(c, done, failures, located)?;
            }
            Ok(Some(SettledLogin { context, verdict }))
        })
        .await?
        // The rows cannot change between the read and the write of one transaction.
        .map_err(|_| StoreError::Other("login changed inside its own transaction".into()))
    }

    async fn insert_session(&self, session: &Session, audit: &[AuditEvent]) -> StoreResult<()> {
        let (s, audit) = (session.clone(), audit.to_vec());
        self.write(move |c| {
            insert_session(c, &s)?;
            insert_audit(c, &audit)
        })
        .await?
        .map_err(|_| StoreError::Other("session insert refused".into()))
    }

    async fn get_session(&self, hash: &[u8; 32]) -> StoreResult<Option<Session>> {
        let hash = *hash;
        let sql = format!(
            "SELECT {} FROM sessions WHERE hash = ?1",
            rows::SESSION_COLUMNS
        );
        self.read(move |c| {
            c.prepare_cached(&sql)?
                .query_row([hash.as_slice()], rows::session)
                .optional()
        })
        .await
    }

    async fn revoke_session(
        &self,
        hash: &[u8; 32],
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        let (hash, audit) = (*hash, audit.to_vec());
        self.write(move |c| {
            require_one(exec(
                c,
                "UPDATE sessions SET revoked_at = ?2 \
                 WHERE hash = ?1 AND revoked_at IS NULL AND expires_at > ?2",
                params![hash.as_slice(), ms(now)],
            )?)?;
            insert_audit(c, &audit)
        })
        .await
        .map(flag)
    }

    async fn insert_totp_factor(
        &self,
        factor: &TotpFactor,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let (f, audit) = (factor.clone(), audit.to_vec());
        self.write(move |c| {
            exec(c,
                "INSERT INTO totp_factors (id, tenant_id, user_id, secret_sealed, algorithm, digits, \
                 period, confirmed_at, last_step, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    f.id.as_str(),
                    f.tenant_id.as_str(),
                    f.user_id.as_str(),
                    f.secret_sealed,
                    f.params.algorithm.as_str(),
                    f.params.digits,
                    f.params.period,
                    f.confirmed_at.map(ms),
                    f.last_step,
                    ms(f.created_at),
                ],
            )
            .map_err(|e| JobError::Store(map_error(e, "factor")))?;
            insert_audit(c, &audit)
        })
        .await?
        .map_err(|_| StoreError::Other("factor insert refused".into()))
    }

    async fn list_totp_factors(
        &self,
        tenant: &TenantId,
        user: &UserId,
    ) -> StoreResult<Vec<TotpFactor>> {
        let (tenant, user) = (tenant.clone(), user.clone());
        let sql = format!(
            "SELECT {} FROM totp_factors WHERE tenant_id = ?1 AND user_id = ?2 \
             ORDER BY created_at DESC, id DESC",
            rows::FACTOR_COLUMNS
        );
        self.read(move |c| {
            c.prepare_cached(&sql)?
                .query_map(params![tenant.as_str(), user.as_str()], rows::factor)?
                .collect()
        })
        .await
    }

    async fn accept_totp_step(
        &self,
        factor: &FactorId,
        step: i64,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        let (factor, audit) = (factor.clone(), audit.to_vec());
        self.write(move |c| {
            require_one(exec(
                c,
                "UPDATE totp_factors SET last_step = ?2, confirmed_at = COALESCE(confirmed_at, ?3) \
                 WHERE id = ?1 AND (last_step IS NULL OR last_step < ?2)",
                params![factor.as_str(), step, ms(now)],
            )?)?;
            insert_audit(c, &audit)
        })
        .await
        .map(flag)
    }

    async fn delete_totp_factors(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let (tenant, user, audit) = (tenant.clone(), user.clone(), audit.to_vec());
        self.write(move |c| {
            for sql in [
                "DELETE FROM totp_factors WHERE tenant_id = ?1 AND user_id = ?2",
                "DELETE FROM recovery_codes WHERE tenant_id = ?1 AND user_id = ?2",
            ] {
                exec(c, sql, params![tenant.as_str(), user.as_str()])?;
            }
            insert_audit(c, &audit)
        })
        .await?
        .map_err(|_| StoreError::Other("delete factors refused".into()))
    }

    async fn replace_recovery_codes(
        &self,
        tenant: &TenantId,
        user: &UserId,
        hashes: &[[u8; 32]],
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let (tenant, user, hashes, audit) = (
            tenant.clone(),
            user.clone(),
            hashes.to_vec(),
            audit.to_vec(),
        );
        self.write(move |c| {
            exec(
                c,
                "DELETE FROM recovery_codes WHERE tenant_id = ?1 AND user_id = ?2",
                params![tenant.as_str(), user.as_str()],
            )?;
            let mut stmt = c.prepare_cached(
                "INSERT INTO recovery_codes (tenant_id, user_id, code_hash, created_at) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for hash in &hashes {
                stmt.execute(params![
                    tenant.as_str(),
                    user.as_str(),
                    hash.as_slice(),
                    ms(now)
                ])?;
            }
            insert_audit(c, &audit)
        })
        .await?
        .map_err(|_| StoreError::Other("recovery codes refused".into()))
    }

    async fn has_unused_recovery_code(
        &self,
        tenant: &TenantId,
        user: &UserId,
        hash: &[u8; 32],
    ) -> StoreResult<bool> {
        let (tenant, user, hash) = (tenant.clone(), user.clone(), *hash);
        self.read(move |c| {
            c.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM recovery_codes WHERE tenant_id = ?1 AND user_id = ?2 \
                 AND code_hash = ?3 AND used_at IS NULL)",
            )?
            .query_row(
                params![tenant.as_str(), user.as_str(), hash.as_slice()],
                |r| r.get::<_, bool>(0),
            )
        })
        .await
    }

    async fn count_unused_recovery_codes(
        &self,
        tenant: &TenantId,
        user: &UserId,
    ) -> StoreResult<u32> {
        let (tenant, user) = (tenant.clone(), user.clone());
        self.read(move |c| {
            let n: i64 = c
                .prepare_cached(
                    "SELECT COUNT(*) FROM recovery_codes WHERE tenant_id = ?1 AND user_id = ?2 \
                     AND used_at IS NULL",
                )?
                .query_row(params![tenant.as_str(), user.as_str()], |r| r.get(0))?;
            Ok(u32::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn find_user_by_phone_and_type(
        &self,
        tenant: &TenantId,
        phone: &str,
        user_type: u16,
    ) -> StoreResult<Option<User>> {
        let (tenant, phone) = (tenant.clone(), phone.to_owned());
        let sql = format!(
            "SELECT {} FROM users WHERE tenant_id = ?1 AND phone = ?2 AND user_type = ?3",
            rows::USER_COLUMNS
        );
        self.read(move |c| {
            c.prepare_cached(&sql)?
                .query_row(params![tenant.as_str(), phone, user_type], rows::user)
                .optional()
        })
        .await
    }

    async fn latest_challenge(
        &self,
        tenant: &TenantId,
        purpose: &str,
        destination: &str,
    ) -> StoreResult<Option<Challenge>> {
        let (tenant, purpose, destination) =
            (tenant.clone(), purpose.to_owned(), destination.to_owned());
        let sql = format!(
            "SELECT {} FROM challenges WHERE tenant_id = ?1 AND destination = ?2 AND purpose = ?3 \
             ORDER BY created_at DESC, rowid DESC LIMIT 1",
            rows::CHALLENGE_COLUMNS
        );
        self.read(move |c| {
            c.prepare_cached(&sql)?
                .query_row(
                    params![tenant.as_str(), destination, purpose],
                    rows::challenge,
                )
                .optional()
        })
        .await
    }

    async fn complete_phone_verification(
        &self,
        completion: &PhoneCompletion,
    ) -> StoreResult<Option<User>> {
        let done = completion.clone();
        let select = format!(
            "SELECT {} FROM users WHERE tenant_id = ?1 AND phone = ?2 AND user_type = ?3",
            rows::USER_COLUMNS
        );
        self.write(move |c| {
            require_one(consume(c, &done.challenge_id, done.expected_attempts, done.now)?)?;
            let candidate = &done.candidate;
            insert_user(c, candidate, true)?;
            let tenant = candidate.tenant_id.as_str();
            let phone = candidate.phone.as_ref().map(|p| p.as_str());
            let user = query_row_cached(c, &select, params![tenant, phone, candidate.user_type], rows::user)?;
            let now = ms(done.now);
            match done.verified {
                Contact::Phone => exec(c,
                    "UPDATE users SET mobile_verified_at = COALESCE(mobile_verified_at, ?2) WHERE id = ?1",
                    params![user.id.as_str(), now],
                )?,
                Contact::Email => exec(c,
                    "UPDATE users SET email_verified_at = COALESCE(email_verified_at, ?2), \
                     email = COALESCE(email, ?3) WHERE id = ?1",
                    params![
                        user.id.as_str(),
                        now,
                        candidate.email.as_ref().map(|e| e.as_str())
                    ],
                )?,
            };
            let d = &done.device;
            exec(c,
                "INSERT INTO devices (tenant_id, user_id, device_unique_id, device_id, device_type, \
                 first_seen_at, last_seen_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) \
                 ON CONFLICT (user_id, device_unique_id) DO UPDATE SET device_id = excluded.device_id, \
                 device_type = excluded.device_type, last_seen_at = excluded.last_seen_at",
                params![tenant, user.id.as_str(), d.device_unique_id, d.device_id, d.device_type, now],
            )?;
            let audit: Vec<AuditEvent> = done
                .audit
                .iter()
                .cloned()
                .map(|mut e| {
                    e.user_id = Some(user.id.clone());
                    e
                })
                .collect();
            insert_audit(c, &audit)?;
            Ok(query_row_cached(c, &select, params![tenant, phone, candidate.user_type], rows::user)?)
        })
        .await
        .map(Result::ok)
    }

    async fn ensure_jwt_key(&self, candidate: &JwtKey) -> StoreResult<JwtKey> {
        let k = candidate.clone();
        let select = format!(
            "SELECT {} FROM tenant_keys WHERE tenant_id = ?1 AND verify_until IS NULL",
            rows::JWT_KEY_COLUMNS
        );
        self.write(move |c| {
            exec(
                c,
                "INSERT OR IGNORE INTO tenant_keys (id, tenant_id, secret_sealed, created_at) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    k.id.as_str(),
                    k.tenant_id.as_str(),
                    k.secret_sealed,
                    ms(k.created_at)
                ],
            )?;
            Ok(query_row_cached(
                c,
                &select,
                [k.tenant_id.as_str()],
                rows::jwt_key,
            )?)
        })
        .await?
        .map_err(|_| StoreError::Other("key refused".into()))
    }

    async fn rotate_jwt_key(
        &self,
        next: &JwtKey,
        retire_until: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let (k, audit) = (next.clone(), audit.to_vec());
        self.write(move |c| {
            exec(c,
                "UPDATE tenant_keys SET verify_until = ?2 WHERE tenant_id = ?1 AND verify_until IS NULL",
                params![k.tenant_id.as_str(), ms(retire_until)],
            )?;
            exec(c,
                "INSERT INTO tenant_keys (id, tenant_id, secret_sealed, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![k.id.as_str(), k.tenant_id.as_str(), k.secret_sealed, ms(k.created_at)],
            )?;
            insert_audit(c, &audit)
        })
        .await?
        .map_err(|_| StoreError::Other("rotation refused".into()))
    }

    async fn verifying_jwt_keys(
        &self,
        tenant: &TenantId,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<JwtKey>> {
        let tenant = tenant.clone();
        let sql = format!(
            "SELECT {} FROM tenant_keys WHERE tenant_id = ?1 AND (verify_until IS NULL OR verify_until > ?2) \
             ORDER BY created_at DESC",
            rows::JWT_KEY_COLUMNS
        );
        self.read(move |c| {
            c.prepare_cached(&sql)?
                .query_map(params![tenant.as_str(), ms(now)], rows::jwt_key)?
                .collect()
        })
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
        let (tenant, jti, audit) = (tenant.clone(), jti.to_owned(), audit.to_vec());
        self.write(move |c| {
            require_one(exec(
                c,
                "INSERT OR IGNORE INTO revoked_tokens (jti, tenant_id, revoked_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![jti, tenant.as_str(), ms(now), ms(expires_at)],
            )?)?;
            insert_audit(c, &audit)
        })
        .await
        .map(flag)
    }

    async fn is_jti_revoked(&self, jti: &str) -> StoreResult<bool> {
        let jti = jti.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = ?1)")?
                .query_row([jti], |r| r.get::<_, bool>(0))
        })
        .await
    }

    async fn revoke_api_key(
        &self,
        tenant: &TenantId,
        id: &ApiKeyId,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool> {
        let (tenant, id, audit) = (tenant.clone(), id.clone(), audit.to_vec());
        self.write(move |c| {
            require_one(exec(
                c,
                "UPDATE api_keys SET revoked_at = ?3 \
                 WHERE tenant_id = ?1 AND id = ?2 AND revoked_at IS NULL",
                params![tenant.as_str(), id.as_str(), ms(now)],
            )?)?;
            insert_audit(c, &audit)
        })
        .await
        .map(flag)
    }

    async fn claim_outbox(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<OutboxMessage>> {
        let sql = format!(
            "UPDATE outbox SET next_attempt_at = ?2, attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM outbox WHERE status = 'queued' AND next_attempt_at <= ?1 \
                          ORDER BY next_attempt_at LIMIT ?3) \
             RETURNING {}",
            rows::MESSAGE_COLUMNS
        );
        // Finding nothing due changes nothing, and the worker only looks again later.
        self.settle(move |c| {
            let claimed = c
                .prepare_cached(&sql)?
                .query_map(params![ms(now), ms(lease_until), limit], rows::message)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(claimed)
        })
        .await?
        .map_err(|_| StoreError::Other("claim refused".into()))
    }

    async fn mark_message_sent(
        &self,
        id: &MessageId,
        provider_message_id: Option<&str>,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let (id, provider, audit) = (
            id.clone(),
            provider_message_id.map(str::to_owned),
            audit.to_vec(),
        );
        let sent_at = audit.first().map(|e| ms(e.at));
        self.write(move |c| {
            exec(
                c,
                "UPDATE outbox SET status = 'sent', body = NULL, code = NULL, \
                 provider_message_id = ?2, sent_at = ?3, last_error = NULL WHERE id = ?1",
                params![id.as_str(), provider, sent_at],
            )?;
            insert_audit(c, &audit)
        })
        .await?
        .map_err(|_| StoreError::Other("mark sent refused".into()))
    }

    async fn mark_message_retry(
        &self,
        id: &MessageId,
        next_attempt_at: OffsetDateTime,
        error: &str,
    ) -> StoreResult<()> {
        let (id, error) = (id.clone(), error.to_owned());
        self.write(move |c| {
            exec(
                c,
                "UPDATE outbox SET next_attempt_at = ?2, last_error = ?3 \
                 WHERE id = ?1 AND status = 'queued'",
                params![id.as_str(), ms(next_attempt_at), error],
            )?;
            Ok(())
        })
        .await?
        .map_err(|_| StoreError::Other("mark retry refused".into()))
    }

    async fn mark_message_failed(
        &self,
        id: &MessageId,
        error: &str,
        audit: &[AuditEvent],
    ) -> StoreResult<()> {
        let (id, error, audit) = (id.clone(), error.to_owned(), audit.to_vec());
        self.write(move |c| {
            exec(
                c,
                "UPDATE outbox SET status = 'failed', body = NULL, code = NULL, last_error = ?2 \
                 WHERE id = ?1",
                params![id.as_str(), error],
            )?;
            insert_audit(c, &audit)
        })
        .await?
        .map_err(|_| StoreError::Other("mark failed refused".into()))
    }

    async fn latest_message_for(
        &self,
        challenge: &ChallengeId,
    ) -> StoreResult<Option<OutboxMessage>> {
        let challenge = challenge.clone();
        let sql = format!(
            "SELECT {} FROM outbox WHERE challenge_id = ?1 ORDER BY created_at DESC, rowid DESC LIMIT 1",
            rows::MESSAGE_COLUMNS
        );
        self.read(move |c| {
            c.prepare_cached(&sql)?
                .query_row([challenge.as_str()], rows::message)
                .optional()
        })
        .await
    }

    async fn sweep(
        &self,
        now: OffsetDateTime,
        retention: std::time::Duration,
        batch: u32,
    ) -> StoreResult<u64> {
        let (now_ms, old) = (ms(now), ms(now - retention));
        self.write(move |c| {
            let mut gone = 0usize;
            for (_, sql, cutoff) in SWEEP_STATEMENTS {
                let cutoff = match cutoff {
                    SweepCutoff::Now => now_ms,
                    SweepCutoff::RetentionAgo => old,
                };
                gone += exec(c, sql, params![cutoff, batch])?;
            }
            Ok(gone as u64)
        })
        .await?
        .map_err(|_| StoreError::Other("sweep refused".into()))
    }

    async fn insert_challenges(&self, challenges: &[Challenge]) -> StoreResult<()> {
        let all = challenges.to_vec();
        self.write(move |c| {
            for challenge in &all {
                insert_challenge(c, challenge)?;
            }
            Ok(())
        })
        .await?
        .map_err(|_| StoreError::Other("challenge insert refused".into()))
    }

    async fn query_plans(&self) -> StoreResult<Vec<QueryPlan>> {
        let statements: Vec<(&'static str, &'static str)> = HOT_STATEMENTS
            .into_iter()
            .chain(SWEEP_STATEMENTS.map(|(purpose, sql, _)| (purpose, sql)))
            .chain([
                (
                    "a tenant's audit events, newest first",
                    AUDIT_NEWEST_FIRST.as_str(),
                ),
                (
                    "a login's ticket, user and challenge",
                    LOGIN_CONTEXT.as_str(),
                ),
            ])
            .collect();
        self.scan(move |c| {
            statements
                .into_iter()
                .map(|(purpose, sql)| {
                    let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                    // Unbound parameters plan like any value: the plan is the same for all.
                    let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
                    let steps = stmt
                        .query_map(rusqlite::params_from_iter(nulls), |row| {
                            row.get::<_, String>(3)
                        })?
                        .collect::<Result<Vec<_>, _>>()?;
                    // "SCAN t" reads every row of t; "SEARCH t USING …" goes through a key.
                    // A subquery's rows ("CO-ROUTINE s" … "SCAN s") are no table's.
                    let subqueries: Vec<&str> = steps
                        .iter()
                        .filter_map(|step| {
                            step.strip_prefix("CO-ROUTINE ")
                                .or_else(|| step.strip_prefix("MATERIALIZE "))
                        })
                        .collect();
                    let full_scan = steps.iter().any(|step| {
                        step.strip_prefix("SCAN ").is_some_and(|scanned| {
                            scanned != "CONSTANT ROW" && !subqueries.contains(&scanned)
                        })
                    });
                    Ok(QueryPlan {
                        purpose,
                        plan: steps.join("\n"),
                        full_scan,
                    })
                })
                .collect()
        })
        .await
    }

    async fn ensure_server_secret(&self, name: &str, candidate: &[u8]) -> StoreResult<Vec<u8>> {
        let (name, candidate) = (name.to_owned(), candidate.to_vec());
        self.write(move |c| {
            exec(
                c,
                "INSERT OR IGNORE INTO server_secrets (id, secret_sealed) VALUES (?1, ?2)",
                params![name, candidate],
            )?;
            Ok(query_row_cached(
                c,
                "SELECT secret_sealed FROM server_secrets WHERE id = ?1",
                [&name],
                |r| r.get(0),
            )?)
        })
        .await?
        .map_err(|_| StoreError::Other("server secret refused".into()))
    }

    async fn sealed_secrets(&self) -> StoreResult<Vec<SealedSecret>> {
        self.scan(|c| {
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
                let mut statement = c.prepare(&sql)?;
                let rows = statement.query_map([], |r| {
                    Ok(SealedSecret {
                        kind,
                        id: r.get(0)?,
                        sealed: r.get(1)?,
                    })
                })?;
                for row in rows {
                    all.push(row?);
                }
            }
            Ok(all)
        })
        .await
    }

    async fn reseal_secrets(&self, changes: &[(SealedSecret, Vec<u8>)]) -> StoreResult<()> {
        let changes = changes.to_vec();
        self.write(move |c| {
            for (old, new) in &changes {
                let sql = format!(
                    "UPDATE {} SET secret_sealed = ?1 WHERE id = ?2 AND secret_sealed = ?3",
                    sealed_table(old.kind)
                );
                if exec(c, &sql, params![new, old.id, old.sealed])? != 1 {
                    return Err(JobError::Condition);
                }
            }
            Ok(())
        })
        .await?
        .map_err(|_| StoreError::Conflict("a sealed secret changed during the rotation"))
    }

    async fn insert_audit(&self, events: &[AuditEvent]) -> StoreResult<()> {
        let events = events.to_vec();
        self.write(move |c| insert_audit(c, &events))
            .await?
            .map_err(|_| StoreError::Other("audit insert refused".into()))
    }

    async fn list_audit(
        &self,
        tenant: &TenantId,
        user: Option<&UserId>,
        limit: u32,
    ) -> StoreResult<Vec<AuditEvent>> {
        let (tenant, user) = (tenant.clone(), user.cloned());
        self.scan(move |c| {
            c.prepare_cached(&AUDIT_NEWEST_FIRST)?
                .query_map(
                    params![tenant.as_str(), user.as_ref().map(|u| u.as_str()), limit],
                    rows::audit,
                )?
                .collect()
        })
        .await
    }
}

/// Where a login's rows are in their tables, when the same transaction has just read them.
#[derive(Clone, Copy, Default)]
struct Located {
    /// The ticket's row id.
    ticket: Option<i64>,
    /// The challenge's row id (none when the ticket names no challenge that is there).
    challenge: Option<i64>,
}

/// Everything a right code changes ([`LoginCompletion`]), each change under its condition.
/// `reset_failures` false skips the reset, for a caller that has just read the account clean;
/// `located` the rows the caller has just read, found again by row id.
fn complete_login(
    c: &Tx<'_, '_>,
    done: &LoginCompletion,
    reset_failures: bool,
    located: Located,
) -> Result<(), JobError> {
    let now = ms(done.now);
    if let Some(ticket) = &done.ticket_hash {
        let spent = match located.ticket {
            Some(rowid) => {
                c.with_statement(SPEND_TICKET_AT, |stmt| stmt.execute(params![rowid, now]))?
            }
            None => exec(c, SPEND_TICKET, params![ticket.as_slice(), now])?,
        };
        require_one(spent)?;
    }
    let consumed = match located.challenge {
        Some(rowid) => c.with_statement(CONSUME_CHALLENGE_AT, |stmt| {
            stmt.execute(params![rowid, done.expected_attempts, now])
        })?,
        None => consume(c, &done.challenge_id, done.expected_attempts, done.now)?,
    };
    require_one(consumed)?;
    if let Some(hash) = &done.recovery_code {
        require_one(exec(
            c,
            "UPDATE recovery_codes SET used_at = ?4 \
             WHERE tenant_id = ?1 AND user_id = ?2 AND code_hash = ?3 AND used_at IS NULL",
            params![
                done.tenant_id.as_str(),
                done.user_id.as_str(),
                hash.as_slice(),
                now
            ],
        )?)?;
    }
    if let Some((factor, step)) = &done.totp_step {
        require_one(exec(
            c,
            "UPDATE totp_factors SET last_step = ?2 \
             WHERE id = ?1 AND confirmed_at IS NOT NULL \
             AND (last_step IS NULL OR last_step < ?2)",
            params![factor.as_str(), step],
        )?)?;
    }
    let user = params![done.tenant_id.as_str(), done.user_id.as_str()];
    if let Some(contact) = done.verified {
        exec(
            c,
            match contact {
                Contact::Phone => {
                    "UPDATE users SET mobile_verified_at = COALESCE(mobile_verified_at, ?3) \
                     WHERE tenant_id = ?1 AND id = ?2"
                }
                Contact::Email => {
                    "UPDATE users SET email_verified_at = COALESCE(email_verified_at, ?3) \
                     WHERE tenant_id = ?1 AND id = ?2"
                }
            },
            params![done.tenant_id.as_str(), done.user_id.as_str(), now],
        )?;
    }
    if reset_failures {
        exec(
            c,
            "UPDATE users SET failed_logins = 0, locked_until = NULL \
             WHERE tenant_id = ?1 AND id = ?2 \
             AND (failed_logins <> 0 OR locked_until IS NOT NULL)",
            user,
        )?;
    }
    if let Some(s) = &done.session {
        insert_session(c, s)?;
    }
    insert_audit(c, &done.audit)
}

/// A login ticket with its user and challenge, on `c`, in one statement, and where the ticket
/// and challenge rows are (for the writes of the same transaction).
fn read_login_context(
    c: &impl Statements,
    hash: &[u8; 32],
) -> rusqlite::Result<Option<(LoginContext, Located)>> {
    const USER: usize = rows::width(rows::TICKET_COLUMNS);
    const CHALLENGE: usize = USER + rows::width(rows::USER_COLUMNS);
    const ROW_IDS: usize = CHALLENGE + rows::width(rows::CHALLENGE_COLUMNS);
    c.with_statement(LOGIN_CONTEXT.as_str(), |stmt| {
        stmt.query_row([hash.as_slice()], |row| {
            // A joined row that is missing reads as NULL in every column, its id first.
            let present = |column: usize| -> rusqlite::Result<bool> {
                Ok(!matches!(
                    row.get_ref(column)?,
                    rusqlite::types::ValueRef::Null
                ))
            };
            let context = LoginContext {
                ticket: rows::ticket_from(row, 0)?,
                user: present(USER)?
                    .then(|| rows::user_from(row, USER))
                    .transpose()?,
                challenge: present(CHALLENGE)?
                    .then(|| rows::challenge_from(row, CHALLENGE))
                    .transpose()?,
            };
            let found = Located {
                ticket: Some(row.get(ROW_IDS)?),
                challenge: row.get(ROW_IDS + 1)?,
            };
            Ok((context, found))
        })
        .optional()
    })
}

/// The one statement that counts a wrong code: pending, unexpired, attempts unchanged.
fn count_failure(
    c: &Connection,
    id: &ChallengeId,
    expected_attempts: u32,
    now: OffsetDateTime,
) -> Result<usize, JobError> {
    Ok(c.prepare_cached(
        "UPDATE challenges SET attempts = attempts + 1, \
         status = CASE WHEN attempts + 1 >= max_attempts THEN 'max_attempts_reached' ELSE status END, \
         resolved_at = CASE WHEN attempts + 1 >= max_attempts THEN ?3 ELSE resolved_at END \
         WHERE id = ?1 AND attempts = ?2 AND status = 'pending' AND expires_at > ?3",
    )?
    .execute(params![id.as_str(), expected_attempts, ms(now)])?)
}

/// The one statement that consumes a challenge: pending, unexpired, attempts unchanged.
fn consume(
    c: &Connection,
    id: &ChallengeId,
    expected_attempts: u32,
    now: OffsetDateTime,
) -> Result<usize, JobError> {
    Ok(c.prepare_cached(CONSUME_CHALLENGE)?.execute(params![
        id.as_str(),
        expected_attempts,
        ms(now)
    ])?)
}

#[cfg(test)]
mod tests {
    use otpgate_core::store::Store;

    use crate::SqliteStore;

    #[tokio::test]
    async fn the_audit_listing_walks_its_index_in_order_instead_of_sorting_the_tenants_events() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("otpgate.db")).unwrap();
        // Act
        let plans = store.query_plans().await.unwrap();
        // Assert: no temporary B-tree, which would hold every event of the tenant to hand
        // back the newest few.
        let audit = plans
            .iter()
            .find(|p| p.purpose == "a tenant's audit events, newest first")
            .unwrap();
        assert!(audit.plan.contains("audit_by_tenant"), "{audit}");
        assert!(!audit.plan.contains("TEMP B-TREE"), "{audit}");
    }
}
