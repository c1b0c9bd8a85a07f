//! Configuration: command-line flags over an optional TOML file over defaults, all from
//! one table (`config_table!` below). Each entry gives a setting's name, type, default and
//! help once; the macro makes of it the `serve` flag (`--max-message-size`), the TOML key
//! of the same kebab-case name (`max-message-size = 1048576`), the default, the help text
//! with the default in it, and the field of the resolved `Config`. Unknown TOML keys are
//! an error that names them.
//!
//! Durations take a unit (`500ms`, `10s`, `2m`); a bare number is seconds.

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
    /// How long the token is valid (a bare number is seconds).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// File holding the HMAC secret (else SHARDGATE_AUTH_SECRET, else the data directory's).
    #[arg(long, value_name = "FILE")]
    pub auth_secret_file: Option<PathBuf>,
    /// Where `serve` keeps its generated secret [default: ~/.local/share/shardgate].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The `aud` the gateway checks (`serve --token-audience`), if any.
    #[arg(long, value_name = "AUD")]
    pub token_audience: Option<String>,
    /// The `iss` the gateway checks (`serve --token-issuer`), if any.
    #[arg(long, value_name = "ISS")]
    pub token_issuer: Option<String>,
    /// A room the token lets the user join: a name, or a prefix ending in `*` (repeatable;
    /// without any, the token has no `rooms` claim).
    #[arg(long = "room", value_name = "ROOM")]
    pub rooms: Vec<String>,
    /// Let the token watch the dashboard's live feed (`/dashboard`).
    #[arg(long)]
    pub admin: bool,
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// Not TOML, a key the gateway does not know (named), or a value of the wrong type.
    #[error("{}: {source}", path.display())]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{0}")]
    Invalid(String),
}

/// A duration from the command line: `500ms`, `10s`, `2m`, `1h30m`; a bare number is
/// seconds (`5` is `5s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{text}: not a duration of zero or more seconds"));
    }
    humantime::parse_duration(text).map_err(|e| format!("{text}: {e} (e.g. 500ms, 10s, 2m; a bare number is seconds)"))
}

/// TOML durations: a string as on the command line, or a number of seconds.
mod duration_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Seconds(f64),
        Unit(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = match Option::<Text>::deserialize(d)? {
            None => return Ok(None),
            Some(Text::Seconds(s)) => s.to_string(),
            Some(Text::Unit(u)) => u,
        };
        super::parse_duration(&text).map(Some).map_err(serde::de::Error::custom)
    }
}

