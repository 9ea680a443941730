//! The scenarios: what each seeds through otpgate's own store code before the server starts,
//! which request each connection sends next, and what a right answer looks like.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use otpgate_core::Otpgate;
use otpgate_core::crypto::random_bytes;
use otpgate_core::model::{Channel, Purpose, User};
use otpgate_core::otp::TotpParams;
use otpgate_core::password::PasswordHasher;
use otpgate_core::service::PhoneIdentity;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// The password of every seeded user.
pub const PASSWORD: &str = "bench-password-4711";

/// A load scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// `GET /healthz`: the HTTP ceiling of the same server in the same run.
    Baseline,
    /// acl step 2: a pending login ticket confirmed once with its right SMS code.
    AclConfirm,
    /// Native API: a pending verification checked once with its right code.
    V1Check,
    /// digipay: a pending phone code verified once (user found or created, JWT issued).
    DigipayVerify,
    /// acl step 2 with an authenticator: a TOTP code computed by the bench, each step once.
    TotpConfirm,
    /// acl step 2 with wrong codes (each ticket four times, each account eight times).
    WrongCode,
    /// acl step 1: password login (argon2-bound), users with authenticators (no SMS).
    Login,
    /// Native API: a new SMS code queued per request, delivered to a local webhook receiver.
    Send,
}

impl Scenario {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::AclConfirm => "acl-confirm",
            Scenario::V1Check => "v1-check",
            Scenario::DigipayVerify => "digipay-verify",
            Scenario::TotpConfirm => "totp-confirm",
            Scenario::WrongCode => "wrong-code",
            Scenario::Login => "login",
            Scenario::Send => "send",
        }
    }
}

/// What a right answer is.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// 200.
    Ok,
    /// 200 and a 32-hex `data.token` (acl: the final token).
    AclToken,
    /// 200 and a temporary token in `data.token` (acl step 1: the ticket, its time first).
    AclTicket,
    /// 200 and `status: approved`.
    Approved,
    /// 200 and `success: true` with a JWT.
    DigipayToken,
    /// 401 with the acl envelope's wrong-credentials message.
    AclRejected,
    /// 201 (queued).
    Created,
}

/// One prepared request.
#[derive(Debug, Clone)]
struct Prepared {
    method: hyper::Method,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Value,
    /// For TOTP: the secret whose current code goes into `otp`.
    totp_secret: Option<Vec<u8>>,
}

/// A prepared request as it is sent, encoded once: each request then costs the load generator
/// reference-counted copies instead of a copy of every field, a JSON encoding of the body, and
/// its header names and values checked again (with the parse of every answer into a JSON tree,
/// that was about 10 µs of the load generator's CPU per request more than `baseline`'s, on the
/// two cores the server also runs on).
#[derive(Debug)]
struct Wire {
    method: hyper::Method,
    uri: hyper::Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The encoded body (empty: none).
    body: Bytes,
    /// TOTP: the body without `otp`, and the secret whose current code goes there.
    totp: Option<(Value, Vec<u8>)>,
}

impl Wire {
    fn encode(prepared: Prepared) -> Result<Wire, String> {
        let headers = prepared
            .headers
            .into_iter()
            .map(|(name, value)| {
                let value = HeaderValue::try_from(value).map_err(|e| e.to_string())?;
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
                Ok((name, value))
            })
            .collect::<Result<_, String>>()?;
        let body = match (&prepared.body, &prepared.totp_secret) {
            (Value::Null, _) | (_, Some(_)) => Bytes::new(),
            (body, None) => Bytes::from(body.to_string()),
        };
        Ok(Wire {
            method: prepared.method,
            uri: prepared.path.parse().map_err(|e| format!("{e}"))?,
            headers,
            body,
            totp: prepared.totp_secret.map(|secret| (prepared.body, secret)),
        })
    }
}

/// A request ready to send, with its check.
pub struct Ready {
    /// The HTTP request.
    pub http: Request<Full<Bytes>>,
    /// What the answer must be.
    pub expect: Expect,
}

