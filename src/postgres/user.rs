//! The account the server runs as: initdb and postgres refuse root, so a root daemon
//! runs them as the `postgres` system user, whose access to the data directory is
//! checked (and given) here.

use super::{io_err, EmbeddedError};
use std::ffi::{CStr, CString};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The account the server processes run as.
#[derive(Debug, Clone)]
pub(super) struct RunAs {
    pub(super) name: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
}

pub(super) fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // getpwnam_r rather than getpwnam: the daemon has other threads.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        let name = unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned();
        return Some(RunAs {
            name,
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        });
    }
}

/// Whether `uid`/`gid` (with no supplementary groups, as the server runs) may search `dir`.
/// Only the first matching class of permission bits counts, as in the kernel.
pub(super) fn can_traverse(meta: &fs::Metadata, uid: u32, gid: u32) -> bool {
    let mode = meta.mode();
    if meta.uid() == uid {
        mode & 0o100 != 0
    } else if meta.gid() == gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// The first directory from `/` down to `dir` (inclusive) that `user` cannot search.
pub(super) fn first_unreachable(dir: &Path, user: &RunAs) -> Option<PathBuf> {
    let mut ancestors: Vec<&Path> = dir.ancestors().collect();
    ancestors.reverse();
    ancestors
        .into_iter()
        .find(|a| fs::metadata(a).map_or(true, |m| !can_traverse(&m, user.uid, user.gid)))
        .map(Path::to_path_buf)
}

/// Gives the tree under `path` to `user`, touching only entries that are not theirs yet so a
/// restart of a large cluster costs one walk and no writes.
pub(super) fn chown_tree(path: &Path, user: &RunAs) -> Result<(), EmbeddedError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("reading", path))?;
    if meta.uid() != user.uid || meta.gid() != user.gid {
        std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
            .map_err(io_err("changing the owner of", path))?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err("reading", path))? {
            let entry = entry.map_err(io_err("reading", path))?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

pub(super) fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}