/// Makes, from one table of settings, the `serve` flags and TOML keys (`ServeArgs`, every
/// field optional so that flags can win over the file), their merge, and the resolved
/// `Config`. `required` settings have a default (shown in the help); `optional` ones are
/// `None` unless given.
macro_rules! config_table {
    (
        required {
            $(
                $(#[doc = $doc:literal])*
                $(#[arg($($arg:tt)*)])?
                $(#[serde($($serde:tt)*)])?
                $name:ident : $ty:ty = $default:expr, $shown:literal;
            )*
        }
        optional {
            $(
                $(#[doc = $odoc:literal])*
                $(#[arg($($oarg:tt)*)])?
                $(#[serde($($oserde:tt)*)])?
                $oname:ident : $oty:ty;
            )*
        }
    ) => {
        /// The `serve` flags; the same keys may come from the TOML file given with `--config`.
        #[derive(Debug, Default, Clone, Args, Deserialize)]
        #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
        pub struct ServeArgs {
            /// TOML file with any of the keys below; flags given on the command line win.
            #[arg(long, value_name = "FILE")]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $(
                #[arg(long, help = help_with_default(concat!($($doc),*), $shown) $(, $($arg)*)?)]
                $(#[serde($($serde)*)])?
                pub $name: Option<$ty>,
            )*
            $(
                $(#[doc = $odoc])*
                #[arg(long $(, $($oarg)*)?)]
                $(#[serde($($oserde)*)])?
                pub $oname: Option<$oty>,
            )*
        }

        impl ServeArgs {
            /// Fills every flag that was not given from `file`.
            fn or(self, file: ServeArgs) -> ServeArgs {
                ServeArgs {
                    config: self.config,
                    $($name: self.$name.or(file.$name),)*
                    $($oname: self.$oname.or(file.$oname),)*
                }
            }
        }

        /// The resolved configuration every shard runs with.
        #[derive(Debug, Clone)]
        pub struct Config {
            $(
                $(#[doc = $doc])*
                pub $name: $ty,
            )*
            $(
                $(#[doc = $odoc])*
                pub $oname: Option<$oty>,
            )*
        }

        impl Config {
            /// Every flag not given takes its default.
            fn resolve(a: ServeArgs) -> Config {
                Config {
                    $($name: a.$name.unwrap_or_else(|| $default),)*
                    $($oname: a.$oname,)*
                }
            }
        }
    };
}

/// The default data directory: `$XDG_DATA_HOME/shardgate`, else `~/.local/share/shardgate`,
/// else `./shardgate-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("shardgate");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/shardgate");
    }
    PathBuf::from("shardgate-data")
}

/// A setting's help line: its doc comment, then its default.
fn help_with_default(doc: &str, default: &str) -> String {
    format!("{} [default: {default}]", doc.trim())
}

fn default_shards() -> usize {
    core_affinity::get_core_ids().map_or(1, |c| c.len().max(1))
}

config_table! {
    required {
        /// Address every shard listens on (SO_REUSEPORT); port 0 picks one.
        listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)), "127.0.0.1:8080";
        /// Number of shards (executors), one pinned per core.
        shards: usize = default_shards(), "one per core";
        /// Listen backlog per shard (capped by net.core.somaxconn).
        backlog: u32 = 4096, "4096";
        /// Largest /echo message in bytes, over all its fragments; larger closes with 1009.
        max_message_size: usize = 64 << 10, "65536";
        /// Largest HTTP request head in bytes; larger is refused with 431.
        max_request_head: usize = 8 << 10, "8192";
        /// Time a client has to complete the HTTP upgrade; then 408.
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        handshake_timeout: Duration = Duration::from_secs(10), "10s";
        /// Silence after which the server pings.
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        ping_interval: Duration = Duration::from_secs(30), "30s";
        /// Time a ping has to be answered before the connection is closed with 1008.
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        pong_timeout: Duration = Duration::from_secs(10), "10s";
        /// On SIGINT/SIGTERM, how long clients get to answer Close 1001 before the process exits.
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        drain_timeout: Duration = Duration::from_secs(5), "5s";
        /// Serve the /echo endpoint (for tests and benchmarks: anyone may use it, no token needed).
        #[arg(num_args = 0, default_missing_value = "true")]
        echo: bool = false, "off";
        /// A subprotocol the server speaks, in order of preference (repeatable).
        #[arg(long = "subprotocol", value_name = "NAME")]
        subprotocols: Vec<String> = Vec::new(), "none";
        /// Accept permessage-deflate (RFC 7692) from clients that offer it; without context takeover (unless --deflate-context-takeover), so no connection keeps compression state.
        #[arg(num_args = 0, default_missing_value = "true")]
        deflate: bool = false, "off";
        /// With --deflate: messages shorter than this many bytes are sent uncompressed.
        deflate_min_size: usize = 512, "512";
        /// With --deflate: zlib level, 1 (fastest) to 9 (smallest).
        deflate_level: u32 = 1, "1";
        /// With --deflate: keep compression context between messages where the client's offer allows it (better ratios, about 340 KiB per connection that has used it).
        #[arg(num_args = 0, default_missing_value = "true")]
        deflate_context_takeover: bool = false, "off";
        /// Bytes of io_uring buffer memory each shard pins (counts against RLIMIT_MEMLOCK for non-root).
        io_memory: usize = 1 << 20, "1048576";
        /// io_uring queue depth per ring. The kernel sizes a ring's poll-cancel hash from its CQ size: 4096 gives the most buckets (256; the default 128 gives 8, and every cancel then scans thousands of armed polls).
        ring_depth: usize = 4096, "4096";
        /// Where a generated secret is kept.
        #[arg(value_name = "DIR")]
        data_dir: PathBuf = default_data_dir(), "~/.local/share/shardgate";
        /// DEMOS ONLY: show the dashboard's live feed without an admin token.
        #[arg(num_args = 0, default_missing_value = "true")]
        dashboard_open: bool = false, "off";
        /// DEMOS AND BENCHMARKS ONLY: accept `?user=<id>` on /ws without a token.
        #[arg(num_args = 0, default_missing_value = "true")]
        insecure_dev_auth: bool = false, "off";
        /// An Origin allowed to open /ws from a browser (repeatable); other Origins get 403.
        #[arg(long = "allowed-origin", value_name = "ORIGIN")]
        allowed_origins: Vec<String> = Vec::new(), "any";
        /// Bytes each shard may hold for clients in messages being assembled and frames queued for slow sockets; past it, a connection that needs more for a message is closed with 1009.
        shard_memory_budget: usize = 64 << 20, "67108864";
        /// Connections one client IP address may hold open, 0 for no limit (raise it for load tests, or behind a proxy).
        max_connections_per_ip: u32 = 1000, "1000";
        /// WebSocket upgrades one client IP address may start per second, 0 for no limit (raise it for load tests, or behind a proxy).
        handshakes_per_ip: u32 = 100, "100";
        /// Bytes a chat connection may have queued for sending; past it, it is closed with 1008.
        max_outbound_bytes: usize = 1 << 20, "1048576";
        /// Largest chat message in bytes, over all its fragments; larger closes with 1009.
        max_chat_message: usize = 64 << 10, "65536";
        /// Rooms one user may be in (all its connections on a node together), 0 for no limit.
        max_rooms_per_user: usize = 128, "128";
        /// Connections one room may have on one shard (bounds a publish's fan-out work), 0 for no limit.
        max_room_members: usize = 10_000, "10000";
        /// Bytes of chat messages per second per connection, 0 for no limit.
        rate_limit_bytes: u32 = 65_536, "65536";
        /// Burst of bytes allowed above --rate-limit-bytes (at least one whole --max-chat-message).
        rate_burst_bytes: u32 = 262_144, "262144";
        /// Chat messages per second per connection, 0 for no limit.
        rate_limit: f64 = 100.0, "100";
        /// Burst allowed above --rate-limit.
        rate_burst: u32 = 200, "200";
        /// How often the latency report line is printed.
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        report_interval: Duration = Duration::from_secs(10), "10s";
        /// The end-to-end latency objective the report measures against.
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        slo: Duration = Duration::from_millis(200), "200ms";
        /// Each shard also listens on a port of its own (printed at start), to reach a chosen shard.
        #[arg(num_args = 0, default_missing_value = "true")]
        shard_ports: bool = false, "off";
        /// Hand each new connection to the shard on the CPU that received its SYN, instead of the kernel's hash. For hosts whose NIC spreads flows over every shard's CPU (RSS, one queue per core); needs one CPU per shard (see kernel-tuning.md).
        #[arg(num_args = 0, default_missing_value = "true")]
        steer_by_cpu: bool = false, "off";
        /// Rooms are closed to users whose token has no `rooms` claim (and to dev-auth users); without this, open to them.
        #[arg(num_args = 0, default_missing_value = "true")]
        rooms_closed_by_default: bool = false, "off";
        /// Subject prefix of the cluster: nodes with the same prefix form one.
        nats_prefix: String = "shardgate".into(), "shardgate";
        /// A node not heard from for this long is forgotten with its users.
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        presence_timeout: Duration = Duration::from_secs(5), "5s";
        /// A cross-node send not confirmed within this is answered `unavailable`.
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        cluster_ack_timeout: Duration = Duration::from_secs(2), "2s";
        /// Entries a node keeps of where users and rooms held on other nodes are (the cluster directory's cache; each ~170 bytes).
        directory_cache: usize = 100_000, "100000";
        /// In a cluster with a shared store: how long a stored message that arrived before
        /// one it follows waits for it, before the gap is read from the store.
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        reorder_hold: Duration = Duration::from_millis(50), "50ms";
        /// Stored messages older than this are trimmed, 0 to keep them by age.
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        retention_max_age: Duration = Duration::from_secs(30 * 24 * 3600), "30d";
        /// Messages kept per conversation (the oldest are trimmed), 0 for no limit.
        retention_max_messages: u64 = 10_000, "10000";
        /// A send retried with the same `id` by the same user within this is not stored twice.
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        dedupe_window: Duration = Duration::from_secs(300), "5m";
        /// Recent conversations (with their latest seq) listed in `ready`.
        ready_conversations: usize = 100, "100";
        /// Bytes of a message body a push carries as its preview, 0 for none.
        push_preview_bytes: usize = 0, "0";
        /// Push events waiting for the webhook beyond which new ones are dropped (and counted).
        push_queue: usize = 10_000, "10000";
    }
    optional {
        /// CPUs the shards are pinned to, in order (shard i on the i-th, round robin) [default: every core].
        #[arg(value_delimiter = ',')]
        cpus: Vec<usize>;
        /// Connections this process accepts before answering 503 [default: the open-file limit less a reserve].
        max_connections: usize;
        /// Busy-poll this long before a shard parks: lower latency, more idle CPU [default: off].
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        spin_before_park: Duration;
        /// File holding the HMAC secret for tokens [default: SHARDGATE_AUTH_SECRET, else a secret created in the data directory].
        #[arg(value_name = "FILE")]
        auth_secret_file: PathBuf;
        /// Also write the whole run's latency distribution to this file at shutdown.
        #[arg(value_name = "FILE")]
        histogram_out: PathBuf;
        /// Serve `/metrics` on this address (a private port, one thread) instead of the main listener.
        #[arg(value_name = "ADDR")]
        metrics_listen: SocketAddr;
        /// Also listen for wss:// (TLS) on this address, every shard (SO_REUSEPORT); needs --tls-cert and --tls-key.
        #[arg(value_name = "ADDR")]
        listen_tls: SocketAddr;
        /// Certificate chain (PEM, the server's own first) for --listen-tls; read again on SIGHUP and when the files change.
        #[arg(value_name = "FILE")]
        tls_cert: PathBuf;
        /// Private key (PEM: PKCS#8, RSA or EC) of --tls-cert; read again on SIGHUP and when the files change.
        #[arg(value_name = "FILE")]
        tls_key: PathBuf;
        /// Join a cluster of gateways through this NATS server (e.g. nats://127.0.0.1:4222); without it the gateway is a single node with no dependency.
        #[arg(value_name = "URL")]
        nats: String;
        /// Pin the NATS thread to this CPU [default: unpinned, so it never competes with one shard alone for a core].
        cluster_cpu: usize;
        /// File (mode 0600, at least 32 bytes) with the key every node of the cluster seals its messages with; needed with --nats, the same on every node.
        #[arg(value_name = "FILE")]
        cluster_key_file: PathBuf;
        /// NATS user name (with --nats-password-file).
        #[arg(value_name = "USER")]
        nats_user: String;
        /// File (mode 0600) holding the NATS password for --nats-user.
        #[arg(value_name = "FILE")]
        nats_password_file: PathBuf;
        /// File (mode 0600) holding a NATS authentication token.
        #[arg(value_name = "FILE")]
        nats_token_file: PathBuf;
        /// File (mode 0600) holding an NKey seed to authenticate to NATS with.
        #[arg(value_name = "FILE")]
        nats_nkey_file: PathBuf;
        /// NATS credentials file (JWT and NKey seed, mode 0600), as `nsc` makes them.
        #[arg(value_name = "FILE")]
        nats_credentials: PathBuf;
        /// CA certificate (PEM) to verify the NATS server with; given, the connection must use TLS.
        #[arg(value_name = "FILE")]
        nats_tls_ca: PathBuf;
        /// Client certificate (PEM) for NATS servers that verify clients (with --nats-tls-key).
        #[arg(value_name = "FILE")]
        nats_tls_cert: PathBuf;
        /// Private key (PEM) of --nats-tls-cert.
        #[arg(value_name = "FILE")]
        nats_tls_key: PathBuf;
        /// Tokens must carry this `aud` (and `token` mints it) [default: not checked].
        #[arg(value_name = "AUD")]
        token_audience: String;
        /// Tokens must carry this `iss` (and `token` mints it) [default: not checked].
        #[arg(value_name = "ISS")]
        token_issuer: String;
        /// Where messages are stored: `embedded` (in --data-dir), `redis://HOST:PORT[/DB]` or `redis+cluster://HOST:PORT,HOST:PORT,…` (a Redis or Redis Cluster; `rediss://`, `rediss+cluster://` over TLS) or `none` (relay only: acks say `routed`/`offline`, nothing is kept) [default: embedded; none with --nats].
        #[arg(value_name = "KIND")]
        store: String;
        /// CA certificates (PEM) to trust for a `rediss://` store instead of the system's.
        #[arg(value_name = "FILE")]
        store_tls_ca: PathBuf;
        /// POST a signed batch to this URL for messages stored for users with no connection (needs --push-secret-file).
        #[arg(value_name = "URL")]
        push_webhook: String;
        /// File (mode 0600, at least 32 bytes) with the key push requests are signed with.
        #[arg(value_name = "FILE")]
        push_secret_file: PathBuf;
        /// Refuse tokens that are still valid for longer than this (a bare number is seconds) [default: no limit].
        #[arg(value_parser = parse_duration)]
        #[serde(with = "duration_serde")]
        max_token_lifetime: Duration;
    }
}

/// `--store` names a Redis.
fn is_redis_url(store: &str) -> bool {
    [
        "redis://",
        "rediss://",
        "redis+unix://",
        "redis+cluster://",
        "rediss+cluster://",
    ]
    .iter()
    .any(|scheme| store.starts_with(scheme))
}

/// Where messages are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// In the data directory (the default of a single node).
    Embedded,
    /// On the Redis at the URL `--store` gives.
    Redis,
    /// Nowhere: relay only.
    None,
}

impl Default for Config {
    fn default() -> Self {
        Config::resolve(ServeArgs::default())
    }
}

impl Config {
    /// What permessage-deflate the gateway accepts.
    pub fn deflate_policy(&self) -> crate::ws::deflate::Policy {
        use crate::ws::deflate::Policy;
        match (self.deflate, self.deflate_context_takeover) {
            (false, _) => Policy::Off,
            (true, false) => Policy::NoContext,
            (true, true) => Policy::Takeover,
        }
    }

    /// Resolves flags over the file named by `--config` (if any) over the defaults.
    pub fn from_args(args: ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<ServeArgs>(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => ServeArgs::default(),
        };
        let mut config = Config::resolve(args.or(file));
        // An empty list or URL (from a file that blanks a setting) means "not set".
        config.cpus = config.cpus.filter(|c| !c.is_empty());
        config.nats = config.nats.filter(|u| !u.is_empty());
        config.push_webhook = config.push_webhook.filter(|u| !u.is_empty());
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    /// The store this gateway runs with: `--store`, else embedded, but none in a cluster
    /// (nodes must not number one conversation each on its own).
    pub fn store_kind(&self) -> StoreKind {
        match (self.store.as_deref(), &self.nats) {
            (Some("embedded"), _) | (None, None) => StoreKind::Embedded,
            (Some(url), _) if is_redis_url(url) => StoreKind::Redis,
            _ => StoreKind::None,
        }
    }

    /// The first setting out of its range, in words.
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
            ("shard-memory-budget", self.shard_memory_budget),
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
            ("reorder-hold", self.reorder_hold),
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
        match (self.store.as_deref(), &self.nats) {
            (None | Some("none"), _) | (Some("embedded"), None) => {}
            (Some("embedded"), Some(_)) => {
                return Err("--store embedded cannot run with --nats: each node would number the same conversations on its own. Share one with --store redis://HOST:PORT (or run the cluster with --store none: relay only, nothing stored)".into())
            }
            (Some(url), _) if is_redis_url(url) => {}
            (Some(other), _) => {
                return Err(format!(
                    "store must be embedded, redis://HOST:PORT[/DB], redis+cluster://HOST:PORT,… or none, not {other:?}"
                ))
            }
        }
        let tls_store = self.store.as_deref().is_some_and(|s| s.starts_with("rediss"));
        if self.store_tls_ca.is_some() && !tls_store {
            return Err("--store-tls-ca is for a store over TLS (--store rediss://… or rediss+cluster://…)".into());
        }
        if self.push_webhook.is_some() {
            if self.store_kind() == StoreKind::None {
                return Err("--push-webhook needs the message store (pushes are for stored messages)".into());
            }
            if self.push_secret_file.is_none() {
                return Err("--push-webhook needs --push-secret-file (requests are signed)".into());
            }
        }
        if self.directory_cache == 0 {
            return Err("directory-cache must be at least 1".into());
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

    fn serve(flags: &[&str]) -> Result<Config, ConfigError> {
        let cli = Cli::parse_from([&["shardgate", "serve"], flags].concat());
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        Config::from_args(args)
    }

    #[test]
    fn the_store_is_embedded_alone_none_in_a_cluster_unless_shared_and_redis_when_named() {
        let kind = |flags: &[&str]| serve(flags).map(|c| c.store_kind()).map_err(|e| e.to_string());
        let nats = ["--nats", "nats://127.0.0.1:4222"];
        assert_eq!(kind(&[]), Ok(StoreKind::Embedded));
        assert_eq!(kind(&nats), Ok(StoreKind::None));
        assert_eq!(kind(&["--store", "redis://127.0.0.1:6379/2"]), Ok(StoreKind::Redis));
        assert_eq!(
            kind(&["--store", "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"]),
            Ok(StoreKind::Redis)
        );
        assert_eq!(kind(&["--store", "none"]), Ok(StoreKind::None));
        let refused = |flags: &[&str], words: &str| {
            let e = kind(flags).unwrap_err();
            assert!(e.contains(words), "{flags:?}: {e}");
        };
        refused(
            &[&nats[..], &["--store", "embedded"]].concat(),
            "cannot run with --nats",
        );
        assert_eq!(
            kind(&[&nats[..], &["--store", "redis://h:1"]].concat()),
            Ok(StoreKind::Redis)
        );
        refused(&["--store", "postgres://h"], "redis://HOST:PORT[/DB]");
        refused(
            &["--store", "redis://h:1", "--store-tls-ca", "ca.pem"],
            "a store over TLS",
        );
        assert_eq!(
            kind(&["--store", "rediss+cluster://h:1,h:2", "--store-tls-ca", "ca.pem"]),
            Ok(StoreKind::Redis)
        );
    }

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
            "--echo",
        ]);
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let c = Config::from_args(args).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.shards, 2);
        assert_eq!(c.ping_interval, Duration::from_secs(45));
        assert_eq!(c.subprotocols, vec!["chat".to_string()]);
        assert!(c.echo);
        assert_eq!(c.max_message_size, 64 << 10);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bare_number_of_a_duration_is_seconds() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("5 parsecs")
            .unwrap_err()
            .contains("a bare number is seconds"));
        let cli = Cli::parse_from(["shardgate", "serve", "--report-interval", "5", "--slo", "150ms"]);
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let c = Config::from_args(args).unwrap();
        assert_eq!(
            (c.report_interval, c.slo),
            (Duration::from_secs(5), Duration::from_millis(150))
        );
        // In the file: a number of seconds, or a string as on the command line.
        let file: ServeArgs = toml::from_str("ping-interval = 45\npong-timeout = \"1.5s\"\n").unwrap();
        assert_eq!(file.ping_interval, Some(Duration::from_secs(45)));
        assert_eq!(file.pong_timeout, Some(Duration::from_millis(1500)));
    }

    /// The README's configuration table is the user's reference: every flag the table of
    /// settings makes must be in it, with the default the help shows.
    #[test]
    fn every_flag_is_in_the_readme_with_its_default() {
        use clap::CommandFactory;
        let readme = include_str!("../README.md");
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("serve");
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let row = readme
                .lines()
                .find(|l| {
                    // `--rate-limit` must not match the row of `--rate-limit-bytes`.
                    let rest = l.strip_prefix(&format!("| `--{long}")).unwrap_or("-");
                    rest.starts_with('`') || rest.starts_with(' ')
                })
                .unwrap_or_else(|| panic!("README's configuration table has no row for --{long}"));
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            if let Some(default) = help.split("[default: ").nth(1).and_then(|d| d.split(']').next()) {
                assert!(
                    row.contains(default),
                    "README's row for --{long} does not show its default {default:?}: {row}"
                );
            }
        }
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
        assert!(Config::from_args(args).unwrap_err().to_string().contains("listn"));
        let args = ServeArgs {
            shards: Some(0),
            ..Default::default()
        };
        assert!(Config::from_args(args).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