/// The requests of one run: consumed once each (codes, tickets), or cycled (baseline, login),
/// or generated (send).
pub struct Fixtures {
    scenario: Scenario,
    expect: Expect,
    prepared: Vec<Wire>,
    cycle: bool,
    cursor: AtomicUsize,
    /// The `Host` header, made at the first request (the server's port is not known before).
    host: OnceLock<HeaderValue>,
}

impl Fixtures {
    fn new(
        scenario: Scenario,
        expect: Expect,
        prepared: Vec<Prepared>,
        cycle: bool,
    ) -> Result<Self, String> {
        Ok(Fixtures {
            scenario,
            expect,
            prepared: prepared
                .into_iter()
                .map(Wire::encode)
                .collect::<Result<_, _>>()?,
            cycle,
            cursor: AtomicUsize::new(0),
            host: OnceLock::new(),
        })
    }

    /// How many requests were prepared (generated scenarios: 0).
    pub fn len(&self) -> usize {
        self.prepared.len()
    }

    /// The next request, `None` once every single-use fixture was sent.
    pub fn next_request(&self, addr: SocketAddr) -> Option<Ready> {
        let n = self.cursor.fetch_add(1, Ordering::Relaxed);
        let wire = match self.scenario {
            Scenario::Send => self.prepared.first()?,
            _ if self.cycle => self.prepared.get(n % self.prepared.len().max(1))?,
            _ => self.prepared.get(n)?,
        };
        let body = match (self.scenario, &wire.totp) {
            (Scenario::Send, _) => Bytes::from(
                json!({"to": format!("+98912{:07}", n % 10_000_000), "channel": "sms"}).to_string(),
            ),
            (_, Some((body, secret))) => {
                let mut body = body.clone();
                if let Some(fields) = body.as_object_mut() {
                    fields.insert("otp".into(), json!(totp_now(secret)));
                }
                Bytes::from(body.to_string())
            }
            (_, None) => wire.body.clone(),
        };
        let host = self
            .host
            .get_or_init(|| {
                HeaderValue::try_from(addr.to_string())
                    .unwrap_or_else(|_| HeaderValue::from_static("127.0.0.1"))
            })
            .clone();
        let mut http = Request::new(Full::new(body.clone()));
        *http.method_mut() = wire.method.clone();
        *http.uri_mut() = wire.uri.clone();
        let headers = http.headers_mut();
        headers.insert(HOST, host);
        for (name, value) in &wire.headers {
            headers.append(name.clone(), value.clone());
        }
        if !body.is_empty() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        Some(Ready {
            http,
            expect: self.expect,
        })
    }

    /// Whether an answer is what `expect` asks for.
    pub fn check(&self, expect: &Expect, status: u16, body: &[u8]) -> Result<(), String> {
        // Each answer is parsed only for the fields its check reads, borrowed from the body.
        let acl_token = || {
            serde_json::from_slice::<AclAnswer>(body)
                .ok()
                .map(|a| a.data.token)
        };
        let ok = match expect {
            Expect::Ok => status == 200,
            Expect::AclToken => status == 200 && acl_token().is_some_and(|t| is_hex(&t, 32)),
            Expect::AclTicket => {
                status == 200
                    && acl_token().is_some_and(|t| is_hex(&t, otpgate_core::token::TICKET_LEN))
            }
            Expect::Approved => {
                status == 200
                    && serde_json::from_slice::<V1Answer>(body)
                        .is_ok_and(|a| a.status == "approved")
            }
            Expect::DigipayToken => {
                status == 200
                    && serde_json::from_slice::<DigipayAnswer>(body)
                        .is_ok_and(|a| a.success == 1 && !a.data.token.token.is_empty())
            }
            Expect::AclRejected => {
                status == 401
                    && serde_json::from_slice::<AclRefusal>(body)
                        .is_ok_and(|a| a.meta.message_code == "400-1")
            }
            Expect::Created => status == 201,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{}: {status} {}",
                self.scenario.name(),
                String::from_utf8_lossy(body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            ))
        }
    }
}

