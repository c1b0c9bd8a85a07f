//! Process limits that decide how many connections fit and whether io_uring can start.

use std::io;

/// glommio refuses to start a reactor below this RLIMIT_MEMLOCK.
pub const GLOMMIO_MIN_MEMLOCK: u64 = 512 * 1024;
/// Descriptors kept free for listeners, io_uring rings, eventfds and the like.
pub const FD_RESERVE_BASE: u64 = 32;
pub const FD_RESERVE_PER_SHARD: u64 = 8;

fn get(resource: libc::__rlimit_resource_t) -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// Raises the soft limit of `resource` to its hard limit; returns the new soft limit.
fn raise_to_hard(resource: libc::__rlimit_resource_t) -> io::Result<u64> {
    let mut lim = get(resource)?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// The open-file limit after raising the soft limit to the hard one.
pub fn raise_nofile() -> io::Result<u64> {
    raise_to_hard(libc::RLIMIT_NOFILE)
}

/// The RLIMIT_MEMLOCK after raising the soft limit to the hard one.
pub fn raise_memlock() -> io::Result<u64> {
    raise_to_hard(libc::RLIMIT_MEMLOCK)
}

/// Connections that fit under an open-file limit, leaving a reserve for the process.
pub fn connections_for_nofile(nofile: u64, shards: usize) -> usize {
    nofile.saturating_sub(FD_RESERVE_BASE + FD_RESERVE_PER_SHARD * shards as u64) as usize
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
