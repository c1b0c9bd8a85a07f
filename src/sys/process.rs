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
    let boot_time = std::fs::read_to_string("/proc/stat")?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok()))
        .ok_or_else(unexpected)?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let mut usage = parse_stat(&stat, ticks, page, boot_time)?;
    usage.open_fds = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    usage.max_fds = get(libc::RLIMIT_NOFILE)?.rlim_cur;
    Ok(usage)
}

fn unexpected() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/self/stat")
}

/// The fields of a `/proc/PID/stat` line (proc(5)), with the clock's ticks per second, the
/// page size and the boot time; descriptors are not there (left 0).
fn parse_stat(stat: &str, ticks: u64, page: u64, boot_time: u64) -> io::Result<Usage> {
    // The command name (field 2) may hold spaces and parentheses: fields resume after the
    // last ')'; `fields[0]` is field 3 (the state).
    let rest = stat.rsplit_once(')').ok_or_else(unexpected)?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> io::Result<u64> { fields.get(n - 3).and_then(|f| f.parse().ok()).ok_or_else(unexpected) };
    let ticks = ticks as f64;
    Ok(Usage {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        threads: field(20)?,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
        open_fds: 0,
        max_fds: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_past_a_command_name_with_spaces_and_parentheses() {
        // proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime
        // vsize rss ...
        let line = "4242 (shard (1) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 12345 602284032 7446 18446744073709551615";
        let u = parse_stat(line, 100, 4096, 1_796_000_000).unwrap();
        assert_eq!(u.cpu_seconds, 3.0, "(250 + 50) ticks at 100 a second");
        assert_eq!(u.threads, 9);
        assert_eq!(u.start_time_seconds, 1_796_000_000.0 + 123.45);
        assert_eq!(u.virtual_bytes, 602_284_032);
        assert_eq!(u.resident_bytes, 7446 * 4096);
        assert!(parse_stat("4242 (cut short) S 1", 100, 4096, 0).is_err());
        assert!(parse_stat("no parenthesis", 100, 4096, 0).is_err());
    }

    #[test]
    fn usage_reads_this_process() {
        // Other tests open and close descriptors meanwhile: only sane ranges are checked.
        let u = usage().unwrap();
        assert!(u.open_fds >= 3 && u.max_fds >= u.open_fds, "{u:?}");
        assert!(
            u.resident_bytes > 1 << 20 && u.virtual_bytes >= u.resident_bytes,
            "{u:?}"
        );
        assert!(u.threads >= 1 && u.cpu_seconds >= 0.0, "{u:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            u.start_time_seconds <= now + 1.0 && u.start_time_seconds > now - 86_400.0,
            "{u:?}"
        );
    }
}