/// The fields of the answers the checks read (every other field is skipped).
#[derive(serde::Deserialize)]
struct AclAnswer<'a> {
    #[serde(borrow)]
    data: AclData<'a>,
}

#[derive(serde::Deserialize)]
struct AclData<'a> {
    #[serde(borrow)]
    token: Cow<'a, str>,
}

#[derive(serde::Deserialize)]
struct AclRefusal<'a> {
    #[serde(borrow)]
    meta: AclMeta<'a>,
}

#[derive(serde::Deserialize)]
struct AclMeta<'a> {
    #[serde(borrow)]
    message_code: Cow<'a, str>,
}

#[derive(serde::Deserialize)]
struct V1Answer<'a> {
    #[serde(borrow)]
    status: Cow<'a, str>,
}

#[derive(serde::Deserialize)]
struct DigipayAnswer<'a> {
    success: i64,
    #[serde(borrow)]
    data: DigipayData<'a>,
}

#[derive(serde::Deserialize)]
struct DigipayData<'a> {
    #[serde(borrow)]
    token: DigipayToken<'a>,
}

#[derive(serde::Deserialize)]
struct DigipayToken<'a> {
    #[serde(borrow)]
    token: Cow<'a, str>,
}

/// Whether `text` is `len` lowercase hex digits.
fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[allow(clippy::disallowed_methods)] // the server checks TOTP codes against the wall clock
fn totp_now(secret: &[u8]) -> String {
    TotpParams::default()
        .code_at(secret, time::OffsetDateTime::now_utc().unix_timestamp())
        .unwrap_or_default()
}

fn random_code() -> Result<String, String> {
    let raw: [u8; 4] = random_bytes().map_err(|e| e.to_string())?;
    Ok(format!("{:06}", u32::from_le_bytes(raw) % 1_000_000))
}

fn wrong_code(right: &str) -> String {
    let n: u32 = right.parse().unwrap_or(0);
    format!("{:06}", (n + 1) % 1_000_000)
}

/// Runs `make(i)` for `0..count` with up to 256 in flight (so SQLite's writer batches them).
async fn seed_many<T, F, Fut>(count: usize, make: F) -> Result<Vec<T>, String>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
{
    let mut out: Vec<Option<T>> = (0..count).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < count || !set.is_empty() {
        while next < count && set.len() < 256 {
            let fut = make(next);
            let i = next;
            set.spawn(async move { (i, fut.await) });
            next += 1;
        }
        if let Some(joined) = set.join_next().await {
            let (i, value) = joined.map_err(|e| e.to_string())?;
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(value?);
            }
        }
    }
    Ok(out.into_iter().flatten().collect())
}

async fn users(
    core: &Arc<Otpgate>,
    count: usize,
    with_phone: bool,
    with_totp: bool,
) -> Result<Vec<(User, Option<Vec<u8>>)>, String> {
    let hasher = PasswordHasher::owasp().map_err(|e| e.to_string())?;
    let hash = hasher
        .hash(SecretString::from(PASSWORD.to_owned()))
        .await
        .map_err(|e| e.to_string())?;
    let tenant = core.default_tenant().await.map_err(|e| e.to_string())?.id;
    seed_many(count, |i| {
        let (core, hash, tenant) = (Arc::clone(core), hash.clone(), tenant.clone());
        async move {
            let phone = with_phone.then(|| format!("+98935{i:07}"));
            let user = core
                .seed_user(&tenant, &format!("u{i}"), phone.as_deref(), &hash)
                .await
                .map_err(|e| e.to_string())?;
            let secret = if with_totp {
                let secret: [u8; 20] = random_bytes().map_err(|e| e.to_string())?;
                core.seed_totp_factor(&user, &secret)
                    .await
                    .map_err(|e| e.to_string())?;
                Some(secret.to_vec())
            } else {
                None
            };
            Ok((user, secret))
        }
    })
    .await
}

