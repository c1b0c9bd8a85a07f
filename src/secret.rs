//! Secrets kept in files: the token secret, the cluster key, NATS passwords. Each must be
//! readable by its owner only, and keys long enough to be keys.

use std::path::{Path, PathBuf};

/// Why a secret file cannot be used; every message says which secret and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the {what} {} may be read by group or others (mode {mode:o}): anyone who reads it {risk}; run chmod 600 {}",
        path.display(),
        path.display()
    )]
    NotPrivate {
        what: &'static str,
        risk: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("the {what} {} is empty", path.display())]
    Empty { what: &'static str, path: PathBuf },
    #[error(
        "the {what} from {from} is {len} bytes; at least {min} are needed \
         (make one with: head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > FILE; chmod 600 FILE)"
    )]
    Short {
        what: &'static str,
        from: String,
        len: usize,
        min: usize,
    },
}

/// A kind of secret: what it is called in messages, what leaking it allows, and the
/// fewest bytes it may have (0: any non-empty value, e.g. a password another system set).
#[derive(Debug, Clone, Copy)]
pub struct SecretKind {
    pub what: &'static str,
    pub risk: &'static str,
    pub min_len: usize,
}

/// The secret in `path` (surrounding white space aside), refused if group or others may
/// read the file, if it is empty, or if it is shorter than the kind's minimum.
pub fn read_secret_file(path: &Path, kind: SecretKind) -> Result<Vec<u8>, SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| SecretError::Io {
        what: kind.what,
        path: path.to_path_buf(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(SecretError::NotPrivate {
            what: kind.what,
            risk: kind.risk,
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    let text = std::fs::read(path).map_err(io)?;
    let secret = text.trim_ascii().to_vec();
    if secret.is_empty() {
        return Err(SecretError::Empty {
            what: kind.what,
            path: path.to_path_buf(),
        });
    }
    check_len(&secret, kind, || path.display().to_string())?;
    Ok(secret)
}

/// Refuses a secret shorter than the kind's minimum; `from` names where it came from.
pub fn check_len(secret: &[u8], kind: SecretKind, from: impl FnOnce() -> String) -> Result<(), SecretError> {
    if secret.len() < kind.min_len {
        return Err(SecretError::Short {
            what: kind.what,
            from: from(),
            len: secret.len(),
            min: kind.min_len,
        });
    }
    Ok(())
}
