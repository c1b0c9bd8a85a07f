//! Configuration: command-line flags over an optional TOML file over defaults.
//!
//! Every `serve` flag has the same name (kebab-case) as a key in the file, so
//! `--max-message-size 1048576` and `max-message-size = 1048576` mean the same thing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(
    name = "shardgate",
    version,
    about = "A WebSocket chat gateway: io_uring, one pinned shard per core"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size of the `serve` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Mint a token for a user, with the secret `serve` uses.
    Token(TokenArgs),
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user id (1-64 of A-Z a-z 0-9 _ . @ -).
    pub user: String,
    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// File holding the HMAC secret (else SHARDGATE_AUTH_SECRET, else the data directory's).
    #[arg(long, value_name = "FILE")]
    pub auth_secret_file: Option<PathBuf>,
    /// Where `serve` keeps its generated secret [default: ~/.local/share/shardgate].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// The `serve` flags; the same keys may come from the TOML file given with `--config`.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeArgs {
    /// TOML file with any of the keys below; flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address every shard listens on (SO_REUSEPORT) [default: 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Number of shards (executors), one pinned per core [default: one per core].
    #[arg(long)]
    pub shards: Option<usize>,
    /// CPUs the shards are pinned to, in order (shard i on the i-th, round robin) [default: every core].
    #[arg(long, value_delimiter = ',')]
    pub cpus: Option<Vec<usize>>,
    /// Listen backlog per shard (capped by net.core.somaxconn) [default: 4096].
    #[arg(long)]
    pub backlog: Option<u32>,
    /// Connections this process accepts before answering 503 [default: open-file limit less a reserve].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Largest message in bytes, over all its fragments; larger closes with 1009 [default: 16777216].
    #[arg(long)]
    pub max_message_size: Option<usize>,
    /// Largest HTTP request head in bytes; larger is refused with 431 [default: 8192].
    #[arg(long)]
    pub max_request_head: Option<usize>,
    /// Time a client has to complete the HTTP upgrade [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Option<Duration>,
    /// Silence after which the server pings [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub ping_interval: Option<Duration>,
    /// Time a ping has to be answered before the connection is closed [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Option<Duration>,
    /// On SIGINT/SIGTERM, how long clients get to answer Close 1001 before the process exits [default: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    /// Turn the /echo endpoint off.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub no_echo: Option<bool>,
    /// A subprotocol the server speaks, in order of preference (repeatable).
    #[arg(long = "subprotocol", value_name = "NAME")]
    pub subprotocols: Option<Vec<String>>,
    /// Bytes of io_uring buffer memory each shard pins (counts against RLIMIT_MEMLOCK for non-root) [default: 1048576].
    #[arg(long)]
    pub io_memory: Option<usize>,
    /// Busy-poll this long before a shard parks: lower latency, more idle CPU [default: off].
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub spin_before_park: Option<Duration>,
    /// io_uring submission queue depth per ring; deeper rings get the kernel's largest poll-cancel table [default: 4096].
    #[arg(long)]
    pub ring_depth: Option<usize>,
    /// File holding the HMAC secret for tokens [default: SHARDGATE_AUTH_SECRET, else a secret created in the data directory].
    #[arg(long, value_name = "FILE")]
    pub auth_secret_file: Option<PathBuf>,
    /// Where a generated secret is kept [default: ~/.local/share/shardgate].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// DEMOS AND BENCHMARKS ONLY: accept `?user=<id>` on /ws without a token.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub insecure_dev_auth: Option<bool>,
    /// An Origin allowed to open /ws from a browser (repeatable) [default: any].
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Option<Vec<String>>,
    /// Bytes a chat connection may have queued for sending; past it, it is closed with 1008 [default: 1048576].
    #[arg(long)]
    pub max_outbound_bytes: Option<usize>,
    /// Largest chat frame in bytes; larger gets a `too_large` error [default: 65536].
    #[arg(long)]
    pub max_chat_message: Option<usize>,
    /// Chat messages per second per connection, 0 for no limit [default: 100].
    #[arg(long)]
    pub rate_limit: Option<f64>,
    /// Burst allowed above --rate-limit [default: 200].
    #[arg(long)]
    pub rate_burst: Option<u32>,
    /// How often the latency report line is printed [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub report_interval: Option<Duration>,
    /// The end-to-end latency objective the report measures against [default: 200ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub slo: Option<Duration>,
    /// Also write the whole run's latency distribution to this file at shutdown.
    #[arg(long, value_name = "FILE")]
    pub histogram_out: Option<PathBuf>,
    /// Each shard also listens on a port of its own (printed at start), to reach a chosen shard.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub shard_ports: Option<bool>,
    /// Hand each new connection to the shard on the CPU that received its SYN, instead of
    /// the kernel's hash. For hosts whose NIC spreads flows over every shard's CPU (RSS, one
    /// queue per core); needs one CPU per shard (see kernel-tuning.md).
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub steer_by_cpu: Option<bool>,
    /// Join a cluster of gateways through this NATS server (e.g. nats://127.0.0.1:4222).
    /// Without it the gateway is a single node with no dependency.
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// Subject prefix of the cluster: nodes with the same prefix form one [default: shardgate].
    #[arg(long)]
    pub nats_prefix: Option<String>,
    /// A node not heard from for this long is forgotten with its users [default: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub presence_timeout: Option<Duration>,
    /// A cross-node send not confirmed within this is answered `unavailable` [default: 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub cluster_ack_timeout: Option<Duration>,
    /// Pin the NATS thread to this CPU [default: unpinned, so it never competes with one
    /// shard alone for a core].
    #[arg(long)]
    pub cluster_cpu: Option<usize>,
}

