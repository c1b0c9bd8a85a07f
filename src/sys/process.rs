//! Process limits and scheduling.

use std::io;

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

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The calling thread's Linux thread id.
pub fn thread_id() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The CPU the calling thread runs on now.
pub fn current_cpu() -> i32 {
    // SAFETY: sched_getcpu has no preconditions.
    unsafe { libc::sched_getcpu() }
}

/// Lets whatever else waits for this CPU run first.
pub fn yield_cpu() {
    // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
    unsafe { libc::sched_yield() };
}

/// What Prometheus' standard `process_*` metrics report, read from procfs (a file read:
/// never on a shard; the reporter thread reads it).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    /// Since the Unix epoch.
    pub start_time_seconds: f64,
}

/// This process's usage now.
pub fn usage() -> io::Result<Usage> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/self/stat");
    // The command name (field 2) may hold spaces and parentheses: fields resume after the
    // last ')'; `fields[0]` is field 3 (the state).
    let rest = stat.rsplit_once(')').ok_or_else(bad)?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> io::Result<u64> { fields.get(n - 3).and_then(|f| f.parse().ok()).ok_or_else(bad) };
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let boot_time = std::fs::read_to_string("/proc/stat")?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok()))
        .ok_or_else(bad)?;
    Ok(Usage {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        threads: field(20)?,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
        open_fds: std::fs::read_dir("/proc/self/fd")?.count() as u64,
        max_fds: get(libc::RLIMIT_NOFILE)?.rlim_cur,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_reads_this_process() {
        let before = super::usage().unwrap();
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let with_one_more = super::usage().unwrap();
        drop(f);
        assert_eq!(with_one_more.open_fds, before.open_fds + 1);
        assert!(before.resident_bytes > 1 << 20 && before.virtual_bytes >= before.resident_bytes);
        assert!(before.threads >= 1 && before.max_fds >= before.open_fds);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(before.start_time_seconds <= now + 1.0 && before.start_time_seconds > now - 86_400.0);
    }
}
