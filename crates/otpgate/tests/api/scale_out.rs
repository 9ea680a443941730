//! Several otpgate instances on one PostgreSQL: nothing is counted twice, nothing is won twice,
//! and a database that drops its connections costs errors (503), never a wrong success.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use otpgate_store_postgres::testing::{TestDatabase, test_server_url};
use serde_json::{Value, json};
use sqlx::Connection;

use crate::helpers::{spawn_app_on_postgres, wrong_code};

struct Instance {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const MASTER_KEY: &str = "4f74706761746520746573742d6f6e6c79206d6173746572206b65792121212a";

fn otpgate(dir: &Path, database_url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_otpgate"));
    cmd.current_dir(dir)
        .env("DATABASE_URL", database_url)
        // Every instance must share the master key: it keys the code hashes.
        .env("OTPGATE_MASTER_KEY", MASTER_KEY)
        .env("RUST_LOG", "info");
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_instance(dir: &Path, database_url: &str, name: &str) -> Instance {
    let port = free_port();
    let log = dir.join(format!("{name}.log"));
    let child = otpgate(dir, database_url)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = crate::helpers::http_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Instance { child, base, log }
}

/// The newest code the `log` provider of any instance wrote for `to`.
async fn logged_code(instances: &[&Instance], to: &str, nth: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut codes = Vec::new();
        for instance in instances {
            let log = std::fs::read_to_string(&instance.log).unwrap_or_default();
            for line in log.lines().filter(|l| l.contains(&format!("to={to}"))) {
                // The first run of six digits in the message text, whatever its language.
                let text = line.split("text=").nth(1).unwrap_or("");
                if let Some(code) = text
                    .split(|c: char| !c.is_ascii_digit())
                    .find(|run| run.len() == 6)
                {
                    codes.push(code.to_owned());
                }
            }
        }
        if codes.len() >= nth {
            return codes.swap_remove(nth - 1);
        }
        assert!(
            Instant::now() < deadline,
            "no code logged for {to}: {}",
            instances
                .iter()
                .map(|i| std::fs::read_to_string(&i.log).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Cluster {
    a: Instance,
    b: Instance,
    key: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
    _database: TestDatabase,
}

async fn cluster() -> Option<Cluster> {
    let server = test_server_url().unwrap()?;
    let database = TestDatabase::create(&server).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Both start at once: the advisory lock makes one of them migrate.
    let (a, b) = tokio::join!(
        start_instance(dir.path(), &database.url, "a"),
        start_instance(dir.path(), &database.url, "b")
    );
    let out = otpgate(dir.path(), &database.url)
        .args(["--json", "apikey", "create", "--name", "cluster"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key: Value = serde_json::from_slice(&out.stdout).unwrap();
    Some(Cluster {
        a,
        b,
        key: key["key"].as_str().unwrap().to_owned(),
        client: crate::helpers::http_client(),
        _dir: dir,
        _database: database,
    })
}

impl Cluster {
    async fn post(&self, instance: &Instance, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", instance.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        )
    }

    async fn start(&self, instance: &Instance, to: &str) -> String {
        let (status, body) = self
            .post(
                instance,
                "/v1/verifications",
                json!({"to": to, "channel": "sms"}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    async fn check(&self, instance: &Instance, id: &str, code: &str) -> (u16, Value) {
        self.post(
            instance,
            &format!("/v1/verifications/{id}/check"),
            json!({"code": code}),
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_checks_across_two_instances_approve_exactly_once() {
    let Some(c) = cluster().await else { return };
    // Arrange
    let to = "+989121230001";
    let id = c.start(&c.a, to).await;
    let code = logged_code(&[&c.a, &c.b], to, 1).await;
    // Act
    let answers = futures_util::future::join_all(
        (0..50).map(|i| c.check(if i % 2 == 0 { &c.a } else { &c.b }, &id, &code)),
    )
    .await;
    // Assert
    let approved = answers
        .iter()
        .filter(|(s, b)| *s == 200 && b["status"] == "approved")
        .count();
    let conflicts = answers.iter().filter(|(s, _)| *s == 409).count();
    assert_eq!((approved, conflicts), (1, 49), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attempts_through_both_instances_add_up_to_one_limit() {
    let Some(c) = cluster().await else { return };
    let to = "+989121230002";
    let id = c.start(&c.b, to).await;
    let right = logged_code(&[&c.a, &c.b], to, 1).await;
    let wrong = wrong_code(&right);
    let mut lefts = Vec::new();
    for i in 0..5 {
        let (_, body) = c
            .check(if i % 2 == 0 { &c.a } else { &c.b }, &id, &wrong)
            .await;
        lefts.push(body["attempts_left"].as_u64().unwrap());
    }
    assert_eq!(lefts, vec![4, 3, 2, 1, 0]);
    let (_, after) = c.check(&c.a, &id, &right).await;
    assert_eq!(after["status"], "max_attempts_reached");
    // And the resend cool-down is shared as well: B refuses what A just sent.
    let (status, _) = c
        .post(
            &c.a,
            "/v1/verifications",
            json!({"to": "+989121230003", "channel": "sms"}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, body) = c
        .post(
            &c.b,
            "/v1/verifications",
            json!({"to": "+989121230003", "channel": "sms"}),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (429, Some("rate_limited")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_database_connections_cost_503s_never_a_wrong_success_and_heal() {
    let Some((app, database)) = spawn_app_on_postgres().await else {
        return;
    };
    // Arrange: pending verifications, and a wrong code for each.
    let mut pending = Vec::new();
    for i in 0..20 {
        let to = format!("+9891212{i:05}");
        let id = app.start_sms(&to).await.body["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let code = app.delivered_code(&to, 1).await;
        pending.push((id, wrong_code(&code)));
    }
    let mut admin = sqlx::PgConnection::connect(&test_server_url().unwrap().unwrap())
        .await
        .unwrap();
    let db_name = database
        .options()
        .unwrap()
        .get_database()
        .unwrap()
        .to_owned();

    // Act: wrong codes from 20 clients while every connection of the database is killed, twice.
    let load = async {
        let mut answers = Vec::new();
        for round in 0..8 {
            let batch = futures_util::future::join_all(
                pending.iter().map(|(id, wrong)| app.check(id, wrong)),
            )
            .await;
            answers.extend(batch.into_iter().map(|a| (round, a.status, a.body)));
        }
        answers
    };
    let killer = async {
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
                .bind(&db_name)
                .execute(&mut admin)
                .await
                .unwrap();
        }
    };
    let (answers, ()) = tokio::join!(load, killer);

    // Assert: every answer is a counted wrong code or a 503 in the v1 shape; none approved.
    for (round, status, body) in &answers {
        match status {
            200 => assert_ne!(body["status"], "approved", "round {round}: {body}"),
            503 => assert_eq!(body["code"], "unavailable", "{body}"),
            other => panic!("round {round}: unexpected {other}: {body}"),
        }
    }
    // The service heals without a restart: ready again, and a new code works.
    let ready = app.send(app.client.get(app.url("/readyz"))).await;
    assert_eq!(ready.status, 200);
    let fresh_to = "+989129999999";
    let fresh = app.start_sms(fresh_to).await;
    assert_eq!(fresh.status, 201);
    let fresh_code = app.delivered_code(fresh_to, 1).await;
    let fresh_id = fresh.body["id"].as_str().unwrap();
    assert_eq!(
        app.check(fresh_id, &fresh_code).await.body["status"],
        "approved"
    );
    // Nothing half-written: every challenge has its message; no counter passed its limit, and
    // every counted attempt has its audit event (they commit together).
    let mut conn = sqlx::PgConnection::connect_with(&database.options().unwrap())
        .await
        .unwrap();
    let orphans: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM challenges c WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.challenge_id = c.id)",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(orphans, 0);
    let over: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM challenges WHERE attempts > max_attempts")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(over, 0);
    let attempts: i64 =
        sqlx::query_scalar("SELECT COALESCE(SUM(attempts), 0)::BIGINT FROM challenges")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let rejected: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_events WHERE kind = 'otp_rejected'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(attempts, rejected);
    let counted = answers.iter().filter(|(_, s, _)| *s == 200).count() as i64;
    assert!(
        counted >= attempts,
        "a 503 answer counted an attempt: {counted} < {attempts}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_revoked_through_one_instance_is_refused_by_the_other_at_once() {
    let Some(c) = cluster().await else { return };
    // Arrange: a user, logged in through A.
    let mut create = otpgate(c._dir.path(), &c._database.url)
        .args([
            "user",
            "create",
            "--username",
            "ali",
            "--password-stdin",
            "--phone",
            "+989121230009",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(create.stdin.as_mut().unwrap(), b"correct horse battery\n").unwrap();
    assert!(create.wait().unwrap().success());
    let (status, step1) = c
        .post(
            &c.a,
            "/api/acl/auth/login",
            json!({"username": "ali", "password": "correct horse battery"}),
        )
        .await;
    assert_eq!(status, 200, "{step1}");
    let code = logged_code(&[&c.a, &c.b], "+989121230009", 1).await;
    let (status, step2) = c
        .post(
            &c.a,
            "/api/acl/auth/confirm_otp",
            json!({"token": step1["data"]["token"], "otp": code}),
        )
        .await;
    assert_eq!(status, 200, "{step2}");
    let token = step2["data"]["token"].as_str().unwrap().to_owned();
    let me = |instance: &Instance| {
        c.client
            .get(format!("{}/api/acl/auth/me", instance.base))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(
        me(&c.b).await.unwrap().status(),
        200,
        "B does not know A's token"
    );
    // Act: log out through A.
    let out = c
        .client
        .post(format!("{}/api/acl/auth/logout", c.a.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 200);
    // Assert: B refuses it at once.
    assert_eq!(me(&c.b).await.unwrap().status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_fails_while_the_database_is_gone_and_requests_answer_503() {
    let Some((app, database)) = spawn_app_on_postgres().await else {
        return;
    };
    assert_eq!(
        app.send(app.client.get(app.url("/readyz"))).await.status,
        200
    );
    // Act: the database disappears under the running service.
    let mut admin = sqlx::PgConnection::connect(&test_server_url().unwrap().unwrap())
        .await
        .unwrap();
    let name = database
        .options()
        .unwrap()
        .get_database()
        .unwrap()
        .to_owned();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    // Assert: not ready, and requests answer 503 in their dialect's shape.
    let ready = app.send(app.client.get(app.url("/readyz"))).await;
    assert_eq!(
        (ready.status, ready.body["status"].as_str()),
        (503, Some("unavailable"))
    );
    let v1 = app.start_sms("+989121230042").await;
    assert_eq!(
        (v1.status, v1.body["code"].as_str()),
        (503, Some("unavailable")),
        "{:?}",
        v1.body
    );
    let acl = app.acl_login("ali", "pw").await;
    assert_eq!(
        (acl.status, acl.body["meta"]["message_code"].as_str()),
        (503, Some("503-1"))
    );
    // The service itself keeps running.
    assert_eq!(
        app.send(app.client.get(app.url("/healthz"))).await.status,
        200
    );
}