impl ServeArgs {
    /// Fills every flag that was not given from `file`.
    fn or(self, file: ServeArgs) -> ServeArgs {
        ServeArgs {
            config: self.config,
            listen: self.listen.or(file.listen),
            shards: self.shards.or(file.shards),
            cpus: self.cpus.or(file.cpus),
            backlog: self.backlog.or(file.backlog),
            max_connections: self.max_connections.or(file.max_connections),
            max_message_size: self.max_message_size.or(file.max_message_size),
            max_request_head: self.max_request_head.or(file.max_request_head),
            handshake_timeout: self.handshake_timeout.or(file.handshake_timeout),
            ping_interval: self.ping_interval.or(file.ping_interval),
            pong_timeout: self.pong_timeout.or(file.pong_timeout),
            drain_timeout: self.drain_timeout.or(file.drain_timeout),
            no_echo: self.no_echo.or(file.no_echo),
            subprotocols: self.subprotocols.or(file.subprotocols),
            io_memory: self.io_memory.or(file.io_memory),
            spin_before_park: self.spin_before_park.or(file.spin_before_park),
            ring_depth: self.ring_depth.or(file.ring_depth),
            auth_secret_file: self.auth_secret_file.or(file.auth_secret_file),
            data_dir: self.data_dir.or(file.data_dir),
            insecure_dev_auth: self.insecure_dev_auth.or(file.insecure_dev_auth),
            allowed_origins: self.allowed_origins.or(file.allowed_origins),
            max_outbound_bytes: self.max_outbound_bytes.or(file.max_outbound_bytes),
            max_chat_message: self.max_chat_message.or(file.max_chat_message),
            rate_limit: self.rate_limit.or(file.rate_limit),
            rate_burst: self.rate_burst.or(file.rate_burst),
            report_interval: self.report_interval.or(file.report_interval),
            slo: self.slo.or(file.slo),
            histogram_out: self.histogram_out.or(file.histogram_out),
            shard_ports: self.shard_ports.or(file.shard_ports),
            steer_by_cpu: self.steer_by_cpu.or(file.steer_by_cpu),
            nats: self.nats.or(file.nats),
            nats_prefix: self.nats_prefix.or(file.nats_prefix),
            presence_timeout: self.presence_timeout.or(file.presence_timeout),
            cluster_ack_timeout: self.cluster_ack_timeout.or(file.cluster_ack_timeout),
            cluster_cpu: self.cluster_cpu.or(file.cluster_cpu),
        }
    }
}

