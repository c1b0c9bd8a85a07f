//! What a gateway process settles before its shards start: how many connections fit,
//! which CPUs the shards run on, their listening sockets, and the checks that turn a
//! host that cannot run io_uring into a clear message.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::Socket;

use super::listener;
use crate::chat::auth::{AuthError, Authenticator, SecretSource};
use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::sys::process;
use crate::tls::Certificates;

/// Why the gateway could not start, or stopped with shards that failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read RLIMIT_{what}: {source}")]
    Rlimit { what: &'static str, source: io::Error },
    #[error(
        "RLIMIT_MEMLOCK is {have_kib} KiB, but io_uring (glommio) needs at least {need_kib} KiB per process plus --io-memory per shard.\n\
         Raise it: `ulimit -l unlimited` in the shell, LimitMEMLOCK=infinity in a systemd unit, or memlock in /etc/security/limits.conf (see kernel-tuning.md)."
    )]
    MemlockTooLow { have_kib: u64, need_kib: u64 },
    #[error("--cpus names CPU {bad}, which this process may not run on (it may use {online:?})")]
    CpuNotAllowed { bad: usize, online: Vec<usize> },
    #[error("cannot list the CPU cores")]
    NoCores,
    #[error("--steer-by-cpu needs a CPU of its own for each shard; {shards} shards share {cpus:?}")]
    SteerNeedsOwnCpus { shards: usize, cpus: Vec<usize> },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot steer connections by CPU on {addr}: {source}")]
    Steer { addr: SocketAddr, source: io::Error },
    #[error("cannot bind a shard port: {0}")]
    ShardPort(io::Error),
    #[error("cannot start the {what} thread: {source}")]
    Thread { what: &'static str, source: io::Error },
    #[error("cannot watch signals: {0}")]
    Signals(io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("--listen-tls needs --tls-cert and --tls-key (and they need --listen-tls)")]
    TlsIncomplete,
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("cannot draw a node id: {0}")]
    NodeId(getrandom::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::access::AccessError),
    #[error(transparent)]
    Store(#[from] crate::store::embedded::OpenError),
    #[error(transparent)]
    RedisStore(#[from] crate::store::redis::OpenError),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    /// Shards that could not start or ended with an error, each explained.
    #[error("{}", .0.join("\n"))]
    Shards(Vec<String>),
}

/// glommio refuses to start a reactor below this RLIMIT_MEMLOCK.
pub const GLOMMIO_MIN_MEMLOCK: u64 = 512 * 1024;
/// Descriptors kept free for listeners, io_uring rings, eventfds and the like.
const FD_RESERVE_BASE: u64 = 32;
const FD_RESERVE_PER_SHARD: u64 = 8;

/// Connections that fit under an open-file limit, leaving a reserve for the process.
pub fn connections_for_nofile(nofile: u64, shards: usize) -> usize {
    nofile.saturating_sub(FD_RESERVE_BASE + FD_RESERVE_PER_SHARD * shards as u64) as usize
}

/// Where the shards run and how many connections the process takes.
pub struct Plan {
    pub nofile: u64,
    /// Connections the open-file limit leaves room for.
    pub fd_room: usize,
    pub max_connections: usize,
    /// The CPU of each shard.
    pub shard_cpus: Vec<usize>,
}

impl Plan {
    pub fn new(config: &Config) -> Result<Plan, StartError> {
        let nofile = process::raise_nofile().map_err(|source| StartError::Rlimit { what: "NOFILE", source })?;
        let fd_room = connections_for_nofile(nofile, config.shards);
        check_memlock(config)?;
        let cores = shard_cores(config)?;
        let shard_cpus: Vec<usize> = (0..config.shards).map(|id| cores[id % cores.len()]).collect();
        if config.steer_by_cpu && config.shards > 1 {
            // Two shards on one CPU: the second would never be chosen.
            let distinct: std::collections::HashSet<_> = shard_cpus.iter().collect();
            if distinct.len() < config.shards {
                return Err(StartError::SteerNeedsOwnCpus {
                    shards: config.shards,
                    cpus: shard_cpus,
                });
            }
        }
        Ok(Plan {
            nofile,
            fd_room,
            max_connections: config.max_connections.unwrap_or(fd_room),
            shard_cpus,
        })
    }
}

/// The cores the shards are pinned to, in order.
fn shard_cores(config: &Config) -> Result<Vec<usize>, StartError> {
    let online: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    match &config.cpus {
        Some(cpus) => {
            if let Some(&bad) = cpus.iter().find(|c| !online.contains(c)) {
                return Err(StartError::CpuNotAllowed { bad, online });
            }
            Ok(cpus.clone())
        }
        None if online.is_empty() => Err(StartError::NoCores),
        None => Ok(online),
    }
}

/// Every shard's listening sockets.
pub struct Listeners {
    /// One per shard on the shared address (`SO_REUSEPORT`).
    pub shared: Vec<Socket>,
    pub bound: SocketAddr,
    /// With `--shard-ports`, a port of its own for each shard.
    pub own: Vec<Option<(Socket, SocketAddr)>>,
    /// With `--listen-tls`, one per shard on that address, and where it is bound.
    pub tls: Vec<Socket>,
    pub tls_bound: Option<SocketAddr>,
}

pub fn bind(config: &Config, plan: &Plan) -> Result<Listeners, StartError> {
    let (shards, addr) = (config.shards, config.listen);
    let (shared, bound) =
        listener::bind_listeners(addr, shards, config.backlog).map_err(|source| StartError::Listen { addr, source })?;
    if config.steer_by_cpu && shards > 1 {
        listener::steer_by_cpu(&shared[0], &plan.shard_cpus).map_err(|source| StartError::Steer { addr, source })?;
    }
    let mut own = Vec::with_capacity(shards);
    for _ in 0..shards {
        own.push(if config.shard_ports {
            let (mut socket, addr) = listener::bind_listeners(SocketAddr::new(bound.ip(), 0), 1, config.backlog)
                .map_err(StartError::ShardPort)?;
            Some((socket.remove(0), addr))
        } else {
            None
        });
    }
    let (tls, tls_bound) = match config.listen_tls {
        Some(addr) => {
            let (sockets, bound) = listener::bind_listeners(addr, shards, config.backlog)
                .map_err(|source| StartError::Listen { addr, source })?;
            (sockets, Some(bound))
        }
        None => (Vec::new(), None),
    };
    Ok(Listeners {
        shared,
        bound,
        own,
        tls,
        tls_bound,
    })
}

/// The start lines: what runs where, and how a user gets a token.
pub fn announce(config: &Config, plan: &Plan, bound: SocketAddr, auth: &Authenticator) {
    tracing::info!(
        "shardgate {}: {} shard(s) on {bound}; max connections {} (RLIMIT_NOFILE {} allows {})",
        env!("CARGO_PKG_VERSION"),
        config.shards,
        plan.max_connections,
        plan.nofile,
        plan.fd_room
    );
    if config.steer_by_cpu && config.shards > 1 {
        tracing::info!("new connections go to the shard on the CPU that received their SYN (--steer-by-cpu)");
    }
    if plan.max_connections > plan.fd_room {
        tracing::warn!(
            "--max-connections {} is above what the open-file limit allows ({}); accepts will back off at the limit",
            plan.max_connections,
            plan.fd_room
        );
    }
    match &auth.source {
        SecretSource::File(path) => tracing::info!("auth: HS256 tokens, secret from {}", path.display()),
        SecretSource::Env => tracing::info!("auth: HS256 tokens, secret from ${}", crate::chat::auth::SECRET_ENV),
        SecretSource::DataDir { path, created } => tracing::info!(
            "auth: HS256 tokens, secret {} {} (mode 0600); mint a token with: shardgate token <user> --data-dir {}",
            if *created { "created at" } else { "from" },
            path.display(),
            config.data_dir.display()
        ),
    }
    if config.insecure_dev_auth {
        tracing::warn!("--insecure-dev-auth is on: anyone can connect to /ws as any user with ?user=<id>. For demos and benchmarks only.");
    }
}

fn check_memlock(config: &Config) -> Result<(), StartError> {
    let memlock = process::raise_memlock().map_err(|source| StartError::Rlimit {
        what: "MEMLOCK",
        source,
    })?;
    if memlock < GLOMMIO_MIN_MEMLOCK {
        return Err(StartError::MemlockTooLow {
            have_kib: memlock / 1024,
            need_kib: GLOMMIO_MIN_MEMLOCK / 1024,
        });
    }
    let wanted = config.io_memory as u64 * config.shards as u64;
    if !process::is_root() && memlock < wanted + GLOMMIO_MIN_MEMLOCK {
        tracing::warn!(
            "RLIMIT_MEMLOCK is {} KiB, less than --io-memory × shards ({} KiB); io_uring buffers may fail to register (lower --io-memory or raise the limit)",
            memlock / 1024,
            wanted / 1024
        );
    }
    Ok(())
}

pub fn explain_start_error(shard: usize, error: &str) -> String {
    if error.contains("MemLock") {
        format!("shard {shard} could not start io_uring: {error}: RLIMIT_MEMLOCK is too low (glommio needs at least 512 KiB per executor); raise it with `ulimit -l` or LimitMEMLOCK= (see kernel-tuning.md)")
    } else {
        format!("shard {shard} failed: {error}")
    }
}

/// What a TLS listener needs: the certificate (reloadable) and the handshakes'
/// configuration built on it.
pub type TlsSetup = (Arc<Certificates>, Arc<rustls::ServerConfig>);

/// The TLS certificate and the handshakes' configuration, with `--listen-tls`.
pub fn tls(config: &Config) -> Result<Option<TlsSetup>, StartError> {
    match (&config.listen_tls, &config.tls_cert, &config.tls_key) {
        (None, None, None) => Ok(None),
        (Some(_), Some(cert), Some(key)) => {
            let certificates = Arc::new(Certificates::load(cert, key)?);
            let server = crate::tls::server_config(certificates.clone())?;
            Ok(Some((certificates, server)))
        }
        _ => Err(StartError::TlsIncomplete),
    }
}

/// How often the TLS certificate's files are looked at for a change.
const TLS_WATCH_EVERY: Duration = Duration::from_secs(2);

/// Reads the TLS certificate again on a change of its files (a renewal), as SIGHUP does.
pub fn watch_tls_files(certificates: &Arc<Certificates>) -> Result<(), StartError> {
    certificates
        .clone()
        .watch(TLS_WATCH_EVERY, |certificates, result| {
            say_reloaded("files changed", certificates, result)
        })
        .map_err(|source| StartError::Thread {
            what: "TLS file watch",
            source,
        })
}

/// The log line of a reload.
fn say_reloaded(why: &str, certificates: &Certificates, result: Result<(), crate::tls::TlsError>) {
    match result {
        Ok(()) => tracing::info!(
            "{why}: TLS certificate {} loaded; new handshakes use it",
            certificates.cert_path().display()
        ),
        Err(e) => tracing::error!("{why}: {e}; the certificate loaded before stays in use"),
    }
}

/// SIGINT/SIGTERM start a graceful stop; a second one ends the process at once. SIGHUP
/// reads the TLS certificate and key again (new handshakes get them; a bad pair is
/// refused and the old one kept).
pub fn spawn_signal_thread(stop: Arc<Shutdown>, tls: Option<Arc<Certificates>>) -> Result<(), StartError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(StartError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    match &tls {
                        Some(certificates) => say_reloaded("SIGHUP", certificates, certificates.reload()),
                        None => tracing::info!("SIGHUP: nothing to reload (no --listen-tls)"),
                    }
                    continue;
                }
                if stop.is_requested() {
                    tracing::warn!("second signal {signal}: exiting without draining");
                    std::process::exit(130);
                }
                tracing::info!("signal {signal}: closing every connection with 1001 (going away)");
                stop.trigger();
            }
        })
        .map_err(|source| StartError::Thread { what: "signal", source })?;
    Ok(())
}
