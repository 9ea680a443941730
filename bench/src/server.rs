//! The server under test: a fresh data directory (and, for PostgreSQL, a fresh database), a
//! configuration without send limits in the way, fixtures seeded through `open_core` (the code
//! `otpgate serve` opens its store with), then the real `otpgate` binary started on a free
//! loopback port. Its peak RSS is read from /proc when the run ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use otpgate::app::open_core;
use otpgate::config::Settings;
use otpgate_core::Otpgate;
use otpgate_core::clock::SystemClock;
use otpgate_store_postgres::testing::TestDatabase;

/// Where the server keeps its data.
#[derive(Debug, Clone)]
pub enum Store {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh database on the PostgreSQL server of this URL.
    Postgres(String),
}

impl Store {
    /// Its name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Store::Sqlite => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }
}

/// A prepared, not yet started server.
pub struct Prepared {
    dir: tempfile::TempDir,
    config: PathBuf,
    database: Option<TestDatabase>,
}

fn config_text(webhook_port: u16, pg_connections: u32) -> String {
    // Send limits, cool-downs and the pumping breaker would turn a load test into a test of
    // the limits: lifted here, they are measured by their own tests. Every request comes from
    // 127.0.0.1 to +98 numbers, as from a product's backend, which turns the per-address,
    // per-account and per-country limits off (0); each number's own limits stay on and are
    // counted on every send.
    format!(
        r#"log = "warn"

[policy]
resend_cooldown_secs = 0
max_sends_per_window = 1000000000
max_sends_per_day = 1000000000
max_sends_per_ip_per_hour = 0
max_sends_per_account_per_hour = 0
max_sends_per_country_per_hour = 0
pumping_min_verified_percent = 0

[postgres]
max_connections = {pg_connections}

[delivery]
sms = ["webhook"]
poll_interval_ms = 200

[delivery.webhook]
url = "http://127.0.0.1:{webhook_port}/hook"
secret = "bench-webhook-secret"
"#
    )
}

impl Prepared {
    /// A data directory and configuration; the database migrated and empty.
    pub async fn new(
        store: &Store,
        webhook_port: u16,
        pg_connections: u32,
    ) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let config = dir.path().join("otpgate.toml");
        std::fs::write(&config, config_text(webhook_port, pg_connections))
            .map_err(|e| e.to_string())?;
        let database = match store {
            Store::Sqlite => None,
            Store::Postgres(url) => Some(TestDatabase::create(url).await?),
        };
        Ok(Prepared {
            dir,
            config,
            database,
        })
    }

    fn settings(&self) -> Result<Settings, String> {
        let mut settings = Settings::load(Some(&self.config)).map_err(|e| e.to_string())?;
        settings.data_dir = self.dir.path().join("data");
        settings.database_url = self.database.as_ref().map(|d| d.url.clone());
        Ok(settings)
    }

    /// The core over this server's store, for seeding.
    pub async fn core(&self) -> Result<Arc<Otpgate>, String> {
        let settings = self.settings()?;
        open_core(&settings, Arc::new(SystemClock))
            .await
            .map_err(|e| e.to_string())
    }

    /// Starts `binary` on a free port and waits until it is ready.
    pub async fn start(self, binary: &Path) -> Result<Running, String> {
        // PostgreSQL checkpoints on its own every five minutes, or after 1 GB of WAL, and a
        // checkpoint that starts during a run (the seeding's writes, the scenario before) makes
        // that run pay for it: `v1-check` gave from 10,600 to 15,700 checks/s in runs of one
        // binary. From a checkpoint, each scenario starts alike.
        if let Some(db) = &self.database
            && let Err(e) = db.checkpoint().await
        {
            eprintln!("warning: no checkpoint before the run ({e}); PostgreSQL figures vary more");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log =
            std::fs::File::create(self.dir.path().join("server.log")).map_err(|e| e.to_string())?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["serve", "--listen", &addr.to_string()])
            .env_remove("OTPGATE_MASTER_KEY")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log);
        match &self.database {
            Some(db) => command.env("DATABASE_URL", &db.url),
            None => command.env_remove("DATABASE_URL"),
        };
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut running = Running {
            child,
            addr,
            prepared: self,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(running);
            }
            if let Ok(Some(status)) = running.child.try_wait() {
                return Err(format!("the server exited at start: {status}"));
            }
            if Instant::now() > deadline {
                return Err("the server did not start in 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A started server; killed when dropped.
pub struct Running {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    prepared: Prepared,
}

impl Running {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// The server's log so far (for errors).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.prepared.dir.path().join("server.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .get(lines.len().saturating_sub(20)..)
            .unwrap_or_default()
            .join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
