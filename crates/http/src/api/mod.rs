//! The API dialects, one module each.

pub mod acl;
pub mod v1;
pub mod verify_login;
