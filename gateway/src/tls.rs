//! TLS at the gateway, so it can face the internet without another proxy in front of it.
//!
//! Certificates and keys are PEM files (what Let's Encrypt, cert-manager and `openssl` write).
//! HTTP/2 is offered over ALPN next to HTTP/1.1: a browser opens at most six HTTP/1.1
//! connections to one origin and every open EventSource holds one of them, so a page with
//! several live streams needs HTTP/2, which carries them all on one connection. Browsers speak
//! HTTP/2 only over TLS, which is why the plain listener stays HTTP/1.1.
//!
//! The crypto provider is *ring*, named here rather than taken from a process-wide default, so
//! what the gateway runs with does not depend on which other crates enable which provider.

use std::{
    fs::File,
    io::BufReader,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio_rustls::rustls::{self, pki_types::CertificateDer, ServerConfig};

/// The protocols offered over ALPN, preferred first.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", .0.display())]
    NoKey(PathBuf),
    #[error("the certificate and key cannot be used: {0}")]
    Rejected(#[from] rustls::Error),
}

/// The server configuration for the certificate chain in `cert` (the server's certificate
/// first, then its intermediates) and the private key in `key`, offering [`ALPN_PROTOCOLS`].
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates(cert)?;
    let private_key = rustls_pemfile::private_key(&mut open(key)?)
        .map_err(|source| read_error(key, source))?
        .ok_or_else(|| TlsError::NoKey(key.to_owned()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)?;
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|name| name.to_vec()).collect();
    Ok(Arc::new(config))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| read_error(path, source))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(chain)
}

fn open(path: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| read_error(path, source))
}

fn read_error(path: &Path, source: std::io::Error) -> TlsError {
    TlsError::Read {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_without_pem_are_refused_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            server_config(&empty, &empty),
            Err(TlsError::NoCertificate(path)) if path == empty
        ));
        let error = server_config(&missing, &empty).unwrap_err();
        assert!(error.to_string().contains("missing.pem"), "{error}");
    }

    #[test]
    fn a_certificate_and_its_key_load_and_offer_h2_first() {
        let dir = tempfile::tempdir().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
        let config = server_config(&cert, &key).unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        // A key that does not belong to the certificate is refused.
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&key, other.key_pair.serialize_pem()).unwrap();
        assert!(matches!(
            server_config(&cert, &key),
            Err(TlsError::Rejected(_))
        ));
    }
}
