//! The cluster on disk: `initdb` on first use, and the postmaster a previous run left
//! behind (still shutting down after a kill, or someone else's).

use super::binaries::Binaries;
use super::process::{describe, last_lines, minimal_env};
use super::user::RunAs;
use super::{io_err, EmbeddedError, EmbeddedOptions, USER};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(super) fn initdb(
    binaries: &Binaries,
    base: &Path,
    pgdata: &Path,
    run_as: Option<&RunAs>,
    opts: &EmbeddedOptions,
    log: &mut File,
) -> Result<(), EmbeddedError> {
    match fs::read_dir(pgdata) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(EmbeddedError::NotADataDir {
                    path: pgdata.to_path_buf(),
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("reading", pgdata)(e)),
    }
    // initdb builds the cluster beside its final place and we rename it on success, so a
    // launcher killed during initdb never leaves a half-made PGDATA that looks finished.
    let scratch = base.join("data.initdb");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).map_err(io_err("removing", &scratch))?;
    }
    let mut cmd = Command::new(&binaries.initdb);
    cmd.arg("-D")
        .arg(&scratch)
        .args([
            &format!("--username={USER}"),
            "--auth-local=trust",
            "--auth-host=reject",
            "--encoding=UTF8",
            "--no-locale",
        ])
        .stdin(Stdio::null())
        .current_dir(base);
    minimal_env(&mut cmd);
    if opts.fast_unsafe {
        cmd.arg("--no-sync");
    }
    if let Some(user) = run_as {
        cmd.uid(user.uid).gid(user.gid);
    }
    let command = describe(cmd.get_program(), cmd.get_args());
    tracing::info!("initialising the embedded PostgreSQL cluster: {command}");
    let out = cmd.output().map_err(|source| EmbeddedError::Spawn {
        command: command.clone(),
        source,
    })?;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    let _ = writeln!(log, "{command}\n{output}");
    if !out.status.success() {
        return Err(EmbeddedError::Initdb {
            command,
            status: out.status,
            output: last_lines(&output),
        });
    }
    if pgdata.exists() {
        // Empty (checked above): rename() cannot replace it portably.
        fs::remove_dir(pgdata).map_err(io_err("removing", pgdata))?;
    }
    fs::rename(&scratch, pgdata).map_err(io_err("moving the new cluster to", pgdata))?;
    Ok(())
}

/// If the postmaster of a previous run is still alive (our daemon was killed and the server
/// is still in its shutdown), waits for it: postgres itself would refuse to start.
pub(super) fn wait_for_previous_server(pgdata: &Path, wait: Duration) -> Result<(), EmbeddedError> {
    let pid_file = pgdata.join("postmaster.pid");
    let started = Instant::now();
    let mut announced = false;
    loop {
        let Some(pid) = read_postmaster_pid(&pid_file) else {
            return Ok(());
        };
        match postmaster_state(pid, pgdata) {
            PidState::Gone => return Ok(()),
            PidState::Other => {
                // The pid was reused by an unrelated process (common in containers after a
                // restart); postgres would mistake it for a live postmaster and refuse to
                // start. Its shared-memory interlock still guards against orphaned backends.
                tracing::warn!(pid, "removing stale {}", pid_file.display());
                match fs::remove_file(&pid_file) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(io_err("removing", &pid_file)(e)),
                }
            }
            PidState::Ours => {
                if started.elapsed() >= wait {
                    return Err(EmbeddedError::AlreadyRunning {
                        pid,
                        pgdata: pgdata.to_path_buf(),
                        waited: wait,
                    });
                }
                if !announced {
                    tracing::info!(pid, "waiting for the previous embedded PostgreSQL to exit");
                    announced = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Stops a postmaster serving `pgdata` that no live process owns: fast shutdown, then
/// immediate shutdown if it does not exit within `wait`. Answers whether one was found.
pub(super) fn stop_orphaned_server(pgdata: &Path, wait: Duration) -> bool {
    let Some(pid) = read_postmaster_pid(&pgdata.join("postmaster.pid")) else { return false };
    if !matches!(postmaster_state(pid, pgdata), PidState::Ours) {
        return false;
    }
    tracing::warn!(pid, pgdata = %pgdata.display(), "stopping an embedded PostgreSQL that no daemon owns (left by one killed, or restarted from outside)");
    // SAFETY: plain signals to a postmaster serving our own data directory.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let started = Instant::now();
    while matches!(postmaster_state(pid, pgdata), PidState::Ours) {
        if started.elapsed() >= wait {
            tracing::warn!(pid, "it ignored fast shutdown for {wait:?}; asking for an immediate one");
            unsafe { libc::kill(pid, libc::SIGQUIT) };
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

pub(super) fn read_postmaster_pid(pid_file: &Path) -> Option<i32> {
    let text = fs::read_to_string(pid_file).ok()?;
    text.lines()
        .next()?
        .trim()
        .parse()
        .ok()
        .filter(|&p: &i32| p > 0)
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum PidState {
    /// No such process.
    Gone,
    /// A live process working in this PGDATA: a postmaster (or one of its backends).
    Ours,
    /// A live process that is something else, or a zombie.
    Other,
}

pub(super) fn postmaster_state(pid: i32, pgdata: &Path) -> PidState {
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !alive {
        return PidState::Gone;
    }
    // The postmaster chdir()s into PGDATA. Zombies have no cwd, and a process of another
    // user whose cwd we cannot read cannot be serving a cluster we own.
    match fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) if cwd == pgdata => PidState::Ours,
        _ => PidState::Other,
    }
}
