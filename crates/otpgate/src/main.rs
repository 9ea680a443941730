//! `otpgate`: serve the API, or manage tenants, users, TOTP factors and API keys from the shell.
//! Every command calls the core service; none holds SQL or a rule of its own.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use otpgate::app::{
    AppError, Application, Overrides, open_core, rotate_master_key, shutdown_signal,
};
use otpgate::config::{Settings, StoreChoice};
use otpgate_core::clock::SystemClock;
use otpgate_core::model::{RequestContext, Role, TenantId};
use otpgate_core::service::NewUser;
use otpgate_core::{CoreError, Otpgate};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

/// mimalloc instead of glibc's malloc: under load the request threads spent about 40% of their
/// time in glibc's malloc and free (blocks allocated on a request thread and freed on SQLite's
/// writer, or the reverse, contend for an arena lock), and `acl-confirm` and `v1-check` serve
/// about 10% more requests with it (BENCHMARKS.md, 2026-12-03, night).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "otpgate",
    version,
    about = "Self-hosted one-time-password and two-step login service"
)]
struct Cli {
    /// Where the SQLite database and the master key live.
    #[arg(long, global = true, env = "OTPGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL: `postgres://…` or `sqlite:PATH`; by default a SQLite file in the data directory.
    #[arg(long, global = true, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Configuration file (default: ./otpgate.toml when present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print results as JSON, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve {
        /// Address to listen on (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Create or upgrade the database schema, then exit.
    Migrate,
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage authenticator-app (TOTP) factors.
    #[command(subcommand)]
    Totp(TotpCommand),
    /// Manage API keys of the native API.
    #[command(subcommand)]
    Apikey(ApiKeyCommand),
    /// Re-seal every TOTP secret, JWT key and server secret under a new master key, in one
    /// transaction. Stop every instance first. By default the new key is generated and replaces
    /// DATA_DIR/master.key; with --new-key-file it is read from (or generated into) that file,
    /// and you point the configuration (OTPGATE_MASTER_KEY) at it afterwards.
    RotateMasterKey {
        /// Where the new key is (64 hex digits); generated there when the file does not exist.
        #[arg(long)]
        new_key_file: Option<PathBuf>,
    },
    /// Show how the database runs each statement of the hot paths and of the sweeper (its
    /// query plans); exits 1 if one of them reads a whole table.
    QueryPlans,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant.
    Create {
        /// Display name, unique.
        #[arg(long)]
        name: String,
    },
    /// Set the tenant's own OTP rules: a JSON object of overrides, e.g. '{"code_length": 8}'
    /// (any key of the tenant settings in the README: code lengths and lifetimes, checks, send
    /// limits, allowed countries, SMS pumping defence, product name); '{}' restores the
    /// server's defaults.
    Configure {
        #[arg(long)]
        settings: String,
        #[command(flatten)]
        tenant: TenantArg,
    },
    /// Rotate the tenant's JWT signing key (the old key verifies its tokens until they expire).
    RotateJwtKey {
        #[command(flatten)]
        tenant: TenantArg,
    },
}

#[derive(Args)]
struct TenantArg {
    /// Tenant id (32 hex); the default tenant when omitted.
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user; the password is read from standard input.
    Create {
        #[arg(long)]
        username: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        #[arg(long)]
        email: Option<String>,
        /// Phone number in international form (+989121234567).
        #[arg(long)]
        phone: Option<String>,
        #[arg(long, default_value = "user", value_parser = ["admin", "user"])]
        role: String,
        #[command(flatten)]
        tenant: TenantArg,
    },
    /// Unlock a user locked out by failed logins.
    Unlock {
        #[arg(long)]
        username: String,
        #[command(flatten)]
        tenant: TenantArg,
    },
}

#[derive(Subcommand)]
enum TotpCommand {
    /// Enrol an authenticator app for a user; active at once. Prints the otpauth:// URI and a QR code.
    Enroll {
        #[arg(long)]
        username: String,
        #[command(flatten)]
        tenant: TenantArg,
    },
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Create an API key; it is printed once and stored only hashed.
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        tenant: TenantArg,
    },
    /// Revoke an API key by its id.
    Revoke {
        #[arg(long)]
        id: String,
        #[command(flatten)]
        tenant: TenantArg,
    },
}

fn settings(cli: &Cli) -> Result<Settings, AppError> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(dir) = &cli.data_dir {
        settings.data_dir = dir.clone();
    }
    if let Some(url) = &cli.database_url {
        settings.database_url = Some(url.clone());
    }
    Ok(settings)
}

