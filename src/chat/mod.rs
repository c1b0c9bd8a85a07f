//! The chat application, apart from sockets: who a connection is (`auth`), what it says
//! (`protocol`), what becomes of it (`session`), and a shard's share of the routing
//! (`hub`). It writes through the small interface of `output`, which the shard's
//! outgoing path implements.

pub mod auth;
pub(crate) mod hub;
pub(crate) mod output;
pub mod protocol;
pub(crate) mod session;
