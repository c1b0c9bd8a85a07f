//! The client side of `wss://` for the load tools: rustls with no certificate check (a
//! benchmark talks to a gateway it started, with a certificate made for the run), over a
//! glommio stream while connecting and over a raw non-blocking socket afterwards.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::Arc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use shardgate::sys::socket::{self, Push};

/// Accepts any certificate, but checks the handshake's signatures with it.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration: ALPN `http/1.1`; with `resume`, sessions are kept and resumed
/// (one store per configuration), else every handshake is a full one.
pub fn client_config(resume: bool) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        config.resumption = Resumption::disabled();
    }
    Arc::new(config)
}

pub fn connection(config: &Arc<ClientConfig>) -> io::Result<ClientConnection> {
    let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
    let mut conn = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
    // Whole windows of 16 KiB messages are sealed before the socket takes them.
    conn.set_buffer_limit(None);
    Ok(conn)
}

/// Sends what rustls has sealed, waiting for the socket.
async fn write_out(stream: &mut TcpStream, conn: &mut ClientConnection) -> io::Result<()> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    stream.write_all(&out).await
}

/// Runs the handshake on `stream`.
pub async fn handshake(stream: &mut TcpStream, conn: &mut ClientConnection) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    while conn.is_handshaking() {
        write_out(stream, conn).await?;
        if !conn.is_handshaking() {
            break;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::other("the server closed during the TLS handshake"));
        }
        take_in(conn, &buf[..n], &mut Vec::new())?;
    }
    write_out(stream, conn).await
}

/// Writes `bytes` sealed, waiting for the socket.
pub async fn write_all(stream: &mut TcpStream, conn: &mut ClientConnection, bytes: &[u8]) -> io::Result<()> {
    conn.writer().write_all(bytes)?;
    write_out(stream, conn).await
}

/// Reads plaintext into `buf` (appended), waiting for the socket; 0 at the end.
pub async fn read(stream: &mut TcpStream, conn: &mut ClientConnection, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut raw = vec![0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut raw).await?;
        if n == 0 {
            return Ok(0);
        }
        let got = take_in(conn, &raw[..n], buf)?;
        write_out(stream, conn).await?;
        if got > 0 {
            return Ok(got);
        }
    }
}

/// Feeds ciphertext to rustls and appends the plaintext it opens to `plain`; returns how
/// much came.
pub fn take_in(conn: &mut ClientConnection, mut cipher: &[u8], plain: &mut Vec<u8>) -> io::Result<usize> {
    let before = plain.len();
    while !cipher.is_empty() {
        conn.read_tls(&mut cipher)?;
        let state = conn.process_new_packets().map_err(io::Error::other)?;
        if state.plaintext_bytes_to_read() > 0 {
            let at = plain.len();
            plain.resize(at + state.plaintext_bytes_to_read(), 0);
            conn.reader().read_exact(&mut plain[at..])?;
        }
    }
    Ok(plain.len() - before)
}

/// Sends what rustls has sealed on a non-blocking socket, as much as it takes; true when
/// nothing is left.
pub fn flush(fd: RawFd, conn: &mut ClientConnection) -> io::Result<bool> {
    struct Socket(RawFd);
    impl Write for Socket {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            match socket::send(self.0, bytes, Push::Now)? {
                0 => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            }
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    while conn.wants_write() {
        match conn.write_tls(&mut Socket(fd)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