async fn tenant_of(core: &Otpgate, arg: &TenantArg) -> Result<TenantId, AppError> {
    match &arg.tenant {
        None => Ok(core.default_tenant().await?.id),
        Some(text) => {
            let id = TenantId::parse(text)
                .map_err(|_| CoreError::invalid("tenant", "must be 32 hexadecimal digits"))?;
            Ok(core.tenant(&id).await?.id)
        }
    }
}

fn cli_context() -> RequestContext {
    RequestContext {
        mode: Some("cli".into()),
        ..RequestContext::default()
    }
}

fn read_password() -> Result<SecretString, AppError> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        return Err(CoreError::invalid("password", "is required on standard input").into());
    }
    Ok(SecretString::from(password))
}

fn print(json_mode: bool, value: serde_json::Value, human: String) {
    if json_mode {
        println!("{value}");
    } else {
        println!("{human}");
    }
}

fn qr_for_terminal(text: &str) -> String {
    use qrcode::render::unicode::Dense1x2;
    match qrcode::QrCode::new(text.as_bytes()) {
        Ok(code) => code
            .render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
        Err(e) => format!("(QR code unavailable: {e})"),
    }
}

async fn run(cli: Cli) -> Result<(), AppError> {
    let mut settings = settings(&cli)?;
    // Admin commands log warnings only (e.g. a newly generated master key); serve logs more.
    let is_serve = matches!(cli.command, Command::Serve { .. });
    otpgate::telemetry::init(if is_serve { &settings.log } else { "warn" });
    let clock = Arc::new(SystemClock);
    match cli.command {
        Command::Serve { listen } => {
            if let Some(addr) = listen {
                settings.listen = addr;
            }
            let app = Application::build(&settings, Overrides::default()).await?;
            app.run_until(shutdown_signal()).await
        }
        Command::QueryPlans => {
            let core = open_core(&settings, clock).await?;
            let plans = core.query_plans().await?;
            let scans: Vec<&str> = plans
                .iter()
                .filter(|p| p.full_scan)
                .map(|p| p.purpose)
                .collect();
            let human = plans.iter().map(|p| format!("{p}\n")).collect::<String>();
            let listed: Vec<_> = plans
                .iter()
                .map(|p| json!({"purpose": p.purpose, "plan": p.plan, "full_scan": p.full_scan}))
                .collect();
            print(cli.json, json!({ "plans": listed }), human);
            if scans.is_empty() {
                Ok(())
            } else {
                Err(CoreError::Internal(format!("full table scans: {}", scans.join(", "))).into())
            }
        }
        Command::RotateMasterKey { new_key_file } => {
            let rotation = rotate_master_key(&settings, new_key_file.as_deref()).await?;
            let r = rotation.resealed;
            let file = rotation.new_key_file.display();
            let next = if rotation.installed {
                format!("the new key is in {file}; back it up")
            } else {
                format!("the new key is in {file}: set OTPGATE_MASTER_KEY to it before starting")
            };
            print(
                cli.json,
                json!({
                    "resealed": r,
                    "new_key_file": rotation.new_key_file,
                    "installed": rotation.installed,
                }),
                format!(
                    "re-sealed {} TOTP secrets, {} JWT keys and {} server secrets; {next}",
                    r.totp_factors, r.jwt_keys, r.server_secrets
                ),
            );
            Ok(())
        }
        Command::Migrate => {
            open_core(&settings, clock).await?;
            let database = match settings.store_choice()? {
                StoreChoice::Sqlite(path) => path.display().to_string(),
                StoreChoice::Postgres(_) => "PostgreSQL".to_owned(),
            };
            print(
                cli.json,
                json!({"database": database, "migrated": true}),
                format!("database {database} is up to date"),
            );
            Ok(())
        }
        Command::Tenant(TenantCommand::Create { name }) => {
            let core = open_core(&settings, clock).await?;
            let tenant = core.create_tenant(&name).await?;
            print(
                cli.json,
                json!({"id": tenant.id.as_str(), "name": tenant.name}),
                format!("tenant {} created: {}", tenant.name, tenant.id),
            );
            Ok(())
        }
        Command::User(UserCommand::Create {
            username,
            password_stdin,
            email,
            phone,
            role,
            tenant,
        }) => {
            if !password_stdin {
                return Err(CoreError::invalid(
                    "password",
                    "pass it on standard input with --password-stdin (never as an argument)",
                )
                .into());
            }
            let password = read_password()?;
            let core = open_core(&settings, clock).await?;
            let tenant = tenant_of(&core, &tenant).await?;
            let role = Role::parse(&role)?;
            let user = core
                .create_user(
                    &tenant,
                    NewUser {
                        username,
                        password,
                        email,
                        phone,
                        role,
                    },
                    &cli_context(),
                )
                .await?;
            print(
                cli.json,
                json!({
                    "id": user.id.as_str(),
                    "tenant_id": tenant.as_str(),
                    "username": user.username.as_str(),
                    "email": user.email.as_ref().map(|e| e.as_str()),
                    "phone": user.phone.as_ref().map(|p| p.as_str()),
                    "role": user.role.as_str(),
                }),
                format!("user {} created: {}", user.username.as_str(), user.id),
            );
            Ok(())
        }
        Command::User(UserCommand::Unlock { username, tenant }) => {
            let core = open_core(&settings, clock).await?;
            let tenant = tenant_of(&core, &tenant).await?;
            let user = core.unlock_user(&tenant, &username, &cli_context()).await?;
            print(
                cli.json,
                json!({"id": user.id.as_str(), "username": user.username.as_str(), "unlocked": true}),
                format!("user {} unlocked", user.username.as_str()),
            );
            Ok(())
        }
        Command::Totp(TotpCommand::Enroll { username, tenant }) => {
            let core = open_core(&settings, clock).await?;
            let tenant = tenant_of(&core, &tenant).await?;
            let user = core.user_by_username(&tenant, &username).await?;
            let enrolment = core
                .enroll_totp(&tenant, &user.id, true, &cli_context())
                .await?;
            let uri = enrolment.uri.expose_secret();
            print(
                cli.json,
                json!({
                    "factor_id": enrolment.factor_id.as_str(),
                    "uri": uri,
                    "secret": enrolment.secret_base32.expose_secret(),
                    "active": enrolment.active,
                    "recovery_codes": enrolment.recovery_codes.iter().map(|c| c.expose_secret()).collect::<Vec<_>>(),
                }),
                format!(
                    "{}\n{uri}\n\nsecret (for manual entry): {}\nfactor {} is active.\n\
                     recovery codes (each works once; shown only now):\n{}",
                    qr_for_terminal(uri),
                    enrolment.secret_base32.expose_secret(),
                    enrolment.factor_id,
                    enrolment
                        .recovery_codes
                        .iter()
                        .map(|c| format!("  {}", c.expose_secret()))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            );
            Ok(())
        }
        Command::Tenant(TenantCommand::Configure {
            settings: json_text,
            tenant,
        }) => {
            let overrides: otpgate_core::policy::PolicyOverrides = serde_json::from_str(&json_text)
                .map_err(|e| CoreError::invalid("settings", e.to_string()))?;
            let core = open_core(&settings, clock).await?;
            let tenant = tenant_of(&core, &tenant).await?;
            let policy = core.set_tenant_settings(&tenant, overrides.clone()).await?;
            print(
                cli.json,
                json!({"tenant_id": tenant.as_str(), "settings": overrides}),
                format!(
                    "tenant {tenant}: codes of {} digits, sessions of {} s, product {:?}",
                    policy.code_length,
                    policy.session_ttl.as_secs(),
                    policy.product_name
                ),
            );
            Ok(())
        }
        Command::Tenant(TenantCommand::RotateJwtKey { tenant }) => {
            let core = open_core(&settings, clock).await?;
            let tenant = tenant_of(&core, &tenant).await?;
            let key = core.rotate_jwt_key(&tenant, &cli_context()).await?;
            print(
                cli.json,
                json!({"tenant_id": tenant.as_str(), "key_id": key.as_str()}),
                format!("tenant {tenant} now signs with key {key}"),
            );
            Ok(())
        }
        Command::Apikey(ApiKeyCommand::Revoke { id, tenant }) => {
            let core = open_core(&settings, clock).await?;
            let tenant = tenant_of(&core, &tenant).await?;
            core.revoke_api_key(&tenant, &id, &cli_context()).await?;
            print(
                cli.json,
                json!({"id": id, "revoked": true}),
                format!("API key {id} revoked"),
            );
            Ok(())
        }
        Command::Apikey(ApiKeyCommand::Create { name, tenant }) => {
            let core = open_core(&settings, clock).await?;
            let tenant = tenant_of(&core, &tenant).await?;
            let (key, secret) = core.create_api_key(&tenant, &name).await?;
            print(
                cli.json,
                json!({"id": key.id.as_str(), "tenant_id": tenant.as_str(), "name": key.name, "key": secret.expose_secret()}),
                format!(
                    "API key {} created for tenant {tenant}.\n{}\nIt is shown only this once.",
                    key.id,
                    secret.expose_secret()
                ),
            );
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("otpgate: {e}");
            ExitCode::FAILURE
        }
    }
}
