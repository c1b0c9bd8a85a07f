//! wss:// against the real binary: a test CA made here (rcgen), rustls clients, the
//! gateway's TLS listener beside its plain one.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{read_frame, upgrade_request, Gateway};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, StreamOwned};

/// A CA of the test's own, and server certificates it signs.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "shardgate test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes a certificate for localhost and 127.0.0.1 and its key (PEM) into `dir`;
    /// returns the certificate.
    fn issue(&self, dir: &Path) -> CertificateDer<'static> {
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    fn client_config(&self, versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// Connects with TLS and finishes the handshake.
fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> Tls {
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(config.clone(), name).unwrap();
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    tls
}

/// Upgrades `path` over `tls`; returns the response head.
fn upgrade(tls: &mut Tls, path: &str) -> String {
    common::request_upgrade(tls, path)
}

fn write_frame(s: &mut impl Write, opcode: shardgate::ws::OpCode, payload: &[u8]) {
    let mut out = Vec::new();
    shardgate::ws::frame::write_frame(&mut out, true, opcode, payload, Some([9, 8, 7, 6]));
    s.write_all(&out).unwrap();
}

/// The next text frame, as JSON (pings skipped).
fn read_json(s: &mut impl Read) -> serde_json::Value {
    loop {
        let (op, payload) = read_frame(s).expect("a frame");
        if op == 1 {
            return serde_json::from_slice(&payload).unwrap();
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    common::temp_dir(name)
}

/// A gateway with a TLS listener (certificate from `dir`) beside its plain one; returns
/// it and the TLS address.
fn tls_gateway(dir: &Path, extra: &[&str]) -> (Gateway, SocketAddr) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let args = [
        &[
            "--listen-tls",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--insecure-dev-auth",
        ][..],
        extra,
    ]
    .concat();
    let mut gw = Gateway::start(&args);
    let line = gw.seen_or_wait("wss:// (TLS");
    let addr = line
        .split(" on ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .expect("the TLS address");
    (gw, addr)
}

#[test]
fn echo_and_chat_over_wss_beside_plain_ws() {
    let dir = temp_dir("tls-echo");
    let ca = TestCa::new();
    ca.issue(&dir);
    let (gw, tls_addr) = tls_gateway(&dir, &["--max-message-size", "4194304"]);
    let config = ca.client_config(&[&rustls::version::TLS13]);

    let mut echo = tls_connect(tls_addr, &config);
    assert_eq!(echo.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(echo.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let head = upgrade(&mut echo, "/echo");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    // One byte, one record, many records, and a message the socket cannot take at once.
    for len in [1usize, 20, 16 * 1024, 100_000, 3 << 20] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        write_frame(&mut echo, shardgate::ws::OpCode::Binary, &payload);
        let (op, back) = read_frame(&mut echo).unwrap();
        assert_eq!((op, back.len()), (2, len));
        assert!(back == payload, "the echo of {len} bytes differs");
    }
    // Many small messages in one write: each comes back, in order.
    let mut burst = Vec::new();
    for i in 0..200u32 {
        shardgate::ws::frame::write_frame(
            &mut burst,
            true,
            shardgate::ws::OpCode::Text,
            format!("m{i}").as_bytes(),
            Some([1, 2, 3, 4]),
        );
    }
    echo.write_all(&burst).unwrap();
    for i in 0..200u32 {
        assert_eq!(read_frame(&mut echo).unwrap(), (1, format!("m{i}").into_bytes()));
    }

    // Chat: alice over wss://, bob over plain ws://, both ways.
    let mut alice = tls_connect(tls_addr, &config);
    assert!(upgrade(&mut alice, "/ws?user=alice").starts_with("HTTP/1.1 101 "));
    assert_eq!(read_json(&mut alice)["type"], "ready");
    let mut bob = common::raw_upgrade(gw.addr, "/ws?user=bob");
    assert_eq!(read_json(&mut bob)["type"], "ready");
    let send = serde_json::json!({"type": "send", "to": "bob", "id": "1", "body": {"text": "over TLS"}});
    write_frame(&mut alice, shardgate::ws::OpCode::Text, send.to_string().as_bytes());
    let got = read_json(&mut bob);
    assert_eq!(
        (got["type"].as_str(), got["from"].as_str()),
        (Some("message"), Some("alice")),
        "{got}"
    );
    assert_eq!(got["body"]["text"], "over TLS");
    assert_eq!(read_json(&mut alice)["type"], "ack");
    let reply = serde_json::json!({"type": "send", "to": "alice", "id": "2", "body": {"text": "back"}});
    write_frame(&mut bob, shardgate::ws::OpCode::Text, reply.to_string().as_bytes());
    let got = read_json(&mut alice);
    assert_eq!(
        (got["from"].as_str(), got["body"]["text"].as_str()),
        (Some("bob"), Some("back")),
        "{got}"
    );

    // A close handshake over TLS: our Close is answered with the same code.
    write_frame(&mut echo, shardgate::ws::OpCode::Close, &1000u16.to_be_bytes());
    let (op, payload) = read_frame(&mut echo).unwrap();
    assert_eq!((op, &payload[..2]), (8, &1000u16.to_be_bytes()[..]));
}

#[test]
fn resumed_handshakes_with_tickets_on_tls13_and_tls12() {
    let dir = temp_dir("tls-resume");
    let ca = TestCa::new();
    ca.issue(&dir);
    let (gw, tls_addr) = tls_gateway(&dir, &[]);
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // One client configuration keeps its sessions (rustls' in-memory store).
        let config = ca.client_config(&[version]);
        let mut first = tls_connect(tls_addr, &config);
        assert_eq!(first.conn.handshake_kind(), Some(HandshakeKind::Full));
        // TLS 1.3 tickets come after the handshake: the upgrade's answer carries them in.
        assert!(upgrade(&mut first, "/echo").starts_with("HTTP/1.1 101 "));
        let second = tls_connect(tls_addr, &config);
        assert_eq!(
            second.conn.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{version:?}: the second handshake resumes the first"
        );
    }
    // Counted by kind on /metrics (of the plain listener).
    let tls_handshakes = "shardgate_tls_handshakes_total";
    common::scrape_until(gw.addr, |m| {
        common::sum(m, tls_handshakes, &["kind=\"full\""]) == 2.0
            && common::sum(m, tls_handshakes, &["kind=\"resumed\""]) == 2.0
    });
}

#[test]
fn sighup_loads_a_new_certificate_for_new_handshakes_and_keeps_old_connections() {
    let dir = temp_dir("tls-reload");
    let ca = TestCa::new();
    let old = ca.issue(&dir);
    let (mut gw, tls_addr) = tls_gateway(&dir, &[]);
    let config = ca.client_config(&[&rustls::version::TLS13]);
    let mut kept = tls_connect(tls_addr, &config);
    assert_eq!(kept.conn.peer_certificates().unwrap()[0], old);
    assert!(upgrade(&mut kept, "/echo").starts_with("HTTP/1.1 101 "));

    let new = ca.issue(&dir);
    assert_ne!(new, old);
    gw.signal(libc::SIGHUP);
    gw.wait_line("new handshakes use it");
    // A client that resumes sees no certificate (the ticket stands for the old one, and
    // stays good): the new one shows in a full handshake.
    let config = ca.client_config(&[&rustls::version::TLS13]);
    let fresh = tls_connect(tls_addr, &config);
    assert_eq!(fresh.conn.peer_certificates().unwrap()[0], new);
    // The connection made before the reload goes on.
    write_frame(&mut kept, shardgate::ws::OpCode::Text, b"still here");
    assert_eq!(read_frame(&mut kept).unwrap(), (1, b"still here".to_vec()));

    // A broken pair is refused and the one in use stays.
    std::fs::write(
        dir.join("key.pem"),
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    let line = gw.wait_line("stays in use");
    assert!(line.contains("key.pem"), "{line}");
    let after = tls_connect(tls_addr, &ca.client_config(&[&rustls::version::TLS13]));
    assert_eq!(after.conn.peer_certificates().unwrap()[0], new);
}

#[test]
fn a_renewed_certificate_is_loaded_when_its_files_change() {
    let dir = temp_dir("tls-renew");
    let ca = TestCa::new();
    let old = ca.issue(&dir);
    let (mut gw, tls_addr) = tls_gateway(&dir, &[]);
    let config = ca.client_config(&[&rustls::version::TLS13]);
    assert_eq!(tls_connect(tls_addr, &config).conn.peer_certificates().unwrap()[0], old);
    // As a renewal does: new files, no signal.
    let new = ca.issue(&dir);
    let line = gw.wait_line("new handshakes use it");
    assert!(line.contains("files changed"), "{line}");
    let fresh = tls_connect(tls_addr, &ca.client_config(&[&rustls::version::TLS13]));
    assert_eq!(fresh.conn.peer_certificates().unwrap()[0], new);
}

#[test]
fn a_plaintext_request_on_the_tls_port_gets_a_400_that_says_so() {
    let dir = temp_dir("tls-plain");
    let ca = TestCa::new();
    ca.issue(&dir);
    let (gw, tls_addr) = tls_gateway(&dir, &[]);
    let answer = common::http_exchange(tls_addr, upgrade_request("/echo", "").as_bytes());
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("wss://"), "{answer}");
    common::scrape_until(gw.addr, |m| {
        common::sum(m, "shardgate_tls_refused_total", &["reason=\"plaintext\""]) == 1.0
    });
}

/// Reads until the server closes; how long after `start` that was.
fn time_to_close(sock: &mut TcpStream, start: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return start.elapsed(),
            Ok(_) => {}
        }
    }
}

#[test]
fn stalled_and_broken_handshakes_end_at_the_handshake_deadline() {
    let dir = temp_dir("tls-stall");
    let ca = TestCa::new();
    ca.issue(&dir);
    let (gw, tls_addr) = tls_gateway(&dir, &["--handshake-timeout", "1s"]);
    let config = ca.client_config(&[&rustls::version::TLS13]);

    let start = Instant::now();
    // Silent after connecting.
    let mut silent = TcpStream::connect(tls_addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A ClientHello, then nothing: the server's flight comes, then the close.
    let mut hello_only = TcpStream::connect(tls_addr).unwrap();
    hello_only.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut conn = ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello_only.write_all(&hello).unwrap();
    // Handshaken, then no HTTP request.
    let mut no_request = tls_connect(tls_addr, &config);

    for (what, took) in [
        ("silent", time_to_close(&mut silent, start)),
        ("ClientHello only", time_to_close(&mut hello_only, start)),
        ("no request", time_to_close(&mut no_request.sock, start)),
    ] {
        assert!(
            took >= Duration::from_millis(700) && took < Duration::from_secs(5),
            "{what}: closed after {took:?}, the deadline is 1 s"
        );
    }

    // A client that asked for another name refuses our certificate (an alert): the
    // gateway closes and counts it.
    let sock = TcpStream::connect(tls_addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = ClientConnection::new(config.clone(), ServerName::try_from("other.example").unwrap()).unwrap();
    let mut wrong_name = StreamOwned::new(conn, sock);
    let refused = (0..10).find_map(|_| wrong_name.conn.complete_io(&mut wrong_name.sock).err());
    assert!(
        refused.is_some(),
        "a certificate for localhost must not pass for other.example"
    );
    common::scrape_until(gw.addr, |m| {
        common::sum(m, "shardgate_tls_refused_total", &["reason=\"protocol\""]) >= 1.0
    });

    // Garbage after a handshake record type: refused at once.
    let mut garbage = TcpStream::connect(tls_addr).unwrap();
    garbage.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    garbage.write_all(&[22, 3, 1, 0, 5, 1, 2, 3, 4, 5]).unwrap();
    assert!(time_to_close(&mut garbage, start) < Duration::from_millis(700));
}

/// Starts the gateway with a TLS listener and `extra`, which must make it refuse to
/// start; returns what it said.
fn refused_start(extra: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--listen-tls",
            "127.0.0.1:0",
            "--store",
            "none",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success(), "it started: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_tls_listener_needs_both_certificate_and_key() {
    let err = refused_start(&[]);
    assert!(err.contains("--tls-cert"), "{err}");
    let dir = temp_dir("tls-missing");
    let missing = dir.join("nope.pem");
    let missing = missing.to_str().unwrap();
    let err = refused_start(&["--tls-cert", missing, "--tls-key", missing]);
    assert!(err.contains("nope.pem"), "{err}");
}
