//! The WebSocket protocol (RFC 6455), sans IO: nothing here touches a socket.
//!
//! - `handshake`: the HTTP upgrade, request head in, decision and response out.
//! - `frame`: frame headers, encoding.
//! - `decoder`: bytes in, events out (messages, pings, close).
//! - `deflate`: permessage-deflate (RFC 7692): the offer, and messages deflated and inflated.
//! - `mask`, `utf8`, `close`: the pieces the decoder is built from.

pub mod close;
pub mod decoder;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod utf8;

pub use close::CloseCode;
pub use decoder::{Decoder, Event, ProtocolError, Role};
pub use frame::{write_close, write_frame, OpCode};
