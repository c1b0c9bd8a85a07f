//! A real shardgate process for integration tests: started on an ephemeral port, its
//! output collected, stopped by PID when the test ends.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Sends every line of `from` to `to`, on a thread of its own.
fn forward_lines(from: impl Read + Send + 'static, to: std::sync::mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if to.send(line).is_err() {
                break;
            }
        }
    });
}

pub struct Gateway {
    child: Option<Child>,
    pub addr: SocketAddr,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Gateway {
    /// Starts `shardgate serve --echo` with `args` on 127.0.0.1:0 and waits until every
    /// shard listens.
    pub fn start(args: &[&str]) -> Gateway {
        Self::start_with(Command::new(env!("CARGO_BIN_EXE_shardgate")), args)
    }

    /// As `start`, with a prepared command (for a wrapper such as `prlimit`).
    pub fn start_with(cmd: Command, args: &[&str]) -> Gateway {
        Self::launch(cmd, &[&["--echo"], args].concat())
    }

    /// As `start`, without `--echo`: the gateway as it runs by default.
    pub fn start_without_echo(args: &[&str]) -> Gateway {
        Self::launch(Command::new(env!("CARGO_BIN_EXE_shardgate")), args)
    }

    fn launch(mut cmd: Command, args: &[&str]) -> Gateway {
        cmd.args(["serve", "--listen", "127.0.0.1:0"]).args(args);
        // Every test client comes from 127.0.0.1: the per-IP limits are off unless a
        // test sets them.
        for limit in ["--max-connections-per-ip", "--handshakes-per-ip"] {
            if !args.contains(&limit) {
                cmd.args([limit, "0"]);
            }
        }
        // A store needs a data directory of its own: tests that give none only relay
        // (else they would share the user's default directory, one process at a time).
        if !args.contains(&"--store") && !args.contains(&"--data-dir") {
            cmd.args(["--store", "none"]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start shardgate");
        // Report lines come on stdout, operational messages (the start lines among them)
        // on stderr: the tests read both, each in its own order.
        let (tx, lines) = channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        forward_lines(stdout, tx.clone());
        forward_lines(stderr, tx);
        let mut gw = Gateway {
            child: Some(child),
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
            seen: Vec::new(),
        };
        let line = gw.wait_line("shard(s) on");
        // "... shardgate 0.1.0: 2 shard(s) on 127.0.0.1:PORT; max connections ..."
        let first = &line[line.find("shardgate ").expect("start line")..];
        let shards: usize = first
            .split(' ')
            .nth(2)
            .and_then(|s| s.parse().ok())
            .expect("shard count");
        for _ in 0..shards {
            gw.wait_line("listening on");
        }
        let addr = first
            .split(" on ")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .expect("address");
        gw.addr = addr.parse().expect("socket address");
        gw
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Waits (at most 20 s) for the next output line containing `needle` and returns it.
    pub fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no line with {needle:?} within 20 s; saw {:?}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("gateway exited before printing {needle:?}; saw {:?}", self.seen)
                }
            }
        }
    }

    /// Has a line containing `needle` come yet (without waiting for more)?
    pub fn saw(&mut self, needle: &str) -> bool {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.iter().any(|l| l.contains(needle))
    }

