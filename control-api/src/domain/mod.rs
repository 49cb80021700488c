//! Pure domain logic: no axum, sqlx or AWS types. Unit-tested without I/O.

pub mod access;
pub mod policy;
pub mod session;
pub mod verify;
