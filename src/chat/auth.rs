//! Who a connection belongs to: HS256 JWTs (`sub` = user id, `exp`), checked at upgrade.
//!
//! The secret comes from `--auth-secret-file`, else `SHARDGATE_AUTH_SECRET`, else a random
//! secret created once in the data directory (mode 0600), so the gateway is secure by
//! default and still runs out of the box; `shardgate token <user>` mints with the same one.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::secret::{check_len, read_secret_file, SecretError, SecretKind};

pub const SECRET_ENV: &str = "SHARDGATE_AUTH_SECRET";
const SECRET_FILE_NAME: &str = "auth-secret";
/// The shortest HMAC secret accepted: as long as the hash (RFC 7518 §3.2 asks at least
/// that much key for HS256).
pub const MIN_SECRET_LEN: usize = 32;

/// A user id: 1–64 characters of `[A-Za-z0-9_.@-]` (so it never needs escaping in JSON).
pub fn is_valid_user_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
}

/// What a token must say besides who and until when (all optional): the audience and
/// issuer it was minted for, and how far ahead its expiry may lie.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRules {
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub max_lifetime: Option<Duration>,
}

/// Who a verified token names, and the rooms it lets the user join (`None`: the token
/// has no `rooms` claim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub rooms: Option<RoomGrants>,
    /// The token carries `"admin": true`: it may watch the dashboard.
    pub admin: bool,
}

/// The rooms a token grants: exact names, and prefixes (`team-*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomGrants {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl From<Vec<String>> for RoomGrants {
    fn from(patterns: Vec<String>) -> Self {
        let mut grants = RoomGrants::default();
        for p in patterns {
            match p.strip_suffix('*') {
                Some(prefix) => grants.prefixes.push(prefix.to_string()),
                None => grants.exact.push(p),
            }
        }
        grants
    }
}

impl RoomGrants {
    pub fn allows(&self, room: &str) -> bool {
        self.exact.iter().any(|r| r == room) || self.prefixes.iter().any(|p| room.starts_with(p.as_str()))
    }
}

impl TokenRules {
    /// From `--token-audience`, `--token-issuer` and `--max-token-lifetime`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        TokenRules {
            audience: config.token_audience.clone(),
            issuer: config.token_issuer.clone(),
            max_lifetime: config.max_token_lifetime,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    /// The rooms the user may join: exact names, or prefixes ending in `*`. Without the
    /// claim, `--rooms-closed-by-default` decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rooms: Option<Vec<String>>,
    /// May watch the dashboard's live feed (`token --admin`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    admin: bool,
}

/// Where the secret came from, for the start-up message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env,
    /// Created (or found) in the data directory.
    DataDir {
        path: PathBuf,
        created: bool,
    },
}

pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    pub source: SecretSource,
    rules: TokenRules,
}

