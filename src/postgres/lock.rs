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

impl LaunchLock {
    pub(super) fn acquire(path: &Path) -> Result<LaunchLock, EmbeddedError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err("opening", path))?;
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
