//! Accept loops for the Unix socket and TCP listeners. Each accepted socket becomes a
//! Connection actor on one of the worker arbiters, in turn, so connections spread over
//! the cores. Sockets are moved between threads as std sockets and registered with the
//! target arbiter's reactor there, so their I/O is driven by the thread that uses them.

use super::budget::{Refused, Slot};
use super::connection::{Connection, IngestDeps};
use actix::ArbiterHandle;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Tcp { addr: String, source: std::io::Error },
    #[error("cannot listen on the Unix socket {path}: {source}")]
    Unix { path: PathBuf, source: std::io::Error },
    #[error("another process is already listening on the Unix socket {0}")]
    UnixInUse(PathBuf),
}

/// Spreads connections over the worker arbiters.
#[derive(Clone)]
pub struct Workers {
    arbiters: Arc<Vec<ArbiterHandle>>,
    next: Arc<AtomicUsize>,
}

impl Workers {
    pub fn new(arbiters: Vec<ArbiterHandle>) -> Workers {
        Workers { arbiters: Arc::new(arbiters), next: Arc::new(AtomicUsize::new(0)) }
    }

    pub fn handles(&self) -> Vec<ArbiterHandle> {
        self.arbiters.as_ref().clone()
    }

    fn pick(&self) -> &ArbiterHandle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        &self.arbiters[i]
    }
}

pub fn bind_tcp(addr: &str) -> Result<std::net::TcpListener, ListenError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| ListenError::Tcp { addr: addr.into(), source })?;
    l.set_nonblocking(true).map_err(|source| ListenError::Tcp { addr: addr.into(), source })?;
    Ok(l)
}

/// Binds the Unix socket, removing a stale socket file left by a process that died,
/// but refusing to steal one that is in use.
pub fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener, ListenError> {
    let err = |source| ListenError::Unix { path: path.to_path_buf(), source };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ListenError::UnixInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// A bound listener, either kind.
pub enum Listener {
    /// With TLS when an acceptor is given.
    Tcp(std::net::TcpListener, Option<tokio_rustls::TlsAcceptor>),
    /// With its path, removed when the listener stops.
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// An accepted socket on its way to a worker arbiter.
enum Accepted {
    Tcp(std::net::TcpStream, Option<tokio_rustls::TlsAcceptor>),
    Unix(std::os::unix::net::UnixStream),
}

impl Accepted {
    /// Registers the socket with the current arbiter and starts its Connection actor.
    fn start(self, peer: String, slot: Result<Slot, Refused>, deps: Arc<IngestDeps>, shutdown: &CancellationToken) {
        let started = match self {
            Accepted::Tcp(s, None) => tokio::net::TcpStream::from_std(s).map(|s| {
                let (r, w) = s.into_split();
                Connection::start(r, w, peer, slot, deps, shutdown);
            }),
            // The handshake runs on the worker, not in the accept loop.
            Accepted::Tcp(s, Some(acceptor)) => tokio::net::TcpStream::from_std(s).map(|s| {
                let shutdown = shutdown.clone();
                actix_rt::spawn(async move {
                    if let Some(tls) = crate::tls::accept(&acceptor, s, &peer, deps.handshake_timeout).await {
                        let (r, w) = tokio::io::split(tls);
                        Connection::start(r, w, peer, slot, deps, &shutdown);
                    }
                });
            }),
            Accepted::Unix(s) => tokio::net::UnixStream::from_std(s).map(|s| {
                let (r, w) = s.into_split();
                Connection::start(r, w, peer, slot, deps, shutdown);
            }),
        };
        if let Err(error) = started {
            tracing::warn!(%error, "cannot register an accepted connection");
        }
    }
}

/// Accepts clients until `shutdown`, each becoming a Connection actor on the next
/// worker arbiter; a Unix socket's file is removed at the end.
pub async fn serve(listener: Listener, workers: Workers, deps: Arc<IngestDeps>, shutdown: CancellationToken) {
    enum Bound {
        Tcp(tokio::net::TcpListener, Option<tokio_rustls::TlsAcceptor>),
        Unix(tokio::net::UnixListener, PathBuf),
    }
    let registered = match listener {
        Listener::Tcp(l, tls) => tokio::net::TcpListener::from_std(l).map(|l| Bound::Tcp(l, tls)),
        Listener::Unix(l, path) => tokio::net::UnixListener::from_std(l).map(|l| Bound::Unix(l, path)),
    };
    let bound = match registered {
        Ok(b) => b,
        Err(error) => {
            tracing::error!(%error, "cannot register a listener");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = async {
                match &bound {
                    Bound::Tcp(l, tls) => l.accept().await.and_then(|(s, peer)| {
                        let _ = s.set_nodelay(true);
                        Ok((Accepted::Tcp(s.into_std()?, tls.clone()), peer.to_string(), Some(peer.ip())))
                    }),
                    Bound::Unix(l, path) => l
                        .accept()
                        .await
                        .and_then(|(s, _)| Ok((Accepted::Unix(s.into_std()?), format!("unix:{}", path.display()), None))),
                }
            } => a,
        };
        match accepted {
            Ok((socket, peer, ip)) => {
                // Counted here, before the connection costs anything more than its socket.
                let slot = deps.budget.admit(ip);
                let deps = deps.clone();
                let shutdown = shutdown.clone();
                workers.pick().spawn_fn(move || socket.start(peer, slot, deps, &shutdown));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    if let Bound::Unix(_, path) = &bound {
        let _ = std::fs::remove_file(path);
    }
}
