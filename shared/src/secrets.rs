//! Reading secret files (the cluster secret, JWT keys).
//!
//! A secret is the file's bytes less one trailing newline, so `echo`, an editor and
//! `head -c 32 /dev/urandom | base64 > F` all make usable files. The bytes are never logged.

use std::path::Path;

use crate::token::TokenError;

/// The secret in `path`; an error for a file that cannot be read or is empty.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, TokenError> {
    let mut bytes = std::fs::read(path).map_err(|source| TokenError::KeyFile {
        path: path.to_owned(),
        source,
    })?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(TokenError::EmptyKey {
            path: path.to_owned(),
        });
    }
    warn_if_readable_by_others(path);
    Ok(bytes)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        if metadata.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(),
                "a secret file is readable by other users; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_not_part_of_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "abc\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), b"abc");
        std::fs::write(&path, "abc\r\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), b"abc");
        std::fs::write(&path, "abc\n\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), b"abc\n");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            read_secret_file(&path),
            Err(TokenError::EmptyKey { .. })
        ));
        assert!(read_secret_file(&dir.path().join("missing")).is_err());
    }
}
