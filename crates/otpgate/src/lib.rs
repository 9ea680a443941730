//! The otpgate binary's library half: configuration, the [`app::Application`] that `serve` runs
//! (and the API tests build the same way), and telemetry.

pub mod app;
pub mod config;
pub mod delivery;
pub mod telemetry;
