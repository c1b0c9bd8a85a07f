//! Who may take part in the cluster: the credentials and TLS settings this node presents
//! to NATS, and the cluster key every message between nodes is sealed with.
//!
//! NATS's own security (accounts, users, permissions, TLS) decides who can reach the
//! subjects at all; the cluster key decides what a node believes. Both are needed: NATS
//! permissions keep strangers off the subjects, the key keeps a misconfigured or shared
//! NATS from letting anyone write onto users' sockets.

use std::path::PathBuf;
use std::sync::Arc;

use async_nats::ConnectOptions;

use super::wire::ClusterKey;
use crate::config::Config;
use crate::secret::{read_secret_file, SecretError, SecretKind};

/// The cluster key: whoever holds it can deliver to any user of the cluster.
const CLUSTER_KEY: SecretKind = SecretKind {
    what: "cluster key",
    risk: "can write to every user's connection",
    min_len: 32,
};
/// A NATS password, token, NKey seed or credentials file: set by whoever runs NATS.
const NATS_SECRET: SecretKind = SecretKind {
    what: "NATS credential",
    risk: "can join the cluster's NATS account",
    min_len: 1,
};

/// The private key of the client certificate given to NATS.
const TLS_KEY: SecretKind = SecretKind {
    what: "NATS client certificate key",
    risk: "can pass for this node at the NATS server",
    min_len: 1,
};

/// How this node authenticates to NATS; secrets already read from their files.
#[derive(Clone, Default)]
pub struct NatsAccess {
    pub user_password: Option<(String, String)>,
    pub token: Option<String>,
    pub nkey_seed: Option<String>,
    pub credentials: Option<String>,
    /// A CA to trust for the server's certificate; given, TLS is required.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and key, for servers that verify clients.
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for NatsAccess {
    /// Says which methods are set, never the secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAccess")
            .field("user", &self.user_password.as_ref().map(|(u, _)| u))
            .field("token", &self.token.is_some())
            .field("nkey", &self.nkey_seed.is_some())
            .field("credentials", &self.credentials.is_some())
            .field("tls_ca", &self.tls_ca)
            .field("tls_client", &self.tls_client)
            .finish()
    }
}

/// Why the node cannot join the cluster as configured.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "--nats needs --cluster-key-file: every node of a cluster seals what it sends with that key, \
         so that nothing else that reaches NATS can write to users (make one with: \
         head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > FILE; chmod 600 FILE; give every node the same file)"
    )]
    NoClusterKey,
    #[error("--nats-user and --nats-password-file go together")]
    HalfUserPassword,
    #[error("--nats-tls-cert and --nats-tls-key go together")]
    HalfClientCert,
    #[error("{0} is not UTF-8 text")]
    NotText(&'static str),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// The cluster key and the NATS credentials named by the configuration.
pub fn load(config: &Config) -> Result<(Arc<ClusterKey>, NatsAccess), AccessError> {
    let key_file = config.cluster_key_file.as_ref().ok_or(AccessError::NoClusterKey)?;
    let key = Arc::new(ClusterKey::new(&read_secret_file(key_file, CLUSTER_KEY)?));
    let text = |path: &PathBuf, what: &'static str| -> Result<String, AccessError> {
        String::from_utf8(read_secret_file(path, NATS_SECRET)?).map_err(|_| AccessError::NotText(what))
    };
    let user_password = match (&config.nats_user, &config.nats_password_file) {
        (Some(user), Some(path)) => Some((user.clone(), text(path, "the NATS password")?)),
        (None, None) => None,
        _ => return Err(AccessError::HalfUserPassword),
    };
    let tls_client = match (&config.nats_tls_cert, &config.nats_tls_key) {
        (Some(cert), Some(key)) => {
            // The NATS client reads the key itself; it must be as private as the rest.
            read_secret_file(key, TLS_KEY)?;
            Some((cert.clone(), key.clone()))
        }
        (None, None) => None,
        _ => return Err(AccessError::HalfClientCert),
    };
    let access = NatsAccess {
        user_password,
        token: config
            .nats_token_file
            .as_ref()
            .map(|p| text(p, "the NATS token"))
            .transpose()?,
        nkey_seed: config
            .nats_nkey_file
            .as_ref()
            .map(|p| text(p, "the NKey seed"))
            .transpose()?,
        // The format ends every marker line with a newline; the read trimmed the last.
        credentials: config
            .nats_credentials
            .as_ref()
            .map(|p| text(p, "the credentials file").map(|creds| creds + "\n"))
            .transpose()?,
        tls_ca: config.nats_tls_ca.clone(),
        tls_client,
    };
    Ok((key, access))
}

impl NatsAccess {
    /// `options` with these credentials and TLS settings.
    pub fn apply(&self, mut options: ConnectOptions) -> std::io::Result<ConnectOptions> {
        if let Some((user, password)) = &self.user_password {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(creds) = &self.credentials {
            options = options.credentials(creds)?;
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.tls_client {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(options)
    }
}

/// `url` (or a comma-separated list of them) fit for a log line: a password or token in
/// it is replaced by `***`.
pub fn redact_url(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        // `user:password@` keeps the user; a lone `token@` is all secret.
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => format!("{scheme}://***@{host}{path}"),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_secrets_in_logs() {
        assert_eq!(redact_url("nats://10.0.0.5:4222"), "nats://10.0.0.5:4222");
        assert_eq!(
            redact_url("nats://gw:s3cret@10.0.0.5:4222"),
            "nats://gw:***@10.0.0.5:4222"
        );
        assert_eq!(
            redact_url("tls://tok3n@nats.example:4222/x"),
            "tls://***@nats.example:4222/x"
        );
        assert_eq!(
            redact_url("nats://a:b@h1:4222,nats://c:d@h2:4222"),
            "nats://a:***@h1:4222,nats://c:***@h2:4222"
        );
    }

    #[test]
    fn a_credentials_file_reaches_the_nats_client_whole() {
        // The JWT is the server's to check; the seed must be a real NKey seed.
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\neyJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        let access = NatsAccess {
            credentials: Some(creds),
            ..Default::default()
        };
        assert!(access.apply(ConnectOptions::new()).is_ok());
        let broken = NatsAccess {
            credentials: Some("-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n".into()),
            ..Default::default()
        };
        assert!(
            broken.apply(ConnectOptions::new()).is_err(),
            "a file without a seed is refused at start"
        );
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let access = NatsAccess {
            user_password: Some(("gw".into(), "s3cret".into())),
            token: Some("tok3n".into()),
            ..Default::default()
        };
        let shown = format!("{access:?}");
        assert!(
            shown.contains("gw") && !shown.contains("s3cret") && !shown.contains("tok3n"),
            "{shown}"
        );
    }
}