/// The resolved configuration every shard runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub shards: usize,
    /// `None`: every core, as `core_affinity` lists them.
    pub cpus: Option<Vec<usize>>,
    pub backlog: u32,
    /// `None`: derived from the open-file limit at start.
    pub max_connections: Option<usize>,
    pub max_message_size: usize,
    pub max_request_head: usize,
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub drain_timeout: Duration,
    pub echo: bool,
    pub subprotocols: Vec<String>,
    pub io_memory: usize,
    pub spin_before_park: Option<Duration>,
    pub ring_depth: usize,
    pub auth_secret_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub insecure_dev_auth: bool,
    pub allowed_origins: Vec<String>,
    pub max_outbound_bytes: usize,
    pub max_chat_message: usize,
    pub rate_limit: f64,
    pub rate_burst: u32,
    pub report_interval: Duration,
    pub slo: Duration,
    pub histogram_out: Option<PathBuf>,
    pub shard_ports: bool,
    pub steer_by_cpu: bool,
    /// `Some` when the node joins a cluster.
    pub nats: Option<String>,
    pub nats_prefix: String,
    pub presence_timeout: Duration,
    pub cluster_ack_timeout: Duration,
    pub cluster_cpu: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: core_affinity::get_core_ids().map_or(1, |c| c.len().max(1)),
            cpus: None,
            backlog: 4096,
            max_connections: None,
            max_message_size: 16 << 20,
            max_request_head: 8 << 10,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            echo: true,
            subprotocols: Vec::new(),
            io_memory: 1 << 20,
            spin_before_park: None,
            // The kernel sizes a ring's poll-cancel hash from its CQ size: 4096 gives the
            // maximum of 256 buckets (the default 128 gives 8, and every cancel then scans
            // thousands of armed polls at 16k connections per shard).
            ring_depth: 4096,
            auth_secret_file: None,
            data_dir: crate::chat::auth::default_data_dir(),
            insecure_dev_auth: false,
            allowed_origins: Vec::new(),
            max_outbound_bytes: 1 << 20,
            max_chat_message: 64 << 10,
            rate_limit: 100.0,
            rate_burst: 200,
            report_interval: Duration::from_secs(10),
            slo: Duration::from_millis(200),
            histogram_out: None,
            shard_ports: false,
            steer_by_cpu: false,
            nats: None,
            nats_prefix: "shardgate".into(),
            presence_timeout: Duration::from_secs(5),
            cluster_ack_timeout: Duration::from_secs(2),
            cluster_cpu: None,
        }
    }
}

