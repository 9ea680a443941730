//! The application `serve` runs: store, core, HTTP router, outbox worker, graceful shutdown.
//! The API tests build it the same way, on port 0 with a fake clock and a recording sender.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use otpgate_core::clock::{Clock, SystemClock};
use otpgate_core::crypto::MasterKey;
use otpgate_core::outbox::{DeliveryWorker, MessageSender};
use otpgate_core::password::PasswordHasher;
use otpgate_core::service::Resealed;
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

/// Name of a new master key whose rotation has not finished (see [`rotate_master_key`]).
pub const PENDING_MASTER_KEY_FILE: &str = "master.key.new";

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

/// The key in `path` when it exists, else a new one written there (mode 0600, synced).
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

fn read_master_key(path: &Path) -> Result<MasterKey, AppError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    Ok(MasterKey::from_hex(&text)
        .map_err(|_| ConfigError(format!("{} does not hold 64 hex digits", path.display())))?)
}

/// Makes `path` durable after a rename into its directory.
fn sync_parent(path: &Path) -> Result<(), AppError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// What a master key rotation did.
pub struct Rotation {
    /// The secrets re-sealed.
    pub resealed: Resealed,
    /// Where the new key is.
    pub new_key_file: PathBuf,
    /// Whether the server finds the new key by itself (it replaced `data_dir/master.key`);
    /// otherwise the operator must point the configuration at `new_key_file`.
    pub installed: bool,
}

/// Re-seals every secret in the database under a new master key, in one transaction.
///
/// The new key is read from `new_key_file` when that file exists, else generated there; by
/// default it is `data_dir/master.key.new`, which replaces `master.key` once the database has
/// committed. A crash in between is finished at the next start (see [`open_core`]). A key
/// given by `OTPGATE_MASTER_KEY` needs `new_key_file`: the operator sets the new value.
pub async fn rotate_master_key(
    settings: &Settings,
    new_key_file: Option<&Path>,
) -> Result<Rotation, AppError> {
    let key_file = settings.data_dir.join(MASTER_KEY_FILE);
    let old = match &settings.master_key {
        Some(hex) => MasterKey::from_hex(hex.expose_secret())?,
        None => read_master_key(&key_file)?,
    };
    let (target, installs) = match (new_key_file, &settings.master_key) {
        (Some(path), _) => (path.to_path_buf(), false),
        (None, None) => (settings.data_dir.join(PENDING_MASTER_KEY_FILE), true),
        (None, Some(_)) => {
            return Err(ConfigError(
                "the master key comes from the configuration (OTPGATE_MASTER_KEY): \
                 pass --new-key-file for the new one"
                    .into(),
            )
            .into());
        }
    };
    let new = generate_master_key(&target)?;
    if new.to_hex() == old.to_hex() {
        return Err(ConfigError(format!(
            "{} holds the current master key; a rotation needs a new one",
            target.display()
        ))
        .into());
    }
    let store = open_store(settings).await?;
    let resealed = otpgate_core::service::rotate_master_key(store.as_ref(), &old, &new).await?;
    if installs {
        std::fs::rename(&target, &key_file)?;
        sync_parent(&key_file)?;
    }
    Ok(Rotation {
        resealed,
        new_key_file: if installs { key_file } else { target },
        installed: installs,
    })
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
    let core = match Otpgate::open(
        Arc::clone(&store),
        Arc::clone(&clock),
        master,
        policy.clone(),
        hasher.clone(),
    )
    .await
    {
        Err(CoreError::WrongMasterKey) if settings.master_key.is_none() => {
            // A rotation committed the database but stopped before installing its new key.
            let pending = settings.data_dir.join(PENDING_MASTER_KEY_FILE);
            if !pending.exists() {
                return Err(CoreError::WrongMasterKey.into());
            }
            let core =
                Otpgate::open(store, clock, read_master_key(&pending)?, policy, hasher).await?;
            let key_file = settings.data_dir.join(MASTER_KEY_FILE);
            std::fs::rename(&pending, &key_file)?;
            sync_parent(&key_file)?;
            tracing::warn!(
                path = %key_file.display(),
                "finished an interrupted master key rotation: the new key is installed"
            );
            core
        }
        other => other?,
    }
    .with_templates(templates);
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
