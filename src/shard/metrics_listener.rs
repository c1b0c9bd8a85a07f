//! `--metrics-listen`: `/metrics` on a private address, served by a thread of its own
//! (not a shard: a scrape there never waits behind client traffic, and the main listener
//! then answers `/metrics` with 404).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::exposition::{self, Exposition};
use crate::ws::handshake;

/// A request head larger than this is refused (a scraper sends a few hundred bytes).
const MAX_HEAD: usize = 8192;
/// A scraper that does not send its request within this is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` (so that a port in use fails the start) and serves it on a new thread.
pub fn spawn(addr: SocketAddr, exposition: Arc<Exposition>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => serve(stream, &exposition),
                Err(e) => tracing::warn!("metrics listener: accept failed: {e}"),
            }
        }
    })?;
    Ok(())
}

/// Answers one request, then closes (scrapes are seconds apart: no keep-alive).
fn serve(mut stream: TcpStream, exposition: &Exposition) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        head.extend_from_slice(&buf[..n]);
        match handshake::parse_request(&head, MAX_HEAD) {
            Ok(None) => continue,
            Ok(Some(request)) => {
                match (request.method, request.path) {
                    ("GET", "/metrics") => {
                        let body = exposition.render();
                        handshake::write_body(&mut out, 200, exposition::CONTENT_TYPE, "", body.as_bytes());
                    }
                    (_, "/metrics") => handshake::write_response(&mut out, 405, "use GET", "Allow: GET\r\n"),
                    _ => handshake::write_response(&mut out, 404, "only /metrics is served here", ""),
                }
                break;
            }
            Err(rejection) => {
                handshake::write_rejection(&mut out, &rejection);
                break;
            }
        }
    }
    let _ = stream.write_all(&out);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Read what the client still sends, briefly, so that the answer is not cut by a reset.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}
