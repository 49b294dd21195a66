//! Finding the installed server: `postgres` and `initdb` from one directory of PATH,
//! else the highest version under the search roots.

use super::EmbeddedError;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The `postgres` and `initdb` executables of one installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Binaries {
    pub postgres: PathBuf,
    pub initdb: PathBuf,
}

/// Finds `postgres` and `initdb` in one directory of `path_env` (a PATH value), else in the
/// highest version `<root>/<version>/bin` under `search_roots`. Both must come from the same
/// directory: an initdb of another major version makes a cluster the server cannot read.
pub(crate) fn find_binaries(
    path_env: Option<&OsStr>,
    search_roots: &[&Path],
) -> Result<Binaries, EmbeddedError> {
    let in_dir = |dir: &Path| {
        let postgres = dir.join("postgres");
        let initdb = dir.join("initdb");
        (is_executable(&postgres) && is_executable(&initdb))
            .then_some(Binaries { postgres, initdb })
    };
    if let Some(path) = path_env {
        for dir in std::env::split_paths(path) {
            // An empty PATH entry means the current directory; a server binary found
            // there by accident is not what anyone means.
            if dir.as_os_str().is_empty() || !dir.is_absolute() {
                continue;
            }
            if let Some(found) = in_dir(&dir) {
                return Ok(found);
            }
        }
    }
    let mut best: Option<(Vec<u32>, Binaries)> = None;
    for root in search_roots {
        let Ok(entries) = fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = parse_version(&name) else {
                continue;
            };
            let Some(found) = in_dir(&entry.path().join("bin")) else {
                continue;
            };
            if best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, found));
            }
        }
    }
    best.map(|(_, b)| b)
        .ok_or_else(|| EmbeddedError::NoBinaries {
            searched: search_roots
                .iter()
                .map(|r| format!("{}/*/bin", r.display()))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// "15" -> [15], "9.6" -> [9, 6]; anything else is not a version directory.
pub(super) fn parse_version(name: &OsStr) -> Option<Vec<u32>> {
    name.to_str()?.split('.').map(|p| p.parse().ok()).collect()
}

pub(super) fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
