//! The core's one error type. Each variant means something to a caller and has a stable
//! [`CoreError::code`]; adapters map variants to their own envelopes and status codes.

use std::time::Duration;

/// What went wrong in a store: adapters convert their driver errors into this.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness constraint refused the write (the named thing already exists).
    #[error("{0} already exists")]
    Conflict(&'static str),
    /// The database cannot be reached or refused to work; retrying later may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Any other database fault.
    #[error("database error: {0}")]
    Other(String),
}

/// Errors of the core's operations.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A value from outside failed to parse (the field and why).
    #[error("{field}: {reason}")]
    InvalidInput {
        /// The field that was refused.
        field: &'static str,
        /// Why, in words fit to show a client.
        reason: String,
    },
    /// Unknown user, wrong password or locked account: deliberately indistinguishable.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// A missing, wrong, expired or revoked credential (API key, ticket, session token).
    #[error("unauthorized")]
    Unauthorized,
    /// A one-time code was wrong, expired or already used.
    #[error("code rejected")]
    CodeRejected {
        /// Checks left on the challenge, when it is still alive.
        attempts_left: Option<u32>,
    },
    /// No live code to check: it expired, was used or canceled, or was never sent.
    #[error("no live code")]
    CodeExpired,
    /// Too many requests: try again after the given time.
    #[error("rate limited; retry after {} s", retry_after.as_secs())]
    RateLimited {
        /// When the next attempt is allowed.
        retry_after: Duration,
    },
    /// The thing does not exist (or belongs to another tenant).
    #[error("not found")]
    NotFound,
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// A message could not be handed to its provider.
    #[error("delivery failed: {0}")]
    Delivery(String),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// The configured master key is not the one this database's secrets are sealed under.
    #[error("the master key does not open the secrets in this database")]
    WrongMasterKey,
    /// A bug or an environment fault (RNG, blocking pool).
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoreError {
    /// A stable machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            CoreError::InvalidInput { .. } => "invalid_input",
            CoreError::InvalidCredentials => "invalid_credentials",
            CoreError::Unauthorized => "unauthorized",
            CoreError::CodeRejected { .. } => "code_rejected",
            CoreError::CodeExpired => "code_expired",
            CoreError::RateLimited { .. } => "rate_limited",
            CoreError::NotFound => "not_found",
            CoreError::Conflict(_) => "conflict",
            CoreError::Delivery(_) => "delivery_failed",
            CoreError::Storage(StoreError::Conflict(_)) => "conflict",
            CoreError::Storage(StoreError::Unavailable(_)) => "unavailable",
            CoreError::Storage(StoreError::Other(_)) => "storage_error",
            CoreError::WrongMasterKey | CoreError::Internal(_) => "internal_error",
        }
    }

    /// Shorthand for an input error.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        CoreError::InvalidInput {
            field,
            reason: reason.into(),
        }
    }
}
