//! The API dialects, one module each.

pub mod acl;
pub mod digipay;
pub mod v1;
pub mod verify_login;
