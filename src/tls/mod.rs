//! TLS for the gateway's listeners, with rustls: the certificate and key (PEM), reloaded
//! on SIGHUP or a change of the files without touching live connections
//! (`Certificates`), the server
//! configuration every shard shares (`server_config`), and one connection's record layer
//! with no IO of its own (`session`).
//!
//! The crypto provider is `ring`: it builds from a fresh clone with nothing but a C
//! compiler, where `aws-lc-rs` also wants cmake (and NASM or a prebuilt blob); `ring` is
//! already what the NATS and Redis clients use here, so it adds no second provider.

pub mod session;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;

pub use session::TlsSession;

/// What can go wrong loading a certificate and its key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("cannot read the TLS key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the TLS key {key} does not belong to the certificate {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The certificate chain and key new handshakes get; `reload` swaps them.
pub struct Certificates {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish()
    }
}

impl Certificates {
    /// Loads the chain (`cert`: the leaf first, then intermediates) and its key (PKCS#8,
    /// PKCS#1 RSA or SEC1 EC, in PEM).
    pub fn load(cert: &Path, key: &Path) -> Result<Certificates, TlsError> {
        Ok(Certificates {
            current: RwLock::new(Arc::new(load_pair(cert, key)?)),
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
        })
    }

    /// Reads the files again. New handshakes get the new pair; on an error the old pair
    /// stays and the error says why. Connections already up are not touched.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = Arc::new(load_pair(&self.cert_path, &self.key_path)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = pair;
        Ok(())
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// When and how long each file was (a change of either is a new pair in the making).
    fn stamps(&self) -> [Option<(SystemTime, u64)>; 2] {
        [&self.cert_path, &self.key_path].map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
    }

    /// Reads the pair again whenever the files change (as a renewal rewrites them), on a
    /// thread of its own that looks every `every`: a change is loaded once both files
    /// have stayed the same for one look, so that a certificate is not read beside the
    /// key it replaces. `on_reload` hears each outcome (the log lines).
    pub fn watch(
        self: Arc<Self>,
        every: Duration,
        on_reload: impl Fn(&Certificates, Result<(), TlsError>) + Send + 'static,
    ) -> std::io::Result<()> {
        let mut loaded = self.stamps();
        let mut seen = loaded;
        std::thread::Builder::new()
            .name("tls-watch".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let now = self.stamps();
                if now != loaded && now == seen {
                    on_reload(&self, self.reload());
                    loaded = now;
                }
                seen = now;
            })?;
        Ok(())
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: cert.to_owned(),
            reason: "no CERTIFICATE in it".into(),
        });
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let signing = provider::sign::any_supported_type(&der).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|e| TlsError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(pair)
}

/// TLS sessions a node remembers for resumption by session ID (TLS 1.2 clients without
/// tickets); tickets need no memory on the server.
const SESSION_CACHE: usize = 4096;

/// The configuration every shard's handshakes use: TLS 1.3 and 1.2 with rustls' default
/// (AEAD-only, forward-secret) cipher suites, ALPN `http/1.1`, session tickets on
/// (stateless, keys rotated by rustls every 6 hours) and a session-ID cache.
pub fn server_config(certificates: Arc<Certificates>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ticketer = provider::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    // Two tickets (rustls' default), so that a client can resume twice in parallel.
    Ok(Arc::new(config))
}
