//! otpgate's domain core: every rule of accounts, one-time codes, TOTP factors, login tickets,
//! session tokens, lock-out, the outbox and audit events. It knows no HTTP, JSON envelope or SQL;
//! it reaches the world through the [`store::Store`] trait, a [`clock::Clock`] and a
//! [`outbox::MessageSender`]. Dialects call [`service::Otpgate`] and render its typed results.

pub mod clock;
pub mod code;
pub mod crypto;
pub mod error;
pub mod identity;
pub mod jwt;
pub mod message;
pub mod model;
pub mod otp;
pub mod outbox;
pub mod password;
pub mod policy;
pub mod service;
pub mod store;
pub mod sweeper;
pub mod token;

pub use error::{CoreError, StoreError};
pub use service::Otpgate;
