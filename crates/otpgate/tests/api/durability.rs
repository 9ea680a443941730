//! Durability under a crash: the real binary confirms logins under concurrent load and is killed
//! with SIGKILL mid-run. After a restart every success it answered still holds (the session
//! works, the ticket is spent), and no ticket spent before the crash works again, whether its
//! answer got out or not. On SQLite (group commit, the WAL synced before
//! answers) and on PostgreSQL.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use otpgate::app::open_core;
use otpgate::config::Settings;
use otpgate_core::Otpgate;
use otpgate_core::clock::SystemClock;
use otpgate_core::token::ticket_key;
use otpgate_store_postgres::testing::{TestDatabase, test_server_url};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::helpers::http_client;

const TICKETS: usize = 1500;
const CONNECTIONS: usize = 32;

struct Seeded {
    ticket: String,
    code: String,
}

fn settings(dir: &std::path::Path, database_url: Option<&str>) -> Settings {
    let mut settings = Settings {
        data_dir: dir.join("otpgate-data"),
        database_url: database_url.map(str::to_owned),
        ..Settings::default()
    };
    // Other tests share the PostgreSQL server's connection limit.
    settings.postgres.max_connections = 4;
    settings
}

async fn core(dir: &std::path::Path, database_url: Option<&str>) -> Arc<Otpgate> {
    open_core(&settings(dir, database_url), Arc::new(SystemClock))
        .await
        .unwrap()
}

fn start(dir: &std::path::Path, database_url: Option<&str>, port: u16) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_otpgate"));
    cmd.current_dir(dir)
        .env_remove("OTPGATE_MASTER_KEY")
        .env("OTPGATE_POSTGRES__MAX_CONNECTIONS", "8")
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match database_url {
        Some(url) => cmd.env("DATABASE_URL", url),
        None => cmd.env_remove("DATABASE_URL"),
    };
    cmd.spawn().unwrap()
}

async fn wait_ready(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_client()
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn confirm(base: &str, ticket: &str, code: &str) -> Result<(u16, Value), reqwest::Error> {
    let response = http_client()
        .post(format!("{base}/api/acl/auth/confirm_otp"))
        .json(&json!({"token": ticket, "otp": code}))
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

async fn crash_under_load(database_url: Option<&str>) {
    let _machine = crate::helpers::MACHINE.lock().await;
    // Arrange: pending logins seeded through the store, then the real server.
    let dir = tempfile::tempdir().unwrap();
    let seeder = core(dir.path(), database_url).await;
    let tenant = seeder.default_tenant().await.unwrap().id;
    let hash = otpgate_core::password::PasswordHasher::owasp()
        .unwrap()
        .hash(secrecy::SecretString::from("durable-password-1".to_owned()))
        .await
        .unwrap();
    let mut users = Vec::new();
    for i in 0..20 {
        users.push(
            seeder
                .seed_user(
                    &tenant,
                    &format!("d{i}"),
                    Some(&format!("+98935000{i:04}")),
                    &hash,
                )
                .await
                .unwrap(),
        );
    }
    let mut seeded = Vec::new();
    for i in 0..TICKETS {
        let code = format!("{:06}", (i * 7919) % 1_000_000);
        let ticket = seeder
            .seed_login_ticket(&users[i % users.len()], Some(&code))
            .await
            .unwrap();
        seeded.push(Seeded {
            ticket: ticket.expose_secret().to_owned(),
            code,
        });
    }
    drop(seeder);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = start(dir.path(), database_url, port);
    wait_ready(&base).await;

    // Act: confirm concurrently; SIGKILL the server once a few hundred have succeeded.
    let seeded = Arc::new(seeded);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let answered: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (seeded, next, answered, base) = (
                Arc::clone(&seeded),
                Arc::clone(&next),
                Arc::clone(&answered),
                base.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(s) = seeded.get(i) else { return };
                    match confirm(&base, &s.ticket, &s.code).await {
                        Ok((200, body)) => {
                            let token = body["data"]["token"].as_str().unwrap().to_owned();
                            answered.lock().unwrap().push((i, token));
                        }
                        Ok((status, body)) => panic!("ticket {i}: {status} {body}"),
                        Err(_) => return, // the server is gone
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered.lock().unwrap().len() < 300 {
        assert!(Instant::now() < deadline, "the load made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() < TICKETS,
        "the crash came after the load ended; nothing was tested"
    );

    // Assert: what the database says each ticket is, after the crash.
    let after = core(dir.path(), database_url).await;
    let mut spent = vec![false; TICKETS];
    for (i, s) in seeded.iter().enumerate() {
        let ticket = after
            .store()
            .get_login_ticket(&ticket_key(&s.ticket))
            .await
            .unwrap();
        // The sweeper deletes spent tickets: gone means spent (every one of them was seeded).
        spent[i] = ticket.is_none_or(|t| t.used_at.is_some());
    }
    for (i, _) in &answered {
        assert!(
            spent[*i],
            "ticket {i} was answered a success, then lost in the crash"
        );
    }
    drop(after);
    let mut server = start(dir.path(), database_url, port);
    wait_ready(&base).await;
    for (i, token) in &answered {
        let me = http_client()
            .get(format!("{base}/api/acl/auth/me"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(me.status(), 200, "the session of ticket {i} was lost");
    }
    // No spent ticket works again; every unspent one still works, once.
    for (i, s) in seeded.iter().enumerate() {
        let (status, _) = confirm(&base, &s.ticket, &s.code).await.unwrap();
        if spent[i] {
            assert_eq!(
                status, 401,
                "ticket {i}, spent before the crash, worked again"
            );
        } else {
            assert_eq!(status, 200, "ticket {i}, never spent, was refused");
        }
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_answered_success_on_sqlite() {
    crash_under_load(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_answered_success_on_postgres() {
    let Some(server) = test_server_url().unwrap() else {
        eprintln!("skipped: OTPGATE_TEST_DATABASE_URL is not set");
        return;
    };
    let database = TestDatabase::create(&server).await.unwrap();
    crash_under_load(Some(&database.url)).await;
}
