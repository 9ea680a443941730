//! `otpgate-bench`: a load generator for otpgate. For each scenario it seeds fixtures through
//! otpgate's own store code, starts the real release binary on a loopback port, drives it with
//! a fixed number of keep-alive connections for a bounded time, checks every answer, and
//! reports requests/s, latency quantiles, errors and the server's peak RSS (table and JSON).
//! See BENCHMARKS.md for the commands and the latest figures.

mod cpu;
mod load;
mod report;
mod scenario;
mod server;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::report::{Report, Row};
use crate::scenario::Scenario;
use crate::server::{Prepared, Store};

/// mimalloc, as in the server. With glibc's malloc the bench spent about 12% of its time in
/// malloc and free under `acl-confirm` (it holds every fixture of the run, and glibc's free
/// lists grow long) against about 3% under `baseline` (one fixture), so its own cost per request,
/// and with it the ratio to `baseline`, depended on how many fixtures it held: 16.4-16.8 µs of
/// the bench's CPU a login before, 13.0-14.5 after, `baseline` unchanged (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "otpgate-bench",
    about = "Load benchmarks of otpgate over loopback"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios and print (and optionally save) the report.
    Run {
        /// Scenarios, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "baseline,acl-confirm,v1-check"
        )]
        scenarios: Vec<Scenario>,
        /// Connection counts, comma-separated: each scenario runs once per count.
        #[arg(long, value_delimiter = ',', default_value = "100")]
        connections: Vec<usize>,
        /// Seconds per run (bounded: at most 300).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Times the scenarios run in turn at each connection count (at most 20): each round's
        /// ratio to `baseline` pairs runs minutes apart, and the report gives their median.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Single-use fixtures seeded per run (pending tickets, codes, TOTP users).
        #[arg(long, default_value_t = 100_000)]
        fixtures: usize,
        /// Dead challenges (half expired two days ago, half approved within the hour) written
        /// before each run's fixtures: checks must not slow down with a large table.
        #[arg(long, default_value_t = 0)]
        dead_challenges: usize,
        /// Print the database's plan of every hot and sweep statement after seeding.
        #[arg(long)]
        plans: bool,
        /// Run on a fresh database of this PostgreSQL server instead of SQLite.
        #[arg(long)]
        postgres: Option<String>,
        /// PostgreSQL pool size of the server under test.
        #[arg(long, default_value_t = 32)]
        pg_connections: u32,
        /// The otpgate binary (default: `otpgate` beside this one, i.e. target/release).
        #[arg(long)]
        server: Option<PathBuf>,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Print B/A ratios of two JSON reports.
    Compare { a: PathBuf, b: PathBuf },
    /// Draw requests/s and p99 against connections from JSON reports as SVG.
    Plot {
        /// Reports to draw.
        reports: Vec<PathBuf>,
        /// Only these scenarios.
        #[arg(long, value_delimiter = ',', default_value = "baseline,acl-confirm")]
        scenarios: Vec<String>,
        /// Where to write the SVG.
        #[arg(long)]
        out: PathBuf,
    },
}

/// A local webhook receiver standing in for an SMS gateway: it accepts every message and counts.
struct Receiver {
    port: u16,
    delivered: Arc<AtomicUsize>,
}

async fn start_receiver() -> Result<Receiver, String> {
    let delivered = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&delivered);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                axum::Json(serde_json::json!({"id": "bench"}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Receiver { port, delivered })
}