    /// A line containing `needle` already seen, else the next one to come.
    pub fn seen_or_wait(&mut self, needle: &str) -> String {
        match self.seen.iter().find(|l| l.contains(needle)) {
            Some(line) => line.clone(),
            None => self.wait_line(needle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Sends `signal` to the gateway.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the PID of the child we started.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits (at most 20 s) for the gateway to exit and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as i32;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(status) => status.expect("wait"),
            Err(_) => {
                // SAFETY: kill(2) on the PID of the child we started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("gateway did not exit within 20 s; saw {:?}", self.seen);
            }
        };
        // The process is gone, so its stdout is closed: this drains what is left.
        while let Ok(line) = self.lines.recv() {
            self.seen.push(line);
        }
        status
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends a raw HTTP request and returns everything the server answered before closing.
pub fn http_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(request).expect("write request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET path` (a whole response: head and body).
pub fn get(addr: SocketAddr, path: &str) -> String {
    http_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
    )
}

/// A scrape's samples by their full name with labels (`name{a="b"}`), checking every line
/// is a comment or `name[{labels}] value`.
pub fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let response = get(addr, "/metrics");
    let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    let mut samples = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        assert!(
            samples.insert(name.to_string(), value).is_none(),
            "repeated sample {name}"
        );
    }
    samples
}

/// The sum of every sample of `family` whose labels include all of `labels`.
pub fn sum(samples: &HashMap<String, f64>, family: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| {
            (k.as_str() == family || k.starts_with(&format!("{family}{{"))) && labels.iter().all(|l| k.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Scrapes until `ready` holds (the shards copy their counters once a second), at most 10 s.
pub fn scrape_until(addr: SocketAddr, ready: impl Fn(&HashMap<String, f64>) -> bool) -> HashMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(addr);
        if ready(&samples) {
            return samples;
        }
        assert!(Instant::now() < deadline, "the scrape never showed it: {samples:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An upgrade request for `path` with the given extra header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends an upgrade request for `path` on `s` and reads the answer's head, byte by byte
/// (so that nothing after it is taken).
pub fn request_upgrade(s: &mut (impl Read + Write), path: &str) -> String {
    s.write_all(upgrade_request(path, "").as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("read the answer");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Connects and completes an upgrade on a plain socket; returns the socket after the 101.
pub fn raw_upgrade(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let head = request_upgrade(&mut s, path);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    s
}

/// Reads one unmasked server frame: (opcode, payload).
pub fn read_frame(s: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    let len = match h[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b)?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((h[0] & 0x0F, payload))
}

/// Writes one masked client frame.
pub fn write_frame(s: &mut TcpStream, first_byte: u8, payload: &[u8]) {
    let mut out = Vec::new();
    shardgate::ws::frame::write_frame(
        &mut out,
        true,
        shardgate::ws::OpCode::Binary,
        payload,
        Some([1, 2, 3, 4]),
    );
    out[0] = first_byte;
    s.write_all(&out).unwrap();
}

pub fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// The per-shard ports printed with `--shard-ports`, by shard id.
pub fn shard_ports(gw: &Gateway) -> Vec<u16> {
    let mut ports: Vec<(usize, u16)> = gw
        .seen
        .iter()
        .filter_map(|l| {
            let id = l.split(" shard ").nth(1)?.split(':').next()?.parse().ok()?;
            let port = l.split("own port ").nth(1)?.trim().parse().ok()?;
            Some((id, port))
        })
        .collect();
    ports.sort();
    ports.into_iter().map(|(_, p)| p).collect()
}

/// A two-shard gateway with dev auth, no rate limits and a port per shard, keeping its
/// data (secret, message store) in `dir`; returns it and the shards' ports.
pub fn two_shard_dev_gateway(dir: &std::path::Path, extra: &[&str]) -> (Gateway, Vec<u16>) {
    let mut args = vec![
        "--shards",
        "2",
        "--shard-ports",
        "--insecure-dev-auth",
        "--rate-limit",
        "0",
        "--rate-limit-bytes",
        "0",
        "--data-dir",
        dir.to_str().expect("a UTF-8 path"),
    ];
    args.extend_from_slice(extra);
    let gw = Gateway::start(&args);
    let ports = shard_ports(&gw);
    assert_eq!(ports.len(), 2, "{:?}", gw.seen);
    (gw, ports)
}

/// A fresh directory for a test's data (the generated auth secret lives there).
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shardgate-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Sends a request and returns just the response's status code (the connection may stay open).
pub fn response_status(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(request.as_bytes()).expect("write request");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).expect("a status line");
    String::from_utf8_lossy(&head[9..12]).into_owned()
}

/// A real nats-server on a loopback port of its own, stopped by PID when dropped.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    /// Options beyond the address (authentication, TLS), kept for a restart.
    args: Vec<String>,
}

impl Nats {
    /// Starts `nats-server` on a free loopback port (it must be installed: `scripts/test.sh`
    /// installs it; by hand, `apt-get install nats-server`).
    pub fn start() -> Nats {
        Self::start_with(&[])
    }

    /// As `start`, with more options for nats-server (e.g. `--user`, `--tls`).
    pub fn start_with(args: &[&str]) -> Nats {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, port) = Self::spawn(0, &args);
        Nats {
            child: Some(child),
            port,
            args,
        }
    }

    fn spawn(port: u16, args: &[String]) -> (Child, u16) {
        let port_arg = if port == 0 { "-1".to_string() } else { port.to_string() };
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port_arg])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nats-server is not installed: run scripts/test.sh, or apt-get install nats-server");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            // Read to the end, so the server never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split("Listening for client connections on ")
                    .nth(1)
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.trim().parse::<u16>().ok())
                {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(port);
                    }
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("nats-server did not start listening within 20 s");
        (child, port)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGTERM, then waits for it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the PID of the child we started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the same options.
    pub fn restart(&mut self) {
        self.stop();
        let (child, _) = Self::spawn(self.port, &self.args);
        self.child = Some(child);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A real redis-server on a loopback port of its own, with its append-only file synced
/// before every reply (`appendfsync always`), in a directory of its own; stopped by PID
/// when dropped.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: std::path::PathBuf,
    /// Options after the defaults (a later one wins).
    args: Vec<String>,
}

impl Redis {
    /// Starts `redis-server` (it must be installed: `scripts/test.sh` installs it; by
    /// hand, `apt-get install redis-server`).
    pub fn start(name: &str) -> Redis {
        Self::start_with(name, &[])
    }

    /// As `start`, with more options for redis-server (e.g. `--appendfsync everysec`).
    pub fn start_with(name: &str, args: &[&str]) -> Redis {
        let dir = temp_dir(&format!("redis-{name}"));
        let port = free_redis_port();
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut redis = Redis {
            child: None,
            port,
            dir,
            args,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--databases", "16"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: run scripts/test.sh, or apt-get install redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers_ping() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Does it answer (`+PONG`, or `-NOAUTH` when it wants a password)?
    fn answers_ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut reply).is_ok()
            && (&reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
    }

    /// The URL of database `db` (each test of a server may take its own).
    pub fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// Ends the server at once (SIGKILL: no shutdown save), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (its append-only file).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the server: a Redis that accepts nothing and
    /// answers nothing, as a hung one would.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on the PID of the child we started.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }
}

/// A free loopback port for redis-server (which cannot report one it picked itself): below
/// 55536, with the port 10,000 above it free too, for a cluster node's bus. Ports are
/// handed out in turn from a random start, so that two servers of one test process never
/// get the same one (a server that failed to bind would leave its test talking to the
/// other's).
pub fn free_redis_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::collections::hash_map::RandomState::new().build_hasher().finish() as u32 % 30_000;
    let _ = NEXT.compare_exchange(0, start + 1, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..1000 {
        let port = 20_000 + (NEXT.fetch_add(1, Ordering::Relaxed) % 35_536) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair for redis-server below 55536");
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real Redis Cluster of three primaries on loopback ports of their own (`redis-server
/// --cluster-enabled yes` ×3, joined by `redis-cli --cluster create`), stopped by PID when
/// dropped.
pub struct RedisCluster {
    nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start(name: &str) -> RedisCluster {
        let nodes: Vec<Redis> = (0..3)
            .map(|i| Redis::start_with(&format!("{name}-{i}"), &["--cluster-enabled", "yes"]))
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli is not installed: run scripts/test.sh, or apt-get install redis-server");
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stdout));
        // Every node must agree that the slots are served before a client may rely on it.
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not become ok within 20 s");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    /// The `--store` URL: the three as seeds.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }
}

/// A chat client connection (tokio-tungstenite).
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Upgrades at `url` (a `/ws` URL for `user`) and waits for `ready`.
pub async fn connect_user(url: &str, user: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
    assert_eq!(recv(&mut ws).await, serde_json::json!({"type": "ready", "user": user}));
    ws
}

/// Connects to a gateway with the store and returns the connection and its `ready`.
pub async fn connect_stored(url: &str, user: &str) -> (Ws, serde_json::Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
    let ready = recv(&mut ws).await;
    assert_eq!(
        (ready["type"].as_str(), ready["user"].as_str()),
        (Some("ready"), Some(user)),
        "{ready}"
    );
    assert!(ready["convs"].is_array(), "{ready}");
    (ws, ready)
}

pub async fn send(ws: &mut Ws, v: serde_json::Value) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(v.to_string()))
        .await
        .unwrap();
}

/// The next JSON frame (pings are answered by tungstenite and skipped).
pub async fn recv(ws: &mut Ws) -> serde_json::Value {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// A request as the webhook server saw it: its headers (names in lower case) and body.
pub type Request = (std::collections::BTreeMap<String, String>, Vec<u8>);

/// A one-request-per-connection HTTP server that answers with `statuses` in turn (then
/// 200) and hands over each request's headers and body.
pub fn webhook_server(statuses: Vec<u16>) -> (u16, std::sync::mpsc::Receiver<Request>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut statuses = statuses.into_iter();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut headers = std::collections::BTreeMap::new();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                match line.trim_end().split_once(": ") {
                    Some((k, v)) => {
                        headers.insert(k.to_ascii_lowercase(), v.to_string());
                    }
                    None => break,
                }
            }
            let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let status = statuses.next().unwrap_or(200);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            if tx.send((headers, body)).is_err() {
                return;
            }
        }
    });
    (port, rx)
}
