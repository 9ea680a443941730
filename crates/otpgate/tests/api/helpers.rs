//! `spawn_app()`: the same `Application` as `main`, on port 0, with a fresh SQLite database, a
//! fake clock and a recording sender; and one typed helper per endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use otpgate::app::{Application, Overrides};
use otpgate::config::Settings;
use otpgate_core::Otpgate;
use otpgate_core::model::TenantId;
use otpgate_store_postgres::testing::{TestDatabase, test_server_url};
use otpgate_store_testkit::{FakeClock, RecordingSender};
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::sync::oneshot;

/// Held by tests that measure time (no other heavy test may run beside them) and by tests that
/// load the machine (they must not run beside a measurement). Light tests ignore it.
pub static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub core: Arc<Otpgate>,
    pub clock: Arc<FakeClock>,
    pub sender: Arc<RecordingSender>,
    pub tenant: TenantId,
    pub api_key: String,
    shutdown: Option<oneshot::Sender<()>>,
    pub data_dir: tempfile::TempDir,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_on(None).await
}

/// The app on PostgreSQL, in a database of its own; `None` when no test server is configured
/// (outside CI).
pub async fn spawn_app_on_postgres() -> Option<(TestApp, TestDatabase)> {
    let server = test_server_url().unwrap()?;
    let database = TestDatabase::create(&server).await.unwrap();
    let app = spawn_app_on(Some(database.url.clone())).await;
    Some((app, database))
}

pub async fn spawn_app_on(database_url: Option<String>) -> TestApp {
    spawn_app_with(database_url, |_| {}, true).await
}

/// The app with its settings adjusted; `record` replaces the configured delivery providers
/// with the recording sender (otherwise the configured ones deliver for real).
pub async fn spawn_app_with(
    database_url: Option<String>,
    adjust: impl FnOnce(&mut Settings),
    record: bool,
) -> TestApp {
    let data_dir = tempfile::tempdir().unwrap();
    let mut settings = Settings {
        data_dir: data_dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url,
        ..Settings::default()
    };
    settings.delivery.poll_interval_ms = 20;
    adjust(&mut settings);
    let clock = FakeClock::new();
    let sender = RecordingSender::new();
    let app = Application::build(
        &settings,
        Overrides {
            clock: Some(clock.clone()),
            sender: record
                .then(|| sender.clone() as std::sync::Arc<dyn otpgate_core::outbox::MessageSender>),
        },
    )
    .await
    .unwrap();
    let addr = app.local_addr().unwrap();
    let core = app.core();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let tenant = core.default_tenant().await.unwrap().id;
    let (_, key) = core.create_api_key(&tenant, "tests").await.unwrap();
    TestApp {
        addr,
        client: crate::helpers::http_client(),
        core,
        clock,
        sender,
        tenant,
        api_key: key.expose_secret().to_owned(),
        shutdown: Some(stop),
        data_dir,
    }
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            status,
            headers,
            body,
        }
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(&self.api_key)
    }

    pub async fn start_verification(&self, body: Value) -> Answer {
        self.send(self.post("/v1/verifications").json(&body)).await
    }

    pub async fn start_sms(&self, to: &str) -> Answer {
        self.start_verification(serde_json::json!({"to": to, "channel": "sms"}))
            .await
    }

    pub async fn check(&self, id: &str, code: &str) -> Answer {
        self.send(
            self.post(&format!("/v1/verifications/{id}/check"))
                .json(&serde_json::json!({ "code": code })),
        )
        .await
    }

    pub async fn cancel(&self, id: &str) -> Answer {
        self.send(self.post(&format!("/v1/verifications/{id}/cancel")))
            .await
    }

    pub async fn get_verification(&self, id: &str) -> Answer {
        self.send(
            self.client
                .get(self.url(&format!("/v1/verifications/{id}")))
                .bearer_auth(&self.api_key),
        )
        .await
    }

    /// The code of the `nth` message (1-based) delivered to `to`.
    pub async fn delivered_code(&self, to: &str, nth: usize) -> String {
        self.sender
            .wait_for_code(to, nth)
            .await
            .expect("the code was delivered")
    }

    /// Messages queued for `to` in the last hour (delivered or not).
    pub async fn sends_to(&self, to: &str) -> u32 {
        let since = self.clock_now() - Duration::from_secs(3600);
        self.core
            .store()
            .count_sends(
                &self.tenant,
                &otpgate_core::store::SendScope::Destination(to.to_owned()),
                since,
                u32::MAX,
            )
            .await
            .unwrap()
    }

    pub fn clock_now(&self) -> time::OffsetDateTime {
        use otpgate_core::clock::Clock;
        self.clock.now()
    }
}