/// argon2id verifications per second with every core busy, at otpgate's parameters: the
/// ceiling of the `login` scenario.
fn argon2_ceiling(seconds: f64) -> Result<f64, String> {
    use argon2::{PasswordHash, PasswordHasher as _, PasswordVerifier};
    let params = argon2::Params::new(19_456, 2, 1, None).map_err(|e| e.to_string())?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let phc = argon
        .hash_password(scenario::PASSWORD.as_bytes())
        .map_err(|e| e.to_string())?
        .to_string();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            let (argon, phc) = (argon.clone(), phc.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    if let Ok(parsed) = PasswordHash::new(&phc) {
                        let _ = argon.verify_password(scenario::PASSWORD.as_bytes(), &parsed);
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    Ok(total as f64 / seconds)
}

/// What every run seeds besides its scenario's fixtures.
#[derive(Clone, Copy)]
struct Backdrop {
    dead_challenges: usize,
    plans: bool,
}

/// Writes the dead challenges, when `backdrop` asks for them.
async fn seed_backdrop(
    core: &otpgate_core::Otpgate,
    backdrop: Backdrop,
    extra: &mut BTreeMap<String, f64>,
) -> Result<(), String> {
    if backdrop.dead_challenges > 0 {
        let started = Instant::now();
        let tenant = core.default_tenant().await.map_err(|e| e.to_string())?.id;
        core.seed_dead_challenges(&tenant, backdrop.dead_challenges)
            .await
            .map_err(|e| e.to_string())?;
        eprintln!(
            "  {} dead challenges written in {:.1} s",
            backdrop.dead_challenges,
            started.elapsed().as_secs_f64()
        );
        extra.insert(
            "dead_challenges".to_owned(),
            backdrop.dead_challenges as f64,
        );
    }
    Ok(())
}

/// Prints the plans of the seeded database (dead challenges and fixtures in place, so that the
/// planner sees the tables it will serve).
async fn print_plans(core: &otpgate_core::Otpgate) -> Result<(), String> {
    for plan in core.query_plans().await.map_err(|e| e.to_string())? {
        eprintln!("{plan}");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_one(
    scenario: Scenario,
    connections: usize,
    duration: Duration,
    fixtures: usize,
    backdrop: Backdrop,
    store: &Store,
    pg_connections: u32,
    binary: &std::path::Path,
    receiver: &Receiver,
) -> Result<Row, String> {
    let prepared = Prepared::new(store, receiver.port, pg_connections).await?;
    let seed_started = Instant::now();
    let core = prepared.core().await?;
    let mut extra = BTreeMap::new();
    seed_backdrop(&core, backdrop, &mut extra).await?;
    let fixtures_ready = Arc::new(scenario::seed(scenario, &core, fixtures).await?);
    if backdrop.plans {
        print_plans(&core).await?;
    }
    drop(core);
    let seed_secs = seed_started.elapsed().as_secs_f64();
    if scenario == Scenario::Login {
        extra.insert("argon2_ceiling_per_s".to_owned(), argon2_ceiling(3.0)?);
    }
    let running = prepared.start(binary).await?;
    let delivered_before = receiver.delivered.load(Ordering::Relaxed);

    // Login shares the machine with a trickle of baseline requests, whose p99 shows whether
    // password hashing stalls the rest of the service.
    let side_fixtures = (scenario == Scenario::Login)
        .then(scenario::seed_baseline)
        .transpose()?;
    let side = side_fixtures.map(|fixtures| {
        let (addr, fixtures) = (running.addr, Arc::new(fixtures));
        tokio::spawn(async move {
            load::drive(addr, 4, duration, Duration::from_millis(10), fixtures).await
        })
    });
    let watched = cpu::Watched {
        server: running.pid(),
        postgres: matches!(store, Store::Postgres(_)),
    };
    let cpu_before = cpu::snapshot(watched);
    let measured = load::drive(
        running.addr,
        connections,
        duration,
        Duration::ZERO,
        Arc::clone(&fixtures_ready),
    )
    .await;
    let cpu_after = cpu::snapshot(watched);
    extra.extend(cpu::per_request(
        &cpu_before,
        &cpu_after,
        measured.latencies_us.len(),
    ));
    if let Some(side) = side
        && let Ok(side) = side.await
    {
        extra.insert("side_baseline_rps".to_owned(), side.rps());
        extra.insert("side_baseline_p99_ms".to_owned(), side.quantile_ms(0.99));
    }
    if let Some(ceiling) = extra.get("argon2_ceiling_per_s").copied()
        && ceiling > 0.0
    {
        extra.insert(
            "login_vs_argon2_ceiling".to_owned(),
            measured.rps() / ceiling,
        );
    }
    if scenario == Scenario::Send {
        let delivered_in_run = receiver.delivered.load(Ordering::Relaxed) - delivered_before;
        extra.insert(
            "delivered_per_s_during_run".to_owned(),
            delivered_in_run as f64 / measured.elapsed.as_secs_f64(),
        );
        // Then let the worker drain the queue (bounded), and report how long it took.
        let queued = measured.latencies_us.len() - measured.errors as usize;
        let drain_started = Instant::now();
        while receiver.delivered.load(Ordering::Relaxed) - delivered_before < queued
            && drain_started.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let delivered = receiver.delivered.load(Ordering::Relaxed) - delivered_before;
        extra.insert("delivered_total".to_owned(), delivered as f64);
        extra.insert(
            "delivered_per_s_until_drained".to_owned(),
            delivered as f64 / (measured.elapsed + drain_started.elapsed()).as_secs_f64(),
        );
    }
    let mut first_error = measured.first_error.clone();
    if measured.errors > 0 {
        first_error =
            first_error.map(|e| format!("{e}\n--- server log ---\n{}", running.log_tail()));
    }
    Ok(Row {
        scenario: scenario.name().to_owned(),
        store: store.name().to_owned(),
        connections,
        requests: measured.latencies_us.len(),
        rps: measured.rps(),
        p50_ms: measured.quantile_ms(0.50),
        p90_ms: measured.quantile_ms(0.90),
        p99_ms: measured.quantile_ms(0.99),
        max_ms: measured.quantile_ms(1.0),
        errors: measured.errors,
        first_error,
        peak_rss_mib: running.peak_rss_mib(),
        fixtures: fixtures_ready.len(),
        seed_secs,
        exhausted: measured.exhausted,
        extra,
        round: 1,
    })
}

fn read_report(path: &std::path::Path) -> Result<Report, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Run {
            scenarios,
            connections,
            duration,
            rounds,
            fixtures,
            dead_challenges,
            plans,
            postgres,
            pg_connections,
            server,
            json,
        } => {
            let backdrop = Backdrop {
                dead_challenges,
                plans,
            };
            let duration = Duration::from_secs(duration.clamp(1, 300));
            let binary = match server {
                Some(path) => path,
                None => std::env::current_exe()
                    .map_err(|e| e.to_string())?
                    .with_file_name("otpgate"),
            };
            let store = postgres.map_or(Store::Sqlite, Store::Postgres);
            let receiver = start_receiver().await?;
            let rounds = rounds.clamp(1, 20);
            let mut rows = Vec::new();
            for &c in &connections {
                for round in 1..=rounds {
                    for &s in &scenarios {
                        let of_rounds = if rounds > 1 {
                            format!(" (round {round} of {rounds})")
                        } else {
                            String::new()
                        };
                        eprintln!(
                            "running {} on {} with {c} connections{of_rounds}…",
                            s.name(),
                            store.name()
                        );
                        let mut row = run_one(
                            s,
                            c,
                            duration,
                            fixtures,
                            backdrop,
                            &store,
                            pg_connections,
                            &binary,
                            &receiver,
                        )
                        .await?;
                        row.round = round;
                        rows.push(row);
                    }
                }
            }
            let report = Report {
                duration_secs: duration.as_secs(),
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                cpu_model: cpu::model(),
                rows,
            };
            print!("{}", report::table(&report));
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
                std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Ok(())
        }
        Command::Compare { a, b } => {
            print!("{}", report::compare(&read_report(&a)?, &read_report(&b)?));
            Ok(())
        }
        Command::Plot {
            reports,
            scenarios,
            out,
        } => {
            let mut rows = Vec::new();
            for path in &reports {
                rows.extend(
                    read_report(path)?
                        .rows
                        .into_iter()
                        .filter(|r| scenarios.contains(&r.scenario)),
                );
            }
            let rows = report::median_rounds(rows);
            let svg = report::svg(&rows, "otpgate: throughput and p99 against connections");
            std::fs::write(&out, svg).map_err(|e| format!("{}: {e}", out.display()))
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("otpgate-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
