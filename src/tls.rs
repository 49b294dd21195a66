//! TLS configuration, shared by the ingest TCP listener (`ingest.tls_cert_file`,
//! `ingest.tls_key_file`), its clients (`botflow send --tls`) and the store's
//! connections to PostgreSQL (`database.tls_ca_file`); the configuration check loads
//! the same files through it.
//!
//! A TLS listener looks at a new connection's first byte before the handshake: a
//! client speaking plain protocol lines gets one plain `error` line saying TLS is
//! required, instead of a handshake failure it cannot read. Handshakes are bounded by
//! the handshake timeout, so a silent client holds nothing for long.
//!
//! A renewed certificate is picked up without a restart: every `CERT_RECHECK` a
//! thread of the listener looks at the files and reloads them when they changed. A
//! pair that does not load (a renewal half written, a key that does not match) is
//! logged once, the previous certificate is kept, and the load is tried again at each
//! look until it works. Handshakes only read the current certificate.

use crate::telemetry::metrics as m;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, pki_types, pki_types::pem::PemObject};

/// How often the listener looks whether the certificate files changed.
const CERT_RECHECK: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificates in {path}: {reason}")]
    Certs { path: String, reason: String },
    #[error("cannot read a private key in {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (a chain, or CA certificates), at least one.
pub fn read_certs(path: &Path) -> Result<Vec<pki_types::CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Certs { path: path.display().to_string(), reason };
    let certs = pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The server side: certificate chain and key from PEM files, reloaded when they change.
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let resolver = ReloadingCert::load(cert_file, key_file)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A certificate chain and its key, checked to belong together.
fn certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let certs = read_certs(cert_file)?;
    let key = pki_types::PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| TlsError::Key { path: key_file.display().to_string(), reason: e.to_string() })?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsError::Config(e.to_string()))
}

/// What tells a file changed: replaced (inode), rewritten (size, modification time).
/// `metadata` follows symlinks, so a swapped link target counts too.
type Fingerprint = Option<[(u64, u64, SystemTime); 2]>;

fn fingerprint(cert_file: &Path, key_file: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let one = |p: &Path| std::fs::metadata(p).ok().and_then(|m| Some((m.ino(), m.len(), m.modified().ok()?)));
    Some([one(cert_file)?, one(key_file)?])
}

