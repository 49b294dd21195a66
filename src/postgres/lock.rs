//! One launcher at a time on a data directory.

use super::{io_err, EmbeddedError};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Serialises launchers on one data_dir (two test processes, or a daemon started twice), so
/// they never run initdb into the same place. Released when dropped.
pub(super) struct LaunchLock {
    pub(super) _file: File,
}

/// Held by the process that owns the running server of a data_dir, for as long as it
/// owns it: a launcher that can take it knows a server it finds running there has no
/// live owner (left by a daemon killed with -9, or restarted from outside with
/// `pg_ctl`), and may stop it.
pub(super) struct OwnerLock {
    pub(super) _file: File,
}

impl OwnerLock {
    /// `None` while another process owns the server.
    pub(super) fn try_acquire(path: &Path) -> Result<Option<OwnerLock>, EmbeddedError> {
        let file = open_lock_file(path)?;
        loop {
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(OwnerLock { _file: file }));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(io_err("locking", path)(e)),
            }
        }
    }
}

impl LaunchLock {
    pub(super) fn acquire(path: &Path) -> Result<LaunchLock, EmbeddedError> {
        let file = open_lock_file(path)?;
        loop {
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(LaunchLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("locking", path)(e));
            }
        }
    }
}

/// A lock file, created if missing and never truncated (its content is not used).
fn open_lock_file(path: &Path) -> Result<File, EmbeddedError> {
    OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io_err("opening", path))
}
