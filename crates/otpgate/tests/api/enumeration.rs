//! No enumeration by timing: on every endpoint that takes a username and password, an unknown
//! user, a wrong password and a locked account take the same time (medians within 10%),
//! because each runs one argon2 verification (a dummy one for unknown users).
//!
//! The three kinds are interleaved round by round, so load from tests running beside this one
//! falls on all three alike, and no other heavy test runs meanwhile (`helpers::MACHINE`). A real
//! difference (a skipped argon2 costs about 20 ms, the whole request) shows on every try; noise
//! does not, so a measurement is repeated up to four times.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app};

const PASSWORD: &str = "correct horse battery";
const ROUNDS: usize = 21;
/// Users who get wrong passwords, per endpoint: each takes at most 8, below the lock-out
/// threshold of 10.
const WRONG_USERS: usize = 11;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Unknown,
    WrongPassword,
    Locked,
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn arrange(app: &TestApp) {
    for i in 0..2 * WRONG_USERS {
        app.create_user(
            &format!("wrong{i}"),
            PASSWORD,
            None,
            Some(&format!("+9891210000{i:02}")),
        )
        .await;
    }
    app.create_user("locked", PASSWORD, None, Some("+989122000000"))
        .await;
    for _ in 0..10 {
        assert_eq!(app.acl_login("locked", "not it").await.status, 401);
    }
    let user = app
        .core
        .user_by_username(&app.tenant, "locked")
        .await
        .unwrap();
    assert!(user.locked_until.is_some(), "the account did not lock");
}

/// Medians of the three kinds on one endpoint; `call` sends one login attempt and returns its
/// HTTP status.
async fn medians<F, Fut>(call: F, attempt: usize, first_user: usize) -> [Duration; 3]
where
    F: Fn(String, String) -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let mut samples: [Vec<Duration>; 3] = Default::default();
    for round in 0..ROUNDS {
        let order = [Kind::Unknown, Kind::WrongPassword, Kind::Locked];
        for k in 0..3 {
            let kind = order[(round + k) % 3];
            let (username, password) = match kind {
                Kind::Unknown => (format!("nobody{round}"), PASSWORD.to_owned()),
                Kind::WrongPassword => (
                    format!(
                        "wrong{}",
                        first_user + (attempt * ROUNDS + round) % WRONG_USERS
                    ),
                    "not it".to_owned(),
                ),
                Kind::Locked => ("locked".to_owned(), PASSWORD.to_owned()),
            };
            let started = Instant::now();
            let status = call(username, password).await;
            samples[kind as usize].push(started.elapsed());
            assert!(status == 401 || status == 200, "{kind:?}: {status}");
        }
    }
    samples.map(median)
}

fn spread(m: &[Duration; 3]) -> f64 {
    let max = m.iter().max().unwrap().as_secs_f64();
    let min = m.iter().min().unwrap().as_secs_f64();
    max / min - 1.0
}

async fn assert_alike<F, Fut>(endpoint: &str, first_user: usize, call: F)
where
    F: Fn(String, String) -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let mut seen = Vec::new();
    for attempt in 0..4 {
        let m = medians(&call, attempt, first_user).await;
        if spread(&m) < 0.10 {
            eprintln!("{endpoint}: medians (unknown, wrong, locked) {m:?}");
            return;
        }
        seen.push(m);
    }
    panic!(
        "{endpoint}: medians (unknown, wrong, locked) differ by 10% or more on every try: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_wrong_and_locked_logins_take_the_same_time() {
    let _alone = crate::helpers::MACHINE.lock().await;
    let app = spawn_app().await;
    arrange(&app).await;
    // Warm up connections and the blocking pool.
    app.acl_login("nobody", PASSWORD).await;

    assert_alike("acl login", 0, |username, password| {
        let app = &app;
        async move { app.acl_login(&username, &password).await.status }
    })
    .await;

    assert_alike("verify_login", WRONG_USERS, |username, password| {
        let app = &app;
        async move {
            let body: Value = json!({
                "username": username, "password": password, "verify_type": "login_verify",
                "latitude": 35.7, "longitude": 51.4, "req_mode": "app"
            });
            let answer = app
                .send(
                    app.client
                        .post(app.url("/api/verify_login_otp"))
                        .json(&body),
                )
                .await;
            // verify_login answers a refused login with status_code 0.
            assert_eq!(answer.body["status_code"], 0, "{:?}", answer.body);
            answer.status
        }
    })
    .await;
}