async fn api_key(core: &Otpgate) -> Result<(String, String), String> {
    let tenant = core.default_tenant().await.map_err(|e| e.to_string())?.id;
    let (_, key) = core
        .create_api_key(&tenant, "bench")
        .await
        .map_err(|e| e.to_string())?;
    Ok((tenant.as_str().to_owned(), key.expose_secret().to_owned()))
}

fn acl_confirm(token: &SecretString, otp: &str) -> Prepared {
    Prepared {
        method: hyper::Method::POST,
        path: "/api/acl/auth/confirm_otp".into(),
        headers: Vec::new(),
        body: json!({"token": token.expose_secret(), "otp": otp}),
        totp_secret: None,
    }
}

/// `GET /healthz`, cycled: nothing to seed.
pub fn seed_baseline() -> Result<Fixtures, String> {
    Fixtures::new(
        Scenario::Baseline,
        Expect::Ok,
        vec![Prepared {
            method: hyper::Method::GET,
            path: "/healthz".into(),
            headers: Vec::new(),
            body: Value::Null,
            totp_secret: None,
        }],
        true,
    )
}

/// Seeds what `scenario` needs (`count` single-use fixtures) and prepares its requests.
pub async fn seed(
    scenario: Scenario,
    core: &Arc<Otpgate>,
    count: usize,
) -> Result<Fixtures, String> {
    match scenario {
        Scenario::Baseline => seed_baseline(),
        Scenario::AclConfirm => {
            let users = users(core, (count / 10).max(1), true, false).await?;
            let users = Arc::new(users);
            let prepared = seed_many(count, |i| {
                let (core, users) = (Arc::clone(core), Arc::clone(&users));
                async move {
                    let (user, _) = users
                        .get(i % users.len())
                        .ok_or_else(|| "no users".to_owned())?;
                    let code = random_code()?;
                    let ticket = core
                        .seed_login_ticket(user, Some(&code))
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(acl_confirm(&ticket, &code))
                }
            })
            .await?;
            Fixtures::new(scenario, Expect::AclToken, prepared, false)
        }
        Scenario::WrongCode => {
            // Two tickets per user, four wrong codes per ticket: eight failures per account,
            // under the lock-out threshold, and no ticket dies (five checks).
            let tickets = (count / 4).max(1);
            let users = Arc::new(users(core, tickets.div_ceil(2), true, false).await?);
            let seeded = seed_many(tickets, |i| {
                let (core, users) = (Arc::clone(core), Arc::clone(&users));
                async move {
                    let (user, _) = users.get(i / 2).ok_or_else(|| "no users".to_owned())?;
                    let code = random_code()?;
                    let ticket = core
                        .seed_login_ticket(user, Some(&code))
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(acl_confirm(&ticket, &wrong_code(&code)))
                }
            })
            .await?;
            let prepared = (0..4).flat_map(|_| seeded.iter().cloned()).collect();
            Fixtures::new(scenario, Expect::AclRejected, prepared, false)
        }
        Scenario::TotpConfirm => {
            let users = Arc::new(users(core, count, false, true).await?);
            let prepared = seed_many(count, |i| {
                let (core, users) = (Arc::clone(core), Arc::clone(&users));
                async move {
                    let (user, secret) = users.get(i).ok_or_else(|| "no users".to_owned())?;
                    let ticket = core
                        .seed_login_ticket(user, None)
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut prepared = acl_confirm(&ticket, "");
                    prepared.totp_secret = secret.clone();
                    Ok(prepared)
                }
            })
            .await?;
            Fixtures::new(scenario, Expect::AclToken, prepared, false)
        }
        Scenario::V1Check => {
            let (tenant, key) = api_key(core).await?;
            let tenant =
                otpgate_core::model::TenantId::parse(&tenant).map_err(|e| e.to_string())?;
            let auth = format!("Bearer {key}");
            let prepared = seed_many(count, |i| {
                let (core, tenant, auth) = (Arc::clone(core), tenant.clone(), auth.clone());
                async move {
                    let code = random_code()?;
                    let challenge = core
                        .seed_challenge(
                            &tenant,
                            None,
                            Purpose::Verify,
                            &format!("+98912{i:07}"),
                            &code,
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(Prepared {
                        method: hyper::Method::POST,
                        path: format!("/v1/verifications/{}/check", challenge.id),
                        headers: vec![("authorization", auth)],
                        body: json!({"code": code}),
                        totp_secret: None,
                    })
                }
            })
            .await?;
            Fixtures::new(scenario, Expect::Approved, prepared, false)
        }
        Scenario::DigipayVerify => {
            let (tenant_text, key) = api_key(core).await?;
            let tenant =
                otpgate_core::model::TenantId::parse(&tenant_text).map_err(|e| e.to_string())?;
            let headers = vec![
                ("authorization", format!("Token {key}")),
                ("companyid", tenant_text),
            ];
            let prepared = seed_many(count, |i| {
                let (core, tenant, headers) = (Arc::clone(core), tenant.clone(), headers.clone());
                async move {
                    let number = format!("912{i:07}");
                    let who = PhoneIdentity {
                        dial_code: "+98".into(),
                        phone_number: number.clone(),
                        user_type: 1,
                        channel: Channel::Sms,
                        email: None,
                    };
                    let destination = who.destination().map_err(|e| e.to_string())?;
                    let code = random_code()?;
                    core.seed_challenge(&tenant, None, Purpose::PhoneLogin, &destination, &code)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(Prepared {
                        method: hyper::Method::POST,
                        path: "/digipay/v3/auth/verify_otp".into(),
                        headers,
                        body: json!({
                            "dial_code": "+98", "phone_number": number, "user_type": 1,
                            "otp_type": 1, "device_type": "android",
                            "device_id": format!("d{i}"), "device_unique_id": format!("u{i}"),
                            "otp": code,
                        }),
                        totp_secret: None,
                    })
                }
            })
            .await?;
            Fixtures::new(scenario, Expect::DigipayToken, prepared, false)
        }
        Scenario::Login => {
            let users = users(core, 200, false, true).await?;
            let prepared = users
                .iter()
                .map(|(user, _)| Prepared {
                    method: hyper::Method::POST,
                    path: "/api/acl/auth/login".into(),
                    headers: Vec::new(),
                    body: json!({"username": user.username.as_str(), "password": PASSWORD}),
                    totp_secret: None,
                })
                .collect();
            Fixtures::new(scenario, Expect::AclTicket, prepared, true)
        }
        Scenario::Send => {
            let (_, key) = api_key(core).await?;
            Fixtures::new(
                scenario,
                Expect::Created,
                vec![Prepared {
                    method: hyper::Method::POST,
                    path: "/v1/verifications".into(),
                    headers: vec![("authorization", format!("Bearer {key}"))],
                    body: Value::Null,
                    totp_secret: None,
                }],
                true,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn acl_answer(token: &str) -> Vec<u8> {
        json!({"data": {"token": token}, "meta": {"status": true}})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn the_acl_checks_accept_the_tokens_the_core_mints_and_nothing_else() {
        // The bench must follow the formats of the core it measures: a check that refuses a
        // right answer counts every request as an error.
        let fixtures = seed_baseline().unwrap();
        let ticket = otpgate_core::token::mint_ticket(time::OffsetDateTime::UNIX_EPOCH).unwrap();
        let ticket = ticket.secret.expose_secret().to_owned();
        let session =
            otpgate_core::token::mint_session_token(time::OffsetDateTime::UNIX_EPOCH).unwrap();
        let session = session.secret.expose_secret().to_owned();
        let check = |expect, body: &[u8]| fixtures.check(&expect, 200, body).is_ok();
        assert!(check(Expect::AclTicket, &acl_answer(&ticket)));
        assert!(check(Expect::AclToken, &acl_answer(&session)));
        assert!(!check(Expect::AclTicket, &acl_answer(&session)));
        assert!(!check(Expect::AclToken, &acl_answer(&ticket)));
        assert!(!check(
            Expect::AclToken,
            &acl_answer(&session.to_uppercase())
        ));
        assert!(!check(Expect::AclTicket, b"{}"));
    }
}
