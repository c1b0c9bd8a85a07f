//! Listening sockets: one per shard on the same address, so the kernel spreads new
//! connections across shards (SO_REUSEPORT) and each shard accepts only its own.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

fn bind_one(addr: SocketAddr, backlog: u32) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY: frames leave when written, batching is ours.
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket)
}

/// Binds `count` listeners on `addr`. With port 0 the first one picks the port and the
/// rest join it. Returns the sockets and the address they share.
pub fn bind_listeners(addr: SocketAddr, count: usize, backlog: u32) -> io::Result<(Vec<Socket>, SocketAddr)> {
    let first = bind_one(addr, backlog)?;
    let bound = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))?;
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(bind_one(bound, backlog)?);
    }
    Ok((sockets, bound))
}
