//! The chat application: who a connection is (`auth`) and what it says (`protocol`).

pub mod auth;
pub mod protocol;