impl TestApp {
    /// Creates a user in the default tenant.
    pub async fn create_user(
        &self,
        username: &str,
        password: &str,
        email: Option<&str>,
        phone: Option<&str>,
    ) -> otpgate_core::model::User {
        self.core
            .create_user(
                &self.tenant,
                otpgate_core::service::NewUser {
                    username: username.into(),
                    password: secrecy::SecretString::from(password.to_owned()),
                    email: email.map(Into::into),
                    phone: phone.map(Into::into),
                    role: otpgate_core::model::Role::User,
                },
                &Default::default(),
            )
            .await
            .unwrap()
    }

    pub async fn acl(&self, path: &str, body: Value) -> Answer {
        self.send(
            self.client
                .post(self.url(&format!("/api/acl/auth/{path}")))
                .json(&body),
        )
        .await
    }

    pub async fn acl_login(&self, username: &str, password: &str) -> Answer {
        self.acl(
            "login",
            serde_json::json!({"username": username, "password": password}),
        )
        .await
    }

    pub async fn acl_confirm(&self, ticket: &str, otp: &str) -> Answer {
        self.acl(
            "confirm_otp",
            serde_json::json!({"token": ticket, "otp": otp}),
        )
        .await
    }

    pub async fn acl_get(&self, path: &str, authorization: Option<&str>) -> Answer {
        let mut request = self.client.get(self.url(&format!("/api/acl/auth/{path}")));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        self.send(request).await
    }

    pub async fn acl_authed(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self
            .client
            .request(method, self.url(&format!("/api/acl/auth/{path}")))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    /// Logs in through both acl steps with the SMS code; returns the final token.
    pub async fn acl_full_login(
        &self,
        username: &str,
        password: &str,
        phone: &str,
        nth: usize,
    ) -> String {
        let step1 = self.acl_login(username, password).await;
        assert_eq!(step1.status, 200, "{:?}", step1.body);
        let ticket = step1.body["data"]["token"].as_str().unwrap().to_owned();
        let code = self.delivered_code(phone, nth).await;
        let step2 = self.acl_confirm(&ticket, &code).await;
        assert_eq!(step2.status, 200, "{:?}", step2.body);
        step2.body["data"]["token"].as_str().unwrap().to_owned()
    }
}

/// `body` with the values at the given JSON pointers replaced by `"<masked>"`, after checking
/// they are strings.
pub fn masked(mut body: Value, pointers: &[&str]) -> Value {
    for pointer in pointers {
        let shown = body.to_string();
        let slot = body
            .pointer_mut(pointer)
            .unwrap_or_else(|| panic!("{pointer} missing in {shown}"));
        assert!(slot.is_string(), "{pointer} is not a string");
        *slot = Value::String("<masked>".into());
    }
    body
}

/// A code that is certainly not `right`.
pub fn wrong_code(right: &str) -> String {
    if right == "000000" {
        "111111".into()
    } else {
        "000000".into()
    }
}

/// An HTTP client for tests (the TLS provider installed first, as the server does).
pub fn http_client() -> reqwest::Client {
    http_client_builder().build().unwrap()
}

/// A client builder for tests.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    otpgate_delivery::install_tls_provider();
    reqwest::Client::builder()
}
