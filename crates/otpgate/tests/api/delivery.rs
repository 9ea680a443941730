//! Real delivery: a real SMTP server process (aiosmtpd) for e-mail, a local HTTP server for the
//! SMS providers answering 200, 4xx, 5xx, garbage, or hanging, and a crash in the middle.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use otpgate_core::model::DeliveryStatus;
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app_with};

// ------------------------------------------------------------------ a real SMTP server

pub struct SmtpServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl SmtpServer {
    /// Starts the aiosmtpd fixture; `None` (skip) when Python's aiosmtpd is missing outside CI.
    pub fn start() -> Option<SmtpServer> {
        let available = Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .status()
            .is_ok_and(|s| s.success());
        if !available {
            assert!(
                std::env::var_os("CI").is_none(),
                "aiosmtpd must be installed in CI (.ci/run does it)"
            );
            eprintln!("skipped: python3 -m pip install aiosmtpd to run the SMTP tests");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smtp_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("listening"), "SMTP fixture said {line:?}");
        Some(SmtpServer { child, port, dir })
    }

    /// The messages received so far (raw RFC 5322 text).
    pub fn messages(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }

    /// Waits for a message to `to` and returns its six-digit code.
    pub async fn code_for(&self, to: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            for message in self.messages() {
                if message.contains(&format!("To: {to}")) {
                    let plain = message.split("text/plain").nth(1).unwrap_or(&message);
                    if let Some(code) = plain
                        .split(|c: char| !c.is_ascii_digit())
                        .find(|run| run.len() == 6)
                    {
                        return code.to_owned();
                    }
                }
            }
            assert!(Instant::now() < deadline, "no mail for {to}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ------------------------------------------------------------------ a local HTTP provider

#[derive(Clone, Debug)]
pub enum Behaviour {
    Answer(u16, &'static str),
    /// 200 after this long.
    Slow(Duration),
    Hang,
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Clone, Default)]
pub struct Provider {
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Mutex<VecDeque<Behaviour>>>,
    otherwise: Arc<Mutex<Option<Behaviour>>>,
    /// Requests being answered now, and the most there ever were at once.
    in_flight: Arc<Mutex<(usize, usize)>>,
}

async fn handle(
    State(p): State<Provider>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    p.requests.lock().unwrap().push(Recorded {
        method,
        path: uri.to_string(),
        headers,
        body,
    });
    let next = p.script.lock().unwrap().pop_front();
    let behaviour = next
        .or_else(|| p.otherwise.lock().unwrap().clone())
        .unwrap_or(Behaviour::Answer(200, "{}"));
    match behaviour {
        Behaviour::Answer(code, body) => (StatusCode::from_u16(code).unwrap(), body.to_owned()),
        Behaviour::Slow(delay) => {
            {
                let mut counts = p.in_flight.lock().unwrap();
                counts.0 += 1;
                counts.1 = counts.1.max(counts.0);
            }
            tokio::time::sleep(delay).await;
            p.in_flight.lock().unwrap().0 -= 1;
            (StatusCode::OK, "{}".to_owned())
        }
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            (StatusCode::OK, String::new())
        }
    }
}

impl Provider {
    pub async fn start() -> (Provider, SocketAddr) {
        let provider = Provider::default();
        let app = Router::new().fallback(handle).with_state(provider.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (provider, addr)
    }

    /// Answers these first, in order, then `otherwise`.
    pub fn script(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.script.lock().unwrap().extend(behaviours);
    }

    pub fn otherwise(&self, behaviour: Behaviour) {
        *self.otherwise.lock().unwrap() = Some(behaviour);
    }

    /// The most requests it was answering at once.
    pub fn most_in_flight(&self) -> usize {
        self.in_flight.lock().unwrap().1
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub async fn wait_for(&self, count: usize) -> Vec<Recorded> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let seen = self.requests();
            if seen.len() >= count {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "the provider got {} of {count} requests",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn form(body: &Bytes) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(body).unwrap()
}

async fn delivery_of(
    app: &TestApp,
    verification: &str,
) -> Option<(DeliveryStatus, Option<String>)> {
    let id = otpgate_core::model::ChallengeId::parse(verification).unwrap();
    app.core
        .delivery_state(&id)
        .await
        .unwrap()
        .map(|d| (d.status, d.provider_message_id))
}

async fn wait_delivery(
    app: &TestApp,
    verification: &str,
    wanted: DeliveryStatus,
) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some((status, id)) = delivery_of(app, verification).await
            && status == wanted
        {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "delivery never became {wanted:?}: {:?}",
            delivery_of(app, verification).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------ e-mail

#[tokio::test]
async fn an_email_code_travels_through_a_real_smtp_server_and_finishes_the_login() {
    let Some(smtp) = SmtpServer::start() else {
        return;
    };
    let port = smtp.port;
    let app = spawn_app_with(
        None,
        |s| {
            s.delivery.email = "smtp".into();
            s.delivery.smtp.host = Some("127.0.0.1".into());
            s.delivery.smtp.port = port;
            s.delivery.smtp.security = "none".into();
            s.delivery.smtp.from = Some("otpgate <no-reply@otpgate.test>".into());
        },
        false,
    )
    .await;
    app.create_user("sara", "pw-sara-1234", Some("sara@example.com"), None)
        .await;
    let step1 = app.acl_login("sara", "pw-sara-1234").await;
    assert_eq!(step1.body["data"]["method"], "email");
    let code = smtp.code_for("sara@example.com").await;
    let mail = smtp.messages().pop().unwrap();
    assert!(
        mail.contains("From: otpgate <no-reply@otpgate.test>"),
        "{mail}"
    );
    assert!(mail.contains("text/html"), "no HTML part: {mail}");
    let step2 = app
        .acl_confirm(step1.body["data"]["token"].as_str().unwrap(), &code)
        .await;
    assert_eq!(step2.status, 200, "{:?}", step2.body);
}

#[tokio::test]
async fn a_recipient_the_smtp_server_refuses_fails_at_once_and_the_code_is_erased() {
    let Some(smtp) = SmtpServer::start() else {
        return;
    };
    let port = smtp.port;
    let app = spawn_app_with(
        None,
        |s| {
            s.delivery.email = "smtp".into();
            s.delivery.smtp.host = Some("127.0.0.1".into());
            s.delivery.smtp.port = port;
            s.delivery.smtp.security = "none".into();
            s.delivery.smtp.from = Some("no-reply@otpgate.test".into());
        },
        false,
    )
    .await;
    let started = app
        .start_verification(json!({"to": "refuse-me@example.com", "channel": "email"}))
        .await;
    let id = started.body["id"].as_str().unwrap();
    wait_delivery(&app, id, DeliveryStatus::Failed).await;
    let shown = app.get_verification(id).await;
    assert_eq!(shown.body["delivery"]["status"], "failed");
    let events = app
        .core
        .store()
        .list_audit(&app.tenant, None, 50)
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == otpgate_core::model::AuditKind::MessageFailed)
    );
    assert!(smtp.messages().is_empty());
    let message = app
        .core
        .store()
        .latest_message_for(&otpgate_core::model::ChallengeId::parse(id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        message.code.is_none() && message.body.is_none(),
        "a failed message kept its code"
    );
    assert_eq!(message.attempts, 1, "a permanent refusal was retried");
}

// ------------------------------------------------------------------ SMS providers

/// SMS through the signed webhook at `webhook` alone.
fn webhook_settings(s: &mut otpgate::config::Settings, webhook: SocketAddr) {
    s.delivery.sms = vec!["webhook".into()];
    s.delivery.webhook.url = Some(format!("http://{webhook}/hooks/sms"));
    s.delivery.webhook.secret = Some("whsec_c2VjcmV0LWtleQ==".to_owned().into());
}

/// Starts an SMS code to each of the numbers `+98912` `n` (seven digits); their ids.
async fn start_codes(app: &TestApp, numbers: std::ops::RangeInclusive<u32>) -> Vec<String> {
    let mut ids = Vec::new();
    for n in numbers {
        let answer = app.start_sms(&format!("+98912{n:07}")).await;
        assert_eq!(answer.status, 201, "{:?}", answer.body);
        ids.push(answer.body["id"].as_str().unwrap().to_owned());
    }
    ids
}

fn sms_app_settings(s: &mut otpgate::config::Settings, twilio: SocketAddr, webhook: SocketAddr) {
    webhook_settings(s, webhook);
    s.delivery.sms = vec!["twilio".into(), "webhook".into()];
    s.delivery.twilio.base_url = format!("http://{twilio}");
    s.delivery.twilio.account_sid = Some("AC0123456789".into());
    s.delivery.twilio.auth_token = Some("twilio-token".to_owned().into());
    s.delivery.twilio.from = Some("+15005550006".into());
    s.delivery.timeout_ms = 300;
    s.delivery.lease_ms = 5_000;
    s.delivery.base_backoff_ms = 1_000;
    s.delivery.max_tries = 3;
}

#[tokio::test]
async fn twilio_gets_its_documented_request() {
    let (twilio, t_addr) = Provider::start().await;
    let (_, w_addr) = Provider::start().await;
    twilio.otherwise(Behaviour::Answer(201, r#"{"sid": "SM123"}"#));
    let app = spawn_app_with(None, |s| sms_app_settings(s, t_addr, w_addr), false).await;
    let id = app.start_sms("+989121234567").await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let provider_id = wait_delivery(&app, &id, DeliveryStatus::Sent).await;
    assert_eq!(provider_id.as_deref(), Some("twilio:SM123"));
    let request = twilio.requests().pop().unwrap();
    assert_eq!(request.method, Method::POST);
    assert_eq!(
        request.path,
        "/2010-04-01/Accounts/AC0123456789/Messages.json"
    );
    assert_eq!(
        request.headers["authorization"],
        format!(
            "Basic {}",
            data_encoding::BASE64.encode(b"AC0123456789:twilio-token")
        )
    );
    assert_eq!(
        request.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    let fields = form(&request.body);
    assert!(fields.contains(&("To".into(), "+989121234567".into())));
    assert!(fields.contains(&("From".into(), "+15005550006".into())));
    assert!(
        fields
            .iter()
            .any(|(k, v)| k == "Body" && v.contains("verification code"))
    );
}

#[tokio::test]
async fn a_failing_first_provider_fails_over_to_the_signed_webhook() {
    let (twilio, t_addr) = Provider::start().await;
    let (webhook, w_addr) = Provider::start().await;
    twilio.otherwise(Behaviour::Answer(503, "busy"));
    let app = spawn_app_with(None, |s| sms_app_settings(s, t_addr, w_addr), false).await;
    let id = app.start_sms("+989121234567").await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let provider_id = wait_delivery(&app, &id, DeliveryStatus::Sent)
        .await
        .unwrap();
    assert!(provider_id.starts_with("webhook:msg_"), "{provider_id}");
    let request = webhook.requests().pop().unwrap();
    assert_eq!(
        (request.method.clone(), request.path.as_str()),
        (Method::POST, "/hooks/sms")
    );
    let payload: Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(payload["to"], "+989121234567");
    assert_eq!(payload["channel"], "sms");
    assert_eq!(payload["purpose"], "verify");
    assert_eq!(payload["tenant_id"], app.tenant.as_str());
    assert_eq!(payload["code"].as_str().unwrap().len(), 6);
    // The signature verifies as the Standard Webhooks receivers check it.
    let msg_id = request.headers["webhook-id"].to_str().unwrap();
    let timestamp: i64 = request.headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let expected =
        otpgate_delivery::webhook::signature(b"secret-key", msg_id, timestamp, &request.body);
    assert_eq!(request.headers["webhook-signature"], expected.as_str());
    let tampered =
        otpgate_delivery::webhook::signature(b"secret-key", msg_id, timestamp + 1, &request.body);
    assert_ne!(tampered, expected);
    // The code is gone from the outbox once delivered.
    let latest = app
        .core
        .store()
        .latest_message_for(&otpgate_core::model::ChallengeId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(latest.code.is_none() && latest.body.is_none());
}

#[tokio::test]
async fn a_provider_that_hangs_is_cut_off_and_retried_with_back_off() {
    let (twilio, t_addr) = Provider::start().await;
    let (webhook, w_addr) = Provider::start().await;
    // First round: Twilio hangs (time-out), the webhook answers garbage with a 502.
    twilio.script([Behaviour::Hang]);
    webhook.script([Behaviour::Answer(502, "<html>garbage")]);
    twilio.otherwise(Behaviour::Answer(201, r#"{"sid": "SM9"}"#));
    let app = spawn_app_with(None, |s| sms_app_settings(s, t_addr, w_addr), false).await;
    let started = Instant::now();
    let id = app.start_sms("+989121234567").await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    webhook.wait_for(1).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the hang was not cut off"
    );
    // Not retried before its back-off …
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(twilio.requests().len(), 1);
    assert_eq!(
        delivery_of(&app, &id).await.map(|d| d.0),
        Some(DeliveryStatus::Queued)
    );
    // … and retried once the (fake) clock passes it.
    app.clock.advance(Duration::from_secs(2));
    let provider_id = wait_delivery(&app, &id, DeliveryStatus::Sent).await;
    assert_eq!(provider_id.as_deref(), Some("twilio:SM9"));
}

#[tokio::test]
async fn a_provider_call_that_hangs_holds_up_no_other_message() {
    let (webhook, w_addr) = Provider::start().await;
    webhook.script([Behaviour::Hang]);
    let hang_cut_off_after = Duration::from_secs(10);
    let app = spawn_app_with(
        None,
        |s| {
            webhook_settings(s, w_addr);
            s.delivery.timeout_ms = hang_cut_off_after.as_millis() as u64;
            s.delivery.lease_ms = 60_000;
            s.policy.max_sends_per_ip_per_hour = 0;
        },
        false,
    )
    .await;
    let hung = app.start_sms("+989120000000").await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    webhook.wait_for(1).await;
    // More than one claim's worth (32), sent while the first call hangs.
    let started = Instant::now();
    for id in &start_codes(&app, 1..=40).await {
        wait_delivery(&app, id, DeliveryStatus::Sent).await;
    }
    assert!(
        started.elapsed() < hang_cut_off_after / 2,
        "the other messages waited for the hung call: {:?}",
        started.elapsed()
    );
    assert_eq!(
        delivery_of(&app, &hung).await.map(|d| d.0),
        Some(DeliveryStatus::Queued),
        "the hung call is still in flight"
    );
}

#[tokio::test]
async fn no_more_provider_calls_are_in_flight_than_configured() {
    let (webhook, w_addr) = Provider::start().await;
    webhook.otherwise(Behaviour::Slow(Duration::from_millis(200)));
    let app = spawn_app_with(
        None,
        |s| {
            webhook_settings(s, w_addr);
            s.delivery.max_in_flight = 3;
        },
        false,
    )
    .await;
    for id in &start_codes(&app, 1..=12).await {
        wait_delivery(&app, id, DeliveryStatus::Sent).await;
    }
    assert_eq!(webhook.most_in_flight(), 3);
}

#[tokio::test]
async fn a_4xx_from_every_provider_fails_the_message_at_once() {
    let (twilio, t_addr) = Provider::start().await;
    let (webhook, w_addr) = Provider::start().await;
    twilio.otherwise(Behaviour::Answer(400, r#"{"code": 21211}"#));
    webhook.otherwise(Behaviour::Answer(422, "no"));
    let app = spawn_app_with(None, |s| sms_app_settings(s, t_addr, w_addr), false).await;
    let id = app.start_sms("+989121234567").await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_delivery(&app, &id, DeliveryStatus::Failed).await;
    assert_eq!(
        (twilio.requests().len(), webhook.requests().len()),
        (1, 1),
        "a permanent refusal was retried"
    );
}

#[tokio::test]
async fn kavenegar_gets_the_code_as_its_template_token() {
    let (kavenegar, k_addr) = Provider::start().await;
    kavenegar.otherwise(Behaviour::Answer(
        200,
        r#"{"return": {"status": 200}, "entries": [{"messageid": 8792343}]}"#,
    ));
    let app = spawn_app_with(
        None,
        |s| {
            s.delivery.sms = vec!["kavenegar".into()];
            s.delivery.kavenegar.base_url = format!("http://{k_addr}");
            s.delivery.kavenegar.api_key = Some("kv-api-key".to_owned().into());
            s.delivery.kavenegar.template = Some("otpgate-verify".into());
        },
        false,
    )
    .await;
    let id = app.start_sms("+989121234567").await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let provider_id = wait_delivery(&app, &id, DeliveryStatus::Sent).await;
    assert_eq!(provider_id.as_deref(), Some("kavenegar:8792343"));
    let request = kavenegar.requests().pop().unwrap();
    assert_eq!(request.path, "/v1/kv-api-key/verify/lookup.json");
    let fields = form(&request.body);
    assert!(fields.contains(&("receptor".into(), "09121234567".into())));
    assert!(fields.contains(&("template".into(), "otpgate-verify".into())));
    assert!(fields.iter().any(|(k, v)| k == "token" && v.len() == 6));
}

#[tokio::test]
async fn a_provider_that_closes_the_connection_or_answers_garbage_is_retried() {
    // A socket that accepts and answers bytes that are not HTTP, then closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = socket.write_all(b"garbage\r\n\r\n").await;
        }
    });
    let (webhook, w_addr) = Provider::start().await;
    webhook.otherwise(Behaviour::Answer(200, "ok"));
    let app = spawn_app_with(None, |s| sms_app_settings(s, addr, w_addr), false).await;
    let id = app.start_sms("+989121234567").await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Twilio's "server" fails at the protocol level; the webhook takes over in the same round.
    let provider_id = wait_delivery(&app, &id, DeliveryStatus::Sent)
        .await
        .unwrap();
    assert!(provider_id.starts_with("webhook:"), "{provider_id}");
}

// ------------------------------------------------------------------ a crash with messages queued

fn start_binary(dir: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_otpgate"))
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_ready(port: u16) {
    let client = crate::helpers::http_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("otpgate did not start");
}

#[tokio::test]
async fn after_a_sigkill_every_queued_message_is_delivered_once() {
    // Arrange: a webhook provider that is down, and otpgate configured to use it.
    let (webhook, addr) = Provider::start().await;
    webhook.otherwise(Behaviour::Answer(503, "down"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("otpgate.toml"),
        format!(
            r#"[delivery]
sms = ["webhook"]
base_backoff_ms = 200
max_backoff_ms = 400
max_tries = 50
timeout_ms = 500
lease_ms = 2500
poll_interval_ms = 50

[delivery.webhook]
url = "http://{addr}/sms"
secret = "s3cret"
"#
        ),
    )
    .unwrap();
    let port = free_port();
    let mut server = start_binary(dir.path(), port);
    wait_ready(port).await;
    let key = Command::new(env!("CARGO_BIN_EXE_otpgate"))
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .args(["--json", "apikey", "create", "--name", "crash"])
        .output()
        .unwrap();
    let key: Value = serde_json::from_slice(&key.stdout).unwrap();
    let key = key["key"].as_str().unwrap().to_owned();
    let client = crate::helpers::http_client();
    let phones: Vec<String> = (0..5).map(|i| format!("+98912000000{i}")).collect();
    for phone in &phones {
        let answer = client
            .post(format!("http://127.0.0.1:{port}/v1/verifications"))
            .bearer_auth(&key)
            .json(&json!({"to": phone, "channel": "sms"}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 201);
    }
    // Every message was tried (and refused) at least once: they are queued for a retry.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let tried: std::collections::HashSet<String> = webhook
            .requests()
            .iter()
            .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .filter_map(|v| v["to"].as_str().map(str::to_owned))
            .collect();
        if tried.len() == phones.len() {
            break;
        }
        assert!(Instant::now() < deadline, "not every message was tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Act: SIGKILL, the provider comes back, otpgate restarts.
    server.kill().unwrap();
    server.wait().unwrap();
    let refused_before = webhook.requests().len();
    webhook.otherwise(Behaviour::Answer(200, "ok"));
    let mut restarted = start_binary(dir.path(), port);
    wait_ready(port).await;

    // Assert: each message accepted exactly once, and none retried after that.
    let deadline = Instant::now() + Duration::from_secs(20);
    let accepted = loop {
        let after: Vec<Value> = webhook.requests()[refused_before..]
            .iter()
            .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .collect();
        let ids: std::collections::HashSet<&str> = after
            .iter()
            .filter_map(|v| v["message_id"].as_str())
            .collect();
        if ids.len() >= phones.len() {
            break after;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {} delivered after the restart",
            ids.len(),
            phones.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let total_after = webhook.requests().len() - refused_before;
    assert_eq!(
        total_after,
        phones.len(),
        "a message was sent twice after the restart: {accepted:?}"
    );
    let mut destinations: Vec<&str> = accepted.iter().filter_map(|v| v["to"].as_str()).collect();
    destinations.sort_unstable();
    assert_eq!(
        destinations,
        phones.iter().map(String::as_str).collect::<Vec<_>>()
    );
    restarted.kill().unwrap();
    let _ = restarted.wait();
}