impl Authenticator {
    pub fn from_secret(secret: &[u8], source: SecretSource, rules: TokenRules) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        let mut required = vec!["exp", "sub"];
        if let Some(aud) = &rules.audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        if let Some(iss) = &rules.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        // Tokens are minted by this cluster's own clock: no grace after `exp`.
        validation.leeway = 0;
        Authenticator {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
            source,
            rules,
        }
    }

    /// Loads the secret the way `serve` and `token` both do.
    pub fn load(secret_file: Option<&Path>, data_dir: &Path, rules: TokenRules) -> Result<Self, AuthError> {
        Self::load_with(secret_file, std::env::var(SECRET_ENV).ok(), data_dir, rules)
    }

    /// `load`, with the value of `SHARDGATE_AUTH_SECRET` given.
    fn load_with(
        secret_file: Option<&Path>,
        env_secret: Option<String>,
        data_dir: &Path,
        rules: TokenRules,
    ) -> Result<Self, AuthError> {
        if let Some(path) = secret_file {
            let secret = read_secret(path)?;
            return Ok(Self::from_secret(
                &secret,
                SecretSource::File(path.to_path_buf()),
                rules,
            ));
        }
        if let Some(secret) = env_secret {
            let secret = secret.trim();
            if secret.is_empty() {
                return Err(AuthError::EmptyEnv);
            }
            check_len(secret.as_bytes(), TOKEN_SECRET, || format!("${SECRET_ENV}"))?;
            return Ok(Self::from_secret(secret.as_bytes(), SecretSource::Env, rules));
        }
        let path = data_dir.join(SECRET_FILE_NAME);
        let created = !path.exists();
        if created {
            create_secret(&path)?;
        }
        let secret = read_secret(&path)?;
        let source = SecretSource::DataDir { path, created };
        Ok(Self::from_secret(&secret, source, rules))
    }

    /// The user a token names, and the rooms it grants, if it is well formed, correctly
    /// signed and not expired.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?;
        if !is_valid_user_id(&data.claims.sub) {
            return Err(AuthError::BadSubject);
        }
        if let Some(max) = self.rules.max_lifetime {
            // A token valid for longer than the policy allows was not minted under it.
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            if data.claims.exp > (now + max).as_secs() {
                return Err(AuthError::TooLongLived(max));
            }
        }
        Ok(Identity {
            user: data.claims.sub,
            rooms: data.claims.rooms.map(RoomGrants::from),
            admin: data.claims.admin,
        })
    }

    /// A token for `user` that expires after `ttl` (and grants `rooms`, when given).
    pub fn mint(&self, user: &str, ttl: Duration, rooms: Option<Vec<String>>) -> Result<String, AuthError> {
        self.mint_with(user, ttl, rooms, false)
    }

    /// `mint`, and with `admin` the dashboard's claim.
    pub fn mint_with(
        &self,
        user: &str,
        ttl: Duration,
        rooms: Option<Vec<String>>,
        admin: bool,
    ) -> Result<String, AuthError> {
        if !is_valid_user_id(user) {
            return Err(AuthError::BadUser(user.to_string()));
        }
        if let Some(max) = self.rules.max_lifetime.filter(|max| ttl > *max) {
            return Err(AuthError::TooLongLived(max));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let claims = Claims {
            sub: user.to_string(),
            exp: (now + ttl).as_secs(),
            aud: self.rules.audience.clone(),
            iss: self.rules.issuer.clone(),
            rooms,
            admin,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }
}

/// The token secret: who can read it can mint tokens.
const TOKEN_SECRET: SecretKind = SecretKind {
    what: "auth secret",
    risk: "can mint tokens",
    min_len: MIN_SECRET_LEN,
};

fn read_secret(path: &Path) -> Result<Vec<u8>, AuthError> {
    Ok(read_secret_file(path, TOKEN_SECRET)?)
}

/// Writes 32 random bytes (hex) to `path`, readable by the owner only.
fn create_secret(path: &Path) -> Result<(), AuthError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| AuthError::io("cannot create the data directory", dir, e))?;
    }
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(AuthError::NoRandomness)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| AuthError::io("cannot create the auth secret", path, e))?;
    file.write_all(hex.as_bytes())
        .map_err(|e| AuthError::io("cannot write", path, e))?;
    Ok(())
}

/// Why the secret could not be had, or a token made or accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{SECRET_ENV} is set but empty")]
    EmptyEnv,
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no randomness for the auth secret: {0}")]
    NoRandomness(getrandom::Error),
    #[error("{0:?} is not a valid user id (1-64 of A-Z a-z 0-9 _ . @ -)")]
    BadUser(String),
    #[error("sub is not a valid user id")]
    BadSubject,
    #[error("the token is valid for longer than --max-token-lifetime ({0:?})")]
    TooLongLived(Duration),
    #[error(transparent)]
    Token(#[from] jsonwebtoken::errors::Error),
}

