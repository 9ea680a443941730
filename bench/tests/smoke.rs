//! A smoke run of every scenario: one second each, a few connections, on SQLite and on
//! PostgreSQL, against the real `otpgate` binary built beside the bench. It measures nothing
//! (the figures live in BENCHMARKS.md); it fails when a scenario's answers stop passing their
//! checks, so a change to a dialect, the seeding or the bench cannot leave `bench/run-all.sh`
//! reporting errors where it should report logins.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::process::Command;

use otpgate_store_postgres::testing::test_server_url;
use serde_json::Value;

const SCENARIOS: [&str; 8] = [
    "baseline",
    "acl-confirm",
    "v1-check",
    "digipay-verify",
    "totp-confirm",
    "wrong-code",
    "login",
    "send",
];

/// The server binary: `cargo test --workspace` builds it (the `otpgate` package's own
/// integration tests need it) into the directory that holds the bench's. A run of this package
/// alone (`cargo test -p otpgate-bench`) uses whatever `otpgate` was built there last.
fn server_binary() -> PathBuf {
    let server = PathBuf::from(env!("CARGO_BIN_EXE_otpgate-bench")).with_file_name("otpgate");
    assert!(
        server.is_file(),
        "{} is missing: build it first (`cargo build -p otpgate`, or `cargo test --workspace`)",
        server.display()
    );
    server
}

/// Runs every scenario once through the bench's command line and returns its JSON report.
fn run_every_scenario(postgres: Option<&str>) -> Value {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let report = dir.path().join("smoke.json");
    let mut bench = Command::new(env!("CARGO_BIN_EXE_otpgate-bench"));
    bench
        .args(["run", "--scenarios", &SCENARIOS.join(",")])
        .args(["--connections", "4", "--duration", "1", "--fixtures", "400"])
        .arg("--server")
        .arg(server_binary())
        .arg("--json")
        .arg(&report);
    if let Some(url) = postgres {
        bench.args(["--postgres", url, "--pg-connections", "4"]);
    }
    let out = bench.output().expect("the bench starts");
    assert!(
        out.status.success(),
        "the bench failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read(&report).expect("the bench wrote its report");
    serde_json::from_slice(&text).expect("the report is JSON")
}

/// Every scenario ran, sent requests, and every answer passed its check; the report says
/// where the CPU went (PostgreSQL's too when `postgres_here`: a server on this machine);
/// `send`'s codes reached the local webhook receiver.
fn assert_every_answer_passed(report: &Value, store: &str, postgres_here: bool) {
    let rows = report["rows"].as_array().expect("rows");
    let ran: Vec<&str> = rows.iter().filter_map(|r| r["scenario"].as_str()).collect();
    assert_eq!(ran, SCENARIOS, "{store}: every scenario, in order");
    for row in rows {
        let scenario = row["scenario"].as_str().unwrap_or("?");
        assert_eq!(row["store"], store, "{scenario}");
        let requests = row["requests"].as_u64().unwrap_or(0);
        assert!(requests > 0, "{store} {scenario}: no request was answered");
        assert_eq!(
            row["errors"].as_u64(),
            Some(0),
            "{store} {scenario}: {}",
            row["first_error"]
        );
        // Where the run's CPU went: the server's threads, and (on a server on this machine)
        // PostgreSQL's processes.
        let cpu = |group: &str| row["extra"][format!("cpu_us_{group}")].as_f64();
        assert!(
            cpu("server").is_some_and(|us| us > 0.0),
            "{store} {scenario}"
        );
        if postgres_here {
            assert!(cpu("postgres").is_some_and(|us| us > 0.0), "{scenario}");
        }
    }
    let send = rows
        .iter()
        .find(|r| r["scenario"] == "send")
        .expect("send ran");
    let delivered = send["extra"]["delivered_total"].as_f64().unwrap_or(0.0);
    assert!(
        delivered >= 1.0,
        "{store} send: no code reached the webhook"
    );
}

#[test]
fn every_scenario_passes_its_checks_on_sqlite() {
    let report = run_every_scenario(None);
    assert_every_answer_passed(&report, "sqlite", false);
}

#[test]
fn every_scenario_passes_its_checks_on_postgres() {
    let Some(server) = test_server_url().expect("PostgreSQL in CI") else {
        eprintln!("skipped: OTPGATE_TEST_DATABASE_URL is not set");
        return;
    };
    let report = run_every_scenario(Some(&server));
    let here = ["@127.0.0.1", "@localhost", "@[::1]"]
        .iter()
        .any(|host| server.contains(host));
    assert_every_answer_passed(&report, "postgres", here);
}
