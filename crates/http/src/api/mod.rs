//! The API dialects, one module each.

pub mod v1;
