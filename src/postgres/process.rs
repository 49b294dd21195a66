//! The server process: how it is started (as whom, with which environment), the
//! thread that supervises it, and the log lines quoted when it fails.

use super::user::RunAs;
use super::LOG_TAIL_LINES;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Output of this run only, so an error does not quote an older run's failure.
pub(super) fn log_tail(path: &Path, offset: u64) -> String {
    let mut text = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    if text.trim().is_empty() {
        return "(empty)".to_string();
    }
    last_lines(&text)
}

pub(super) fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// The server runs as another user and needs none of the daemon's environment, which can
/// hold secrets (tokens in BOTFLOW_* overrides); only time zone and locale variables pass.
pub(super) fn minimal_env(cmd: &mut Command) {
    cmd.env_clear();
    for (key, value) in std::env::vars_os() {
        let keep = key.to_str().is_some_and(|k| {
            matches!(k, "PATH" | "TZ" | "LANG" | "LANGUAGE") || k.starts_with("LC_")
        });
        if keep {
            cmd.env(key, value);
        }
    }
}

pub(super) fn describe<'a>(program: &OsStr, args: impl Iterator<Item = &'a OsStr>) -> String {
    let mut s = program.to_string_lossy().into_owned();
    for a in args {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '\'', '"']) || a.ends_with('=') {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// What the supervising thread needs to start the server.
pub(super) struct ServerSpec {
    pub(super) program: PathBuf,
    pub(super) args: Vec<OsString>,
    pub(super) cwd: PathBuf,
    pub(super) run_as: Option<RunAs>,
    pub(super) log: File,
}

impl ServerSpec {
    pub(super) fn describe(&self) -> String {
        describe(
            self.program.as_os_str(),
            self.args.iter().map(OsString::as_os_str),
        )
    }

    pub(super) fn command(self) -> io::Result<Command> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(self.log.try_clone()?)
            .stderr(self.log)
            // Not the caller's cwd: the postgres user may be unable to reach it, and
            // postgres resolves its own executable path relative to it.
            .current_dir(&self.cwd)
            // Its own process group: a Ctrl-C at the terminal goes to the daemon alone, which
            // drains and flushes into the database before it stops the server itself.
            .process_group(0);
        minimal_env(&mut cmd);
        if let Some(user) = &self.run_as {
            // std sets the groups (to none: it calls setgroups(0) when it drops from root
            // without explicit groups), then gid, then uid, and only then runs pre_exec.
            cmd.uid(user.uid).gid(user.gid);
        }
        let parent = unsafe { libc::getpid() };
        let dropping = self.run_as.is_some();
        unsafe {
            cmd.pre_exec(move || {
                // Runs after the uid switch, which is what makes it stick: the kernel clears
                // the parent-death signal whenever the credentials change.
                if dropping && libc::getgroups(0, std::ptr::null_mut()) > 0 {
                    // Must not happen (see above); never run the server with root's groups.
                    return Err(io::Error::from_raw_os_error(libc::EPERM));
                }
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGINT as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The launcher may have died between fork and prctl: then no signal comes.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

/// The server process, owned by a thread that lives exactly as long as the server.
///
/// The parent-death signal fires when the *thread* that forked the child exits, not the
/// process; so a dedicated thread spawns the server and waits for it, and the signal arrives
/// only when the whole launcher dies (`kill -9` included).
pub(super) struct Supervised {
    pub(super) pid: i32,
    pub(super) exit: Arc<(Mutex<Option<String>>, Condvar)>,
    pub(super) thread: Option<JoinHandle<()>>,
}

impl Supervised {
    pub(super) fn spawn(spec: ServerSpec) -> io::Result<Supervised> {
        let exit = Arc::new((Mutex::new(None), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let exit2 = Arc::clone(&exit);
        let thread = std::thread::Builder::new()
            .name("embedded-postgres".into())
            .spawn(move || {
                let child = spec.command().and_then(|mut c| c.spawn());
                let mut child = match child {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(child.id() as i32));
                let status = match child.wait() {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("waiting for it failed: {e}"),
                };
                let (lock, cvar) = &*exit2;
                *lock.lock().unwrap() = Some(status);
                cvar.notify_all();
            })?;
        match rx.recv() {
            Ok(Ok(pid)) => Ok(Supervised {
                pid,
                exit,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other(
                    "the thread starting postgres ended without a word",
                ))
            }
        }
    }

    pub(super) fn exit_status(&self) -> Option<String> {
        self.exit.0.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for the server to exit; returns its status if it has.
    pub(super) fn wait_exit(&self, timeout: Duration) -> Option<String> {
        let (lock, cvar) = &*self.exit;
        let guard = lock.lock().unwrap();
        let (guard, _) = cvar
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .unwrap();
        guard.clone()
    }

    /// Signals the server (or its whole process group) unless it has exited already.
    pub(super) fn signal(&self, sig: libc::c_int, whole_group: bool) -> io::Result<()> {
        // Only while the child is unreaped is the pid certainly still ours.
        let guard = self.exit.0.lock().unwrap();
        if guard.is_some() {
            return Ok(());
        }
        let target = if whole_group { -self.pid } else { self.pid };
        if unsafe { libc::kill(target, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(super) fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