impl Config {
    /// Resolves flags over the file named by `--config` (if any) over the defaults.
    pub fn from_args(args: ServeArgs) -> Result<Config, String> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                toml::from_str::<ServeArgs>(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => ServeArgs::default(),
        };
        let a = args.or(file);
        let d = Config::default();
        let config = Config {
            listen: a.listen.unwrap_or(d.listen),
            shards: a.shards.unwrap_or(d.shards),
            cpus: a.cpus.filter(|c| !c.is_empty()),
            backlog: a.backlog.unwrap_or(d.backlog),
            max_connections: a.max_connections,
            max_message_size: a.max_message_size.unwrap_or(d.max_message_size),
            max_request_head: a.max_request_head.unwrap_or(d.max_request_head),
            handshake_timeout: a.handshake_timeout.unwrap_or(d.handshake_timeout),
            ping_interval: a.ping_interval.unwrap_or(d.ping_interval),
            pong_timeout: a.pong_timeout.unwrap_or(d.pong_timeout),
            drain_timeout: a.drain_timeout.unwrap_or(d.drain_timeout),
            echo: !a.no_echo.unwrap_or(false),
            subprotocols: a.subprotocols.unwrap_or_default(),
            io_memory: a.io_memory.unwrap_or(d.io_memory),
            spin_before_park: a.spin_before_park,
            ring_depth: a.ring_depth.unwrap_or(d.ring_depth),
            auth_secret_file: a.auth_secret_file,
            data_dir: a.data_dir.unwrap_or(d.data_dir),
            insecure_dev_auth: a.insecure_dev_auth.unwrap_or(false),
            allowed_origins: a.allowed_origins.unwrap_or_default(),
            max_outbound_bytes: a.max_outbound_bytes.unwrap_or(d.max_outbound_bytes),
            max_chat_message: a.max_chat_message.unwrap_or(d.max_chat_message),
            rate_limit: a.rate_limit.unwrap_or(d.rate_limit),
            rate_burst: a.rate_burst.unwrap_or(d.rate_burst),
            report_interval: a.report_interval.unwrap_or(d.report_interval),
            slo: a.slo.unwrap_or(d.slo),
            histogram_out: a.histogram_out,
            shard_ports: a.shard_ports.unwrap_or(false),
            steer_by_cpu: a.steer_by_cpu.unwrap_or(false),
            nats: a.nats.filter(|u| !u.is_empty()),
            nats_prefix: a.nats_prefix.unwrap_or(d.nats_prefix),
            presence_timeout: a.presence_timeout.unwrap_or(d.presence_timeout),
            cluster_ack_timeout: a.cluster_ack_timeout.unwrap_or(d.cluster_ack_timeout),
            cluster_cpu: a.cluster_cpu,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.shards > crate::route::MAX_SHARDS {
            return Err(format!(
                "at most {} shards per process (run more processes for more cores)",
                crate::route::MAX_SHARDS
            ));
        }
        if !(self.rate_limit >= 0.0 && self.rate_limit.is_finite()) {
            return Err("rate-limit must be a number of messages per second, 0 for none".into());
        }
        let positive = [
            ("max-outbound-bytes", self.max_outbound_bytes),
            ("max-chat-message", self.max_chat_message),
            ("shards", self.shards),
            ("max-message-size", self.max_message_size),
            ("max-request-head", self.max_request_head),
            ("backlog", self.backlog as usize),
            ("ring-depth", self.ring_depth),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        for (name, d) in [
            ("handshake-timeout", self.handshake_timeout),
            ("ping-interval", self.ping_interval),
            ("pong-timeout", self.pong_timeout),
            ("report-interval", self.report_interval),
            ("slo", self.slo),
            ("presence-timeout", self.presence_timeout),
            ("cluster-ack-timeout", self.cluster_ack_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be longer than zero"));
            }
        }
        let prefix_ok = !self.nats_prefix.is_empty()
            && self
                .nats_prefix
                .split('.')
                .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        if !prefix_ok {
            return Err("nats-prefix must be dot-separated tokens of A-Z a-z 0-9 _ -".into());
        }
        if self.presence_timeout < Duration::from_secs(2) {
            return Err("presence-timeout must be at least 2s (nodes send a heartbeat every second)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("shardgate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:9000\"\nshards = 3\nping-interval = \"45s\"\nsubprotocols = [\"chat\"]\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "shardgate",
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--shards",
            "2",
            "--no-echo",
        ]);
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let c = Config::from_args(args).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.shards, 2);
        assert_eq!(c.ping_interval, Duration::from_secs(45));
        assert_eq!(c.subprotocols, vec!["chat".to_string()]);
        assert!(!c.echo);
        assert_eq!(c.max_message_size, 16 << 20);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_keys_and_zero_values_are_refused() {
        let dir = std::env::temp_dir().join(format!("shardgate-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "listn = \"0.0.0.0:9000\"\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        assert!(Config::from_args(args).unwrap_err().contains("listn"));
        let args = ServeArgs {
            shards: Some(0),
            ..Default::default()
        };
        assert!(Config::from_args(args).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
