//! The process itself: health endpoints, zero-configuration start, graceful shutdown.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::spawn_app;

#[tokio::test]
async fn health_and_readiness_answer_ok() {
    let app = spawn_app().await;
    let health = app.send(app.client.get(app.url("/healthz"))).await;
    assert_eq!(
        (health.status, health.body["status"].as_str()),
        (200, Some("ok"))
    );
    let ready = app.send(app.client.get(app.url("/readyz"))).await;
    assert_eq!(
        (ready.status, ready.body["status"].as_str()),
        (200, Some("ready"))
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not become healthy");
}

fn otpgate(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_otpgate"));
    cmd.current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("OTPGATE_DATA_DIR")
        .env_remove("OTPGATE_MASTER_KEY");
    cmd
}

#[tokio::test]
async fn the_binary_serves_with_no_configuration_and_stops_cleanly_on_sigterm() {
    // Arrange: an empty directory, no configuration at all.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = otpgate(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = crate::helpers::http_client();
    wait_healthy(&client, &base).await;
    let key_out = otpgate(dir.path())
        .args(["--json", "apikey", "create", "--name", "t"])
        .output()
        .unwrap();
    assert!(
        key_out.status.success(),
        "{}",
        String::from_utf8_lossy(&key_out.stderr)
    );
    let key: serde_json::Value = serde_json::from_slice(&key_out.stdout).unwrap();
    let key = key["key"].as_str().unwrap().to_owned();
    let started: serde_json::Value = client
        .post(format!("{base}/v1/verifications"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"to": "+989121234567", "channel": "sms"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["id"].as_str().unwrap().to_owned();

    // Act
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "server ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Assert: a clean exit, the data kept where DESIGN.md says, the log provider warned about
    // and used, and the verification still there after a restart.
    assert!(status.success(), "exit status {status:?}");
    let mut log = String::new();
    std::io::Read::read_to_string(server.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.contains("development only"), "{log}");
    assert!(
        log.contains("+989121234567"),
        "the log provider wrote no message line"
    );
    assert!(dir.path().join("otpgate-data/otpgate.db").exists());
    assert!(dir.path().join("otpgate-data/master.key").exists());
    let port = free_port();
    let mut again = otpgate(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&client, &base).await;
    let shown = client
        .get(format!("{base}/v1/verifications/{id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(shown.status(), 200);
    again.kill().unwrap();
    let _ = again.wait();
}

#[test]
fn the_cli_refuses_a_password_given_any_way_but_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let out = otpgate(dir.path())
        .args(["user", "create", "--username", "ali"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--password-stdin"));
}

#[test]
fn the_cli_creates_tenants_users_and_factors_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let tenant = otpgate(dir.path())
        .args(["--json", "tenant", "create", "--name", "acme"])
        .output()
        .unwrap();
    assert!(tenant.status.success());
    let tenant: serde_json::Value = serde_json::from_slice(&tenant.stdout).unwrap();
    let tenant_id = tenant["id"].as_str().unwrap();
    let mut child = otpgate(dir.path())
        .args([
            "--json",
            "user",
            "create",
            "--username",
            "Sara",
            "--password-stdin",
            "--phone",
            "+۹۸ ۹۱۲ ۱۲۳ ۴۵۶۷",
            "--role",
            "admin",
            "--tenant",
            tenant_id,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"s3cret-pass\n").unwrap();
    let user = child.wait_with_output().unwrap();
    assert!(
        user.status.success(),
        "{}",
        String::from_utf8_lossy(&user.stderr)
    );
    let user: serde_json::Value = serde_json::from_slice(&user.stdout).unwrap();
    assert_eq!(user["username"], "sara");
    assert_eq!(user["phone"], "+989121234567");
    assert_eq!(user["role"], "admin");
    let totp = otpgate(dir.path())
        .args([
            "--json",
            "totp",
            "enroll",
            "--username",
            "sara",
            "--tenant",
            tenant_id,
        ])
        .output()
        .unwrap();
    assert!(
        totp.status.success(),
        "{}",
        String::from_utf8_lossy(&totp.stderr)
    );
    let totp: serde_json::Value = serde_json::from_slice(&totp.stdout).unwrap();
    assert!(
        totp["uri"]
            .as_str()
            .unwrap()
            .starts_with("otpauth://totp/otpgate:sara?secret=")
    );
    assert_eq!(totp["active"], true);
    let human = otpgate(dir.path())
        .args([
            "totp",
            "enroll",
            "--username",
            "sara",
            "--tenant",
            tenant_id,
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&human.stdout).contains('█'),
        "no QR code drawn"
    );
    let unknown = otpgate(dir.path())
        .args(["totp", "enroll", "--username", "nobody"])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
}

#[test]
fn query_plans_show_every_hot_and_sweep_statement_served_by_an_index() {
    // Arrange: a new SQLite database in an empty directory.
    let dir = tempfile::tempdir().unwrap();
    // Act
    let out = otpgate(dir.path())
        .args(["--json", "query-plans"])
        .output()
        .unwrap();
    // Assert: it exits 0 (no full scan), and lists the hot reads, writes and sweeps.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plans = listed["plans"].as_array().unwrap();
    assert!(plans.len() >= 13, "{listed}");
    assert!(plans.iter().all(|p| p["full_scan"] == false), "{listed}");
    assert!(
        plans.iter().any(|p| p["purpose"] == "sweep challenges"
            && p["plan"]
                .as_str()
                .unwrap()
                .contains("login_tickets_by_challenge")),
        "{listed}"
    );
}
