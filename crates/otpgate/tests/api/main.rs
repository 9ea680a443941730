//! API tests: the real application on a random port, driven over HTTP.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod acl;
mod delivery;
mod digipay;
mod durability;
mod enumeration;
mod helpers;
mod lifecycle;
mod scale_out;
mod secrets;
mod secrets_rotation;
mod sms_pumping;
mod v1_bad_input;
mod v1_tenant;
mod v1_users;
mod v1_verifications;
mod verify_login;
