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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
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
}

impl ServeArgs {
    /// Fills every flag that was not given from `file`.
    fn or(self, file: ServeArgs) -> ServeArgs {
        ServeArgs {
            config: self.config,
            listen: self.listen.or(file.listen),
            shards: self.shards.or(file.shards),
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
        }
    }
}

/// The resolved configuration every shard runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub shards: usize,
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: core_affinity::get_core_ids().map_or(1, |c| c.len().max(1)),
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
        }
    }
}

impl Config {
    /// Resolves flags over the file named by `--config` (if any) over the defaults.
    pub fn from_args(args: ServeArgs) -> Result<Config, String> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                toml::from_str::<ServeArgs>(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => ServeArgs::default(),
        };
        let a = args.or(file);
        let d = Config::default();
        let config = Config {
            listen: a.listen.unwrap_or(d.listen),
            shards: a.shards.unwrap_or(d.shards),
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
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("shards", self.shards),
            ("max-message-size", self.max_message_size),
            ("max-request-head", self.max_request_head),
            ("backlog", self.backlog as usize),
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
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be longer than zero"));
            }
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
        std::fs::write(&path, "listen = \"0.0.0.0:9000\"\nshards = 3\nping-interval = \"45s\"\nsubprotocols = [\"chat\"]\n").unwrap();
        let cli = Cli::parse_from([
            "shardgate",
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--shards",
            "2",
            "--no-echo",
        ]);
        let Command::Serve(args) = cli.command;
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
