//! The application `serve` runs: store, core, HTTP router, outbox worker, graceful shutdown.
//! The API tests build it the same way, on port 0 with a fake clock and a recording sender.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use otpgate_core::clock::{Clock, SystemClock};
use otpgate_core::crypto::MasterKey;
use otpgate_core::outbox::{DeliveryWorker, MessageSender};
use otpgate_core::password::PasswordHasher;
use otpgate_core::store::Store;
use otpgate_core::sweeper::Sweeper;
use otpgate_core::{CoreError, Otpgate};
use otpgate_http::AppState;
use otpgate_store_postgres::PgStore;
use otpgate_store_sqlite::SqliteStore;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{ConfigError, Settings, StoreChoice};

/// Why the application could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The core (or its store) refused.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A file or socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Parts that tests replace.
#[derive(Default)]
pub struct Overrides {
    /// The clock (default: the system clock).
    pub clock: Option<Arc<dyn Clock>>,
    /// The message sender (default: from configuration).
    pub sender: Option<Arc<dyn MessageSender>>,
}

/// Name of the master key file inside the data directory.
pub const MASTER_KEY_FILE: &str = "master.key";

/// The master key from configuration, or from `data_dir/master.key`, generated there (mode
/// 0600, with a warning) on first start.
pub fn load_master_key(settings: &Settings) -> Result<MasterKey, AppError> {
    if let Some(hex) = &settings.master_key {
        return Ok(MasterKey::from_hex(hex.expose_secret())?);
    }
    let path = settings.data_dir.join(MASTER_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(MasterKey::from_hex(&text)
            .map_err(|_| ConfigError(format!("{} does not hold 64 hex digits", path.display())))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => generate_master_key(&path),
        Err(e) => Err(ConfigError(format!("cannot read {}: {e}", path.display())).into()),
    }
}

fn generate_master_key(path: &Path) -> Result<MasterKey, AppError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let key = MasterKey::generate()?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(key.to_hex().as_bytes())?;
            file.sync_all()?;
            tracing::warn!(
                path = %path.display(),
                "generated a new master key; back it up: without it TOTP secrets cannot be read"
            );
            Ok(key)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(path)?;
            Ok(MasterKey::from_hex(&text)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens the configured store (migrating it), SQLite or PostgreSQL by the URL's scheme.
pub async fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, AppError> {
    Ok(match settings.store_choice()? {
        StoreChoice::Sqlite(path) => Arc::new(
            tokio::task::spawn_blocking(move || SqliteStore::open(path))
                .await
                .map_err(|e| CoreError::Internal(format!("blocking pool: {e}")))?
                .map_err(CoreError::from)?,
        ),
        StoreChoice::Postgres(pg) => {
            Arc::new(PgStore::connect(&pg).await.map_err(CoreError::from)?)
        }
    })
}

/// Opens the store and builds the core service, as `serve` and every CLI command do.
pub async fn open_core(
    settings: &Settings,
    clock: Arc<dyn Clock>,
) -> Result<Arc<Otpgate>, AppError> {
    let policy = settings.policy()?;
    let master = load_master_key(settings)?;
    let store = open_store(settings).await?;
    let hasher = tokio::task::spawn_blocking(PasswordHasher::owasp)
        .await
        .map_err(|e| CoreError::Internal(format!("blocking pool: {e}")))??;
    let templates = crate::delivery::templates(&settings.templates)?;
    let core = Otpgate::new(store, clock, master, policy, hasher).with_templates(templates);
    core.default_tenant().await?;
    Ok(Arc::new(core))
}

/// A built application, bound to its port, not yet serving.
pub struct Application {
    listener: TcpListener,
    core: Arc<Otpgate>,
    worker: DeliveryWorker,
    sweeper: Sweeper,
}

impl Application {
    /// Opens everything and binds the listener.
    pub async fn build(settings: &Settings, overrides: Overrides) -> Result<Self, AppError> {
        let clock = overrides.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let delivery_policy = settings.delivery.policy()?;
        let sweep_policy = settings.sweep_policy()?;
        let core = open_core(settings, clock).await?;
        let sender: Arc<dyn MessageSender> = match overrides.sender {
            Some(sender) => sender,
            None => {
                let sender = settings.delivery.build_sender(core.clock())?;
                if settings.delivery.uses_log() {
                    tracing::warn!(
                        "delivery provider `log` is in use: codes are written to this log. \
                         It is for development only, never for production"
                    );
                }
                sender
            }
        };
        let worker = DeliveryWorker::new(
            core.store(),
            core.clock(),
            sender,
            delivery_policy,
            core.outbox_wake(),
        );
        let sweeper = Sweeper::new(core.store(), core.clock(), sweep_policy);
        let listener = TcpListener::bind(settings.listen).await?;
        Ok(Application {
            listener,
            core,
            worker,
            sweeper,
        })
    }

    /// The bound address (tests bind port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, AppError> {
        Ok(self.listener.local_addr()?)
    }

    /// The core service.
    pub fn core(&self) -> Arc<Otpgate> {
        Arc::clone(&self.core)
    }

    /// Serves until `shutdown` resolves: in-flight requests finish, then the outbox worker
    /// finishes its round and stops; undelivered messages stay queued in the database.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let (stop_worker, worker_stop) = watch::channel(false);
        let worker = tokio::spawn(self.worker.run(worker_stop.clone()));
        let sweeper = tokio::spawn(self.sweeper.run(worker_stop));
        let router = otpgate_http::router(AppState {
            core: Arc::clone(&self.core),
        });
        tracing::info!(addr = %self.listener.local_addr()?, "otpgate listening");
        let served = axum::serve(
            self.listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        let _ = stop_worker.send(true);
        if let Err(e) = worker.await {
            tracing::error!(error = %e, "outbox worker ended abnormally");
        }
        if let Err(e) = sweeper.await {
            tracing::error!(error = %e, "sweeper ended abnormally");
        }
        tracing::info!("otpgate stopped");
        Ok(served?)
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