impl AuthError {
    fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        AuthError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::from_secret(b"test-secret", SecretSource::Env, TokenRules::default())
    }

    #[test]
    fn user_id_rules() {
        for ok in ["a", "user-b", "x.y@z_1", &"a".repeat(64)] {
            assert!(is_valid_user_id(ok), "{ok}");
        }
        for bad in ["", "has space", "quote\"", "é", &"a".repeat(65)] {
            assert!(!is_valid_user_id(bad), "{bad}");
        }
    }

    #[test]
    fn minted_tokens_verify_and_others_do_not() {
        let a = auth();
        let token = a.mint("user-a", Duration::from_secs(60), None).unwrap();
        assert_eq!(a.verify(&token).unwrap().user, "user-a");
        let other = Authenticator::from_secret(b"another-secret", SecretSource::Env, TokenRules::default());
        assert!(other.verify(&token).is_err(), "bad signature");
        assert!(a.verify("not.a.token").is_err());
        assert!(a.verify("").is_err());
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "user-a".into(),
                exp: 1_000,
                aud: None,
                iss: None,
                rooms: None,
                admin: false,
            },
            &EncodingKey::from_secret(b"test-secret"),
        )
        .unwrap();
        assert!(a.verify(&expired).unwrap_err().to_string().contains("Expired"));
        let bad_sub = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "no spaces allowed".into(),
                aud: None,
                iss: None,
                rooms: None,
                admin: false,
                exp: u64::MAX / 2,
            },
            &EncodingKey::from_secret(b"test-secret"),
        )
        .unwrap();
        assert!(a.verify(&bad_sub).is_err());
        assert!(a.mint("bad user", Duration::from_secs(1), None).is_err());
    }

    #[test]
    fn only_a_token_minted_as_admin_carries_the_claim() {
        let a = Authenticator::from_secret(b"test-secret", SecretSource::Env, TokenRules::default());
        let plain = a.mint("ops", Duration::from_secs(60), None).unwrap();
        let admin = a.mint_with("ops", Duration::from_secs(60), None, true).unwrap();
        assert!(!a.verify(&plain).unwrap().admin);
        assert!(a.verify(&admin).unwrap().admin);
    }

    #[test]
    fn secret_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("shardgate-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Authenticator::load_with(None, None, &dir, TokenRules::default()).unwrap();
        let path = dir.join(SECRET_FILE_NAME);
        assert_eq!(
            first.source,
            SecretSource::DataDir {
                path: path.clone(),
                created: true
            }
        );
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let token = first.mint("u", Duration::from_secs(60), None).unwrap();
        let second = Authenticator::load_with(None, None, &dir, TokenRules::default()).unwrap();
        let env = Authenticator::load_with(
            None,
            Some("a-secret-from-the-environment-of-32+bytes".into()),
            &dir,
            TokenRules::default(),
        )
        .unwrap();
        assert_eq!(env.source, SecretSource::Env);
        assert_eq!(
            second.source,
            SecretSource::DataDir {
                path: path.clone(),
                created: false
            }
        );
        assert_eq!(second.verify(&token).unwrap().user, "u");
        let from_file = Authenticator::load_with(
            Some(&path),
            Some("ignored".into()),
            Path::new("/nonexistent"),
            TokenRules::default(),
        )
        .unwrap();
        assert_eq!(from_file.verify(&token).unwrap().user, "u");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_rooms_claim_grants_exact_rooms_and_prefixes() {
        let a = auth();
        let token = a
            .mint(
                "alice",
                Duration::from_secs(60),
                Some(vec!["lobby".into(), "team-*".into()]),
            )
            .unwrap();
        let grants = a.verify(&token).unwrap().rooms.expect("the claim is there");
        assert!(grants.allows("lobby") && grants.allows("team-a") && grants.allows("team-"));
        assert!(!grants.allows("lobby2") && !grants.allows("other") && !grants.allows("tea"));
        let none = a.mint("bob", Duration::from_secs(60), None).unwrap();
        assert_eq!(a.verify(&none).unwrap().rooms, None);
    }

    #[test]
    fn audience_issuer_and_lifetime_are_checked_when_set() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let with = |audience: Option<&str>, issuer: Option<&str>, max: Option<u64>| {
            let rules = TokenRules {
                audience: audience.map(String::from),
                issuer: issuer.map(String::from),
                max_lifetime: max.map(Duration::from_secs),
            };
            Authenticator::from_secret(secret, SecretSource::Env, rules)
        };
        let plain = with(None, None, None);
        let strict = with(Some("chat"), Some("login.example"), Some(3600));
        let token = strict.mint("alice", Duration::from_secs(600), None).unwrap();
        assert_eq!(strict.verify(&token).unwrap().user, "alice");
        // A token without them, or for another audience or issuer, is refused.
        let bare = plain.mint("alice", Duration::from_secs(600), None).unwrap();
        assert!(strict.verify(&bare).is_err(), "no aud and iss");
        let other_aud = with(Some("admin"), Some("login.example"), None).mint("alice", Duration::from_secs(600), None);
        assert!(strict.verify(&other_aud.unwrap()).is_err(), "another audience");
        let other_iss = with(Some("chat"), Some("elsewhere"), None).mint("alice", Duration::from_secs(600), None);
        assert!(strict.verify(&other_iss.unwrap()).is_err(), "another issuer");
        // One valid for a day is refused by a gateway that allows an hour, and not minted.
        let long = with(Some("chat"), Some("login.example"), None).mint("alice", Duration::from_secs(86_400), None);
        let e = strict.verify(&long.unwrap()).unwrap_err().to_string();
        assert!(e.contains("max-token-lifetime"), "{e}");
        assert!(strict.mint("alice", Duration::from_secs(86_400), None).is_err());
    }

    #[test]
    fn short_secrets_and_secrets_others_may_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("shardgate-auth-weak-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        let refusal = |file: Option<&Path>, env: Option<&str>| match Authenticator::load_with(
            file,
            env.map(String::from),
            &dir,
            TokenRules::default(),
        ) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        };
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let long = "0123456789abcdef0123456789abcdef";
        write(long, 0o600);
        assert!(Authenticator::load_with(Some(&path), None, &dir, TokenRules::default()).is_ok());
        write("short-secret", 0o600);
        let e = refusal(Some(&path), None);
        assert!(e.contains("is 12 bytes; at least 32"), "{e}");
        write(long, 0o644);
        let e = refusal(Some(&path), None);
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        write(long, 0o640);
        assert!(
            Authenticator::load_with(Some(&path), None, &dir, TokenRules::default()).is_err(),
            "group may read it"
        );
        let e = refusal(None, Some("too-short"));
        assert!(e.contains("$SHARDGATE_AUTH_SECRET is 9 bytes"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
