//! Listening sockets: one per shard on the same address, so the kernel spreads new
//! connections across shards (SO_REUSEPORT) and each shard accepts only its own.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use crate::sys::socket;

/// How long the kernel holds a new connection back until its first bytes arrive
/// (`TCP_DEFER_ACCEPT`, whole seconds; a silent connection is handed over after that).
const DEFER_ACCEPT_SECS: libc::c_int = 1;

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
    defer_accept(&socket)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket)
}

/// A client always speaks first (the upgrade request), so a connection is worth a wake-up
/// only once its request is in: accept then finds the request already readable, with no
/// wake-up for the bare handshake and no empty read. (Upgrade + one echo + close cost the
/// shard 12% less CPU: docs/perf/11-defer-accept.md.) Connections that never speak (port
/// scans, load balancers' TCP health checks) take no descriptor or connection slot.
fn defer_accept(socket: &Socket) -> io::Result<()> {
    socket::set_defer_accept(socket, DEFER_ACCEPT_SECS)
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

/// The classic BPF program that picks, for a new connection, the listener whose shard
/// runs on the CPU that received the SYN: listener `i` for a SYN taken on `cpus[i]`. A SYN
/// taken on any other CPU gets an index past the group, and the kernel falls back to its
/// hash.
pub fn cpu_steering_program(cpus: &[usize]) -> Vec<libc::sock_filter> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let mut program = vec![op(
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        0,
        0,
        (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
    )];
    for (index, &cpu) in cpus.iter().enumerate() {
        // Equal: fall through to "return index"; else skip it.
        program.push(op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, cpu as u32));
        program.push(op(libc::BPF_RET | libc::BPF_K, 0, 0, index as u32));
    }
    program.push(op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX));
    program
}

/// Steers each new connection to the shard on the CPU that received its SYN (see
/// `cpu_steering_program`; `cpus[i]` is the CPU of the shard that owns listener `i`, in the
/// order the listeners joined the port). Where the NIC spreads flows over CPUs (RSS), a
/// connection's packets are then handled on the core that runs its shard; on loopback, a
/// client thread's connections land on the shard that shares its CPU. The program belongs
/// to the port's whole SO_REUSEPORT group, so it is attached once.
pub fn steer_by_cpu(listener: &Socket, cpus: &[usize]) -> io::Result<()> {
    socket::attach_reuseport_program(listener, &cpu_steering_program(cpus))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;

    /// Connects `count` times from a thread pinned to `cpu`; returns the clients (kept
    /// open so that their connections stay queued).
    fn connect_from(cpu: usize, addr: SocketAddr, count: usize) -> Vec<TcpStream> {
        std::thread::spawn(move || {
            assert!(core_affinity::set_for_current(core_affinity::CoreId { id: cpu }));
            (0..count)
                .map(|_| {
                    let mut client = TcpStream::connect(addr).unwrap();
                    // A listener defers each connection until its first bytes.
                    client.write_all(b"x").unwrap();
                    client
                })
                .collect()
        })
        .join()
        .unwrap()
    }

    /// Accepts everything queued on `listener` (non-blocking).
    fn drain(listener: &Socket) -> usize {
        let mut n = 0;
        loop {
            match listener.accept() {
                Ok(_) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return n,
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    fn online_cpus() -> Vec<usize> {
        core_affinity::get_core_ids()
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect()
    }

    #[test]
    fn a_connection_goes_to_the_listener_of_the_cpu_that_sent_its_syn() {
        let cpus: Vec<usize> = online_cpus().into_iter().take(2).collect();
        let (listeners, addr) = bind_listeners("127.0.0.1:0".parse().unwrap(), 2, 64).unwrap();
        // Listener i belongs to the shard on cpus[i] (with one CPU, listener 1 has none).
        steer_by_cpu(&listeners[0], &cpus).unwrap();
        for (index, &cpu) in cpus.iter().enumerate() {
            // On loopback the SYN is handled on the connecting thread's CPU.
            let _clients = connect_from(cpu, addr, 8);
            assert_eq!(
                drain(&listeners[index]),
                8,
                "all 8 from cpu {cpu} go to listener {index}"
            );
            assert_eq!(drain(&listeners[1 - index]), 0);
        }
    }

    #[test]
    fn a_syn_on_a_cpu_without_a_shard_falls_back_to_the_hash() {
        let cpus = online_cpus();
        let (listeners, addr) = bind_listeners("127.0.0.1:0".parse().unwrap(), 2, 64).unwrap();
        // Name only a CPU that is not this one's: every SYN below is "elsewhere".
        let here = *cpus.last().unwrap();
        steer_by_cpu(&listeners[0], &[here + 1]).unwrap();
        let _clients = connect_from(here, addr, 32);
        let (a, b) = (drain(&listeners[0]), drain(&listeners[1]));
        assert_eq!(a + b, 32, "no connection is lost");
        // 32 distinct source ports hashed over 2 listeners: both get some, barring a
        // 1-in-2^31 draw.
        assert!(a > 0 && b > 0, "spread by the hash: {a} and {b}");
    }

    #[test]
    fn the_program_maps_each_cpu_to_its_listener_and_the_rest_past_the_group() {
        let program = cpu_steering_program(&[3, 7]);
        // load cpu; (jeq 3, ret 0); (jeq 7, ret 1); ret past-the-end.
        assert_eq!(program.len(), 6);
        assert_eq!(program[0].k, (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32);
        assert_eq!((program[1].k, program[1].jt, program[1].jf), (3, 0, 1));
        assert_eq!(program[2].k, 0);
        assert_eq!((program[3].k, program[4].k), (7, 1));
        assert_eq!(program[5].k, u32::MAX);
    }
}