/// Serves the certificate of the configured files, reloaded by a thread of its own.
#[derive(Debug)]
struct ReloadingCert {
    current: std::sync::RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<ReloadingCert>, TlsError> {
        let seen = fingerprint(cert_file, key_file);
        let cert = Arc::new(ReloadingCert { current: std::sync::RwLock::new(Arc::new(certified_key(cert_file, key_file)?)) });
        let watched = Arc::downgrade(&cert);
        let (cert_file, key_file) = (cert_file.to_path_buf(), key_file.to_path_buf());
        // A thread, not a task: file I/O (on a slow mount, say) must not hold up a
        // worker, and `check-config` builds an acceptor with no runtime running.
        let spawned = std::thread::Builder::new().name("tls-cert-reload".into()).spawn(move || {
            let mut seen = seen;
            let mut failing = false;
            loop {
                std::thread::sleep(CERT_RECHECK);
                // Gone with the listener (or the acceptor `check-config` built).
                let Some(cert) = watched.upgrade() else { return };
                let now = fingerprint(&cert_file, &key_file);
                if now.is_none() || (now == seen && !failing) {
                    continue;
                }
                let changed = now != seen;
                seen = now;
                match certified_key(&cert_file, &key_file) {
                    Ok(key) => {
                        *cert.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                        failing = false;
                        metrics::gauge!(m::TLS_CERT_FAILING).set(0.0);
                        metrics::counter!(m::TLS_CERT_RELOADS, "outcome" => "loaded").increment(1);
                        tracing::info!(cert = %cert_file.display(), "loaded the renewed TLS certificate");
                    }
                    Err(error) => {
                        failing = true;
                        metrics::gauge!(m::TLS_CERT_FAILING).set(1.0);
                        // Once per change; tried again at every look meanwhile (the
                        // files may have been read while being written).
                        if changed {
                            metrics::counter!(m::TLS_CERT_RELOADS, "outcome" => "failed").increment(1);
                            tracing::error!(%error, "the TLS certificate files changed but do not load; serving the previous certificate");
                        }
                    }
                }
            }
        });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the thread that reloads renewed TLS certificates");
        }
        Ok(cert)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The client side: trusts the certificates of `ca_file`, or the public web roots.
pub fn connector(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector, TlsError> {
    Ok(tokio_rustls::TlsConnector::from(Arc::new(client_config(ca_file)?)))
}

/// A client configuration trusting the certificates of `ca_file`, or the public web
/// roots (for `botflow send --tls` and for PostgreSQL).
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| TlsError::Certs { path: path.display().to_string(), reason: e.to_string() })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The first byte of every TLS handshake (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Runs the server side of the handshake on an accepted TCP socket; `None` when the
/// client is not speaking TLS, fails the handshake or is silent past `timeout` (each
/// logged and counted in `botflow_tls_handshake_failures_total{reason}`).
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    mut stream: tokio::net::TcpStream,
    peer: &str,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let fail = |reason: &'static str, detail: String| {
        metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(1);
        tracing::info!(%peer, reason, detail, "TLS handshake failed");
    };
    // One deadline for the first byte and the handshake together.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Err(_) => {
            fail("timeout", format!("no handshake within {} ms", timeout.as_millis()));
            return None;
        }
        Ok(Ok(0)) | Ok(Err(_)) => return None, // gone before saying anything
        Ok(Ok(_)) if first[0] != TLS_HANDSHAKE_RECORD => {
            let line = serde_json::json!({"op": "error", "error": {"code": "tls_required",
                "message": "this listener speaks TLS: connect with TLS (botflow send --tls)"}});
            let _ = tokio::time::timeout_at(deadline, stream.write_all(format!("{line}\n").as_bytes())).await;
            let _ = stream.shutdown().await;
            // Closing with the client's lines unread would reset the connection, and
            // the reset can discard the line above before the client reads it: take
            // what it sends until it closes (bounded in time and size).
            let mut sink = [0u8; 16 * 1024];
            let mut taken = 0usize;
            while taken < 1 << 20 {
                match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
                    Ok(Ok(n)) if n > 0 => taken += n,
                    _ => break,
                }
            }
            fail("plaintext", "the client sent protocol lines without TLS".into());
            return None;
        }
        Ok(Ok(_)) => {}
    }
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            fail("handshake", e.to_string());
            None
        }
        Err(_) => {
            fail("timeout", format!("the handshake did not finish within {} ms", timeout.as_millis()));
            None
        }
    }
}

/// The name a client checks the server's certificate against: the host part of
/// `host:port` (an IP address or a DNS name).
pub fn server_name(addr: &str) -> Result<pki_types::ServerName<'static>, String> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    pki_types::ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?} is not a host name: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_come_from_the_address() {
        assert_eq!(format!("{:?}", server_name("127.0.0.1:7000").unwrap()), format!("{:?}", pki_types::ServerName::try_from("127.0.0.1").unwrap()));
        assert!(server_name("chat.example.com:7000").is_ok());
        assert!(server_name("[::1]:7000").is_ok());
        assert!(server_name("bad name:1").is_err());
    }

    #[test]
    fn unreadable_or_empty_files_are_named() {
        let e = acceptor(Path::new("/nonexistent/cert.pem"), Path::new("/nonexistent/key.pem")).err().unwrap().to_string();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
        let dir = std::env::temp_dir().join(format!("botflow-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = connector(Some(&empty)).err().unwrap().to_string();
        assert!(e.contains("empty.pem") && e.contains("no CERTIFICATE"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
