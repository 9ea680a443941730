//! No secret at rest or in the logs, and security headers on every answer: the real binary runs
//! a full flow of every dialect; then its log and every table of its database are searched for
//! each code, ticket, token, key, password, TOTP secret and recovery code the flows produced.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::http_client;

pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) base: String,
    log: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn otpgate(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_otpgate"));
    cmd.current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("OTPGATE_MASTER_KEY");
    cmd
}

pub(crate) async fn start(dir: &Path) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.join("server.log");
    let child = otpgate(dir)
        .env("RUST_LOG", "debug")
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("{base}/readyz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Server { child, base, log }
}

impl Server {
    /// The code of the `nth` message the log provider wrote for `to`.
    pub(crate) async fn code(&self, to: &str, nth: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let codes: Vec<String> = log
                .lines()
                .filter(|l| l.contains("log provider") && l.contains(&format!("to={to}")))
                .filter_map(|l| {
                    l.split("text=")
                        .nth(1)
                        .and_then(|t| {
                            t.split(|c: char| !c.is_ascii_digit())
                                .find(|r| r.len() == 6)
                        })
                        .map(str::to_owned)
                })
                .collect();
            if let Some(code) = codes.get(nth - 1) {
                return code.clone();
            }
            assert!(Instant::now() < deadline, "no code logged for {to}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub(crate) async fn post(
    base: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = http_client().post(format!("{base}{path}")).json(&body);
    if let Some((scheme, token)) = auth {
        request = request.header("authorization", format!("{scheme} {token}"));
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

/// Creates a user through the CLI, the password on standard input.
pub(crate) fn create_user(dir: &Path, username: &str, password: &str, contact: &[&str]) {
    let mut create = otpgate(dir)
        .args(["user", "create", "--username", username, "--password-stdin"])
        .args(contact)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        create.stdin.as_mut().unwrap(),
        format!("{password}\n").as_bytes(),
    )
    .unwrap();
    assert!(create.wait().unwrap().success());
}

/// What an acl login by SMS code followed by an authenticator enrolment produced.
pub(crate) struct Enrolled {
    pub(crate) ticket: String,
    pub(crate) code: String,
    pub(crate) token: String,
    pub(crate) totp_secret: String,
    pub(crate) recovery: Vec<String>,
}

/// Logs `username` in through acl (the code from the log provider's line for `phone`), then
/// enrols and confirms an authenticator.
pub(crate) async fn login_and_enrol_totp(
    server: &Server,
    username: &str,
    password: &str,
    phone: &str,
) -> Enrolled {
    let base = &server.base;
    let (_, _, step1) = post(
        base,
        "/api/acl/auth/login",
        None,
        &[],
        json!({"username": username, "password": password}),
    )
    .await;
    let ticket = step1["data"]["token"].as_str().unwrap().to_owned();
    let code = server.code(phone, 1).await;
    let (_, _, step2) = post(
        base,
        "/api/acl/auth/confirm_otp",
        None,
        &[],
        json!({"token": ticket, "otp": code}),
    )
    .await;
    let token = step2["data"]["token"].as_str().unwrap().to_owned();
    let (_, _, enrolled) = post(
        base,
        "/api/acl/auth/totp",
        Some(("Bearer", &token)),
        &[],
        json!({}),
    )
    .await;
    let totp_secret = enrolled["data"]["secret"].as_str().unwrap().to_owned();
    let (status, _, _) = post(
        base,
        "/api/acl/auth/totp/confirm",
        Some(("Bearer", &token)),
        &[],
        json!({"otp": totp_now(&totp_secret)}),
    )
    .await;
    assert_eq!(status, 200);
    let recovery = enrolled["data"]["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    Enrolled {
        ticket,
        code,
        token,
        totp_secret,
        recovery,
    }
}

#[allow(clippy::disallowed_methods)] // the real server runs on the wall clock; so must its TOTP codes
pub(crate) fn totp_now(secret: &str) -> String {
    let bytes = otpgate_core::otp::secret_from_base32(secret).unwrap();
    otpgate_core::otp::TotpParams::default()
        .code_at(&bytes, time::OffsetDateTime::now_utc().unix_timestamp())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_code_token_key_or_secret_reaches_the_database_or_the_log() {
    // Arrange: the real binary with no configuration, an API key and a user.
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let base = server.base.clone();
    let out = otpgate(dir.path())
        .args(["--json", "apikey", "create", "--name", "s"])
        .output()
        .unwrap();
    let key = serde_json::from_slice::<Value>(&out.stdout).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let tenant = serde_json::from_slice::<Value>(&out.stdout).unwrap()["tenant_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let password = "Correct-Horse-Battery-7";
    create_user(
        dir.path(),
        "ali",
        password,
        &["--phone", "+989121230000", "--email", "ali@example.com"],
    );
    let mut secrets: Vec<String> = vec![key.clone(), password.to_owned()];

    // Native API.
    let (_, headers, started) = post(
        &base,
        "/v1/verifications",
        Some(("Bearer", &key)),
        &[],
        json!({"to": "+989121239999", "channel": "sms"}),
    )
    .await;
    for (name, value) in [
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
        ("x-content-type-options", "nosniff"),
    ] {
        assert_eq!(headers[name], value, "{name}");
    }
    assert!(
        headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let code = server.code("+989121239999", 1).await;
    let id = started["id"].as_str().unwrap();
    let (_, _, checked) = post(
        &base,
        &format!("/v1/verifications/{id}/check"),
        Some(("Bearer", &key)),
        &[],
        json!({"code": code}),
    )
    .await;
    assert_eq!(checked["status"], "approved");
    secrets.push(code);

    // acl: login, confirm, enrol an authenticator, recovery codes.
    let Enrolled {
        ticket,
        code,
        token,
        totp_secret,
        recovery,
    } = login_and_enrol_totp(&server, "ali", password, "+989121230000").await;
    let raw_secret = otpgate_core::otp::secret_from_base32(&totp_secret).unwrap();
    secrets.extend([
        ticket,
        code,
        token.clone(),
        totp_secret.clone(),
        hex::encode(&raw_secret),
    ]);
    secrets.extend(recovery.iter().cloned());
    secrets.extend(recovery.iter().map(|c| c.replace('-', "")));
    let (_, _, again) = post(
        &base,
        "/api/acl/auth/login",
        None,
        &[],
        json!({"username": "ali", "password": password}),
    )
    .await;
    let ticket2 = again["data"]["token"].as_str().unwrap().to_owned();
    let (status, _, by_recovery) = post(
        &base,
        "/api/acl/auth/confirm_otp",
        None,
        &[],
        json!({"token": ticket2, "otp": recovery[0]}),
    )
    .await;
    assert_eq!(status, 200);
    secrets.extend([
        ticket2,
        by_recovery["data"]["token"].as_str().unwrap().to_owned(),
    ]);

    // verify_login: mobile and e-mail verification of another user.
    create_user(
        dir.path(),
        "sara",
        password,
        &["--phone", "+989121231111", "--email", "sara@example.com"],
    );
    let fields = |verify: &str, code: Option<&str>| {
        let mut body = json!({"username": "sara", "password": password, "latitude": 35.7, "longitude": 51.4, "req_mode": "app", "verify_type": verify});
        if let Some(code) = code {
            for (i, d) in code.chars().enumerate() {
                body[format!("otp{}", i + 1)] = json!(d.to_string());
            }
        }
        body
    };
    let (_, _, three) = post(
        &base,
        "/api/verify_login_otp",
        None,
        &[],
        fields("mobile_verify", None),
    )
    .await;
    assert_eq!(three["status_code"], 3);
    let code = server.code("+989121231111", 1).await;
    let (_, _, four) = post(
        &base,
        "/api/verify_login_otp",
        None,
        &[],
        fields("mobile_verify", Some(&code)),
    )
    .await;
    assert_eq!(four["status_code"], 4);
    let email_code = server.code("sara@example.com", 1).await;
    let (_, _, one) = post(
        &base,
        "/api/verify_login_otp",
        None,
        &[],
        fields("email_verify", Some(&email_code)),
    )
    .await;
    assert_eq!(one["status_code"], 1);
    secrets.extend([code, email_code, one["token"].as_str().unwrap().to_owned()]);

    // digipay.
    let company = [("companyid", tenant.as_str())];
    let phone = json!({"dial_code": "+91", "phone_number": "9876543210", "user_type": 2, "otp_type": 1, "device_type": "ios", "device_id": "d1", "device_unique_id": "u1"});
    let (status, _, _) = post(
        &base,
        "/digipay/v3/auth/send_otp",
        Some(("Token", &key)),
        &company,
        phone.clone(),
    )
    .await;
    assert_eq!(status, 200);
    let code = server.code("+919876543210", 1).await;
    let mut verify = phone.clone();
    verify["otp"] = json!(code);
    let (status, _, verified) = post(
        &base,
        "/digipay/v3/auth/verify_otp",
        Some(("Token", &key)),
        &company,
        verify,
    )
    .await;
    assert_eq!(status, 200);
    secrets.extend([
        code,
        verified["data"]["token"]["token"]
            .as_str()
            .unwrap()
            .to_owned(),
    ]);
    // Let the outbox worker finish (it erases codes once delivered).
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Assert: the log holds codes only on the log provider's own lines, and nothing else.
    let log = std::fs::read_to_string(&server.log).unwrap();
    for line in log.lines() {
        for secret in &secrets {
            let is_code = secret.len() == 6 && secret.bytes().all(|b| b.is_ascii_digit());
            if line.contains(secret.as_str()) && !(is_code && line.contains("log provider")) {
                panic!("a secret ({} chars) is in the log: {line}", secret.len());
            }
        }
    }
    // Assert: no table holds any of them, as text or as bytes.
    let db = rusqlite::Connection::open(dir.path().join("otpgate-data/otpgate.db")).unwrap();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut cells = 0;
    for table in tables {
        let mut stmt = db.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let columns = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..columns {
                let text = match row.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    rusqlite::types::ValueRef::Blob(b) => {
                        format!("{}{}", hex::encode(b), String::from_utf8_lossy(b))
                    }
                    other => format!("{other:?}"),
                };
                cells += 1;
                for secret in &secrets {
                    assert!(
                        !text.contains(secret.as_str()),
                        "{table} holds a secret ({} chars)",
                        secret.len()
                    );
                }
            }
        }
    }
    assert!(cells > 100, "the database was not searched ({cells} cells)");
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let app = crate::helpers::spawn_app().await;
    for path in ["/healthz", "/login", "/api/acl/auth/me", "/nothing"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        let headers = response.headers();
        assert_eq!(headers["cache-control"], "no-store", "{path}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert!(
            headers["content-security-policy"]
                .to_str()
                .unwrap()
                .starts_with("default-src 'none'"),
            "{path}"
        );
    }
}
