//! The embedded PostgreSQL server: botflow's default when `database.url` is empty.
//!
//! This module owns everything about the private server that lives under
//! `data_dir/postgres`: finding the installed server binaries, `initdb` on first use,
//! starting `postgres` (as the `postgres` system user when we run as root, because
//! initdb and postgres refuse root), waiting until it accepts connections, creating
//! databases, and stopping it again. The test suite uses the same launcher (one server
//! per test process, one database per test), so start-up is kept quick and failures
//! name the path or command at fault.
//!
//! Layout under `data_dir`:
//! - `postgres/data`          the cluster (PGDATA), kept across restarts
//! - `postgres/run`           socket directory (mode 0700); the server listens on no TCP port
//! - `postgres/postgres.log`  initdb and server output, appended
//! - `postgres/launch.lock`   serialises concurrent launchers on the same directory

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The superuser role initdb creates; every connection uses it.
pub const USER: &str = "botflow";
/// The database botflow uses inside the embedded server.
pub const EMBEDDED_DB: &str = "botflow";
/// Only names the socket file (`.s.PGSQL.5432`): the server opens no TCP port.
pub const PORT: u16 = 5432;

/// Where distribution packages put versioned server binaries (`<root>/<version>/bin`).
/// Debian and Ubuntu do not put `postgres` or `initdb` on PATH.
const SEARCH_ROOTS: &[&str] = &["/usr/lib/postgresql"];

/// How long start() waits for a postmaster left over from a previous run to exit.
const PREVIOUS_SERVER_WAIT: Duration = Duration::from_secs(15);
/// How long start() waits for the new server to accept connections.
const READY_WAIT: Duration = Duration::from_secs(30);
/// How long stop() gives a fast shutdown before killing the server.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// Lines of postgres.log quoted in start-up errors.
const LOG_TAIL_LINES: usize = 20;
/// sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Options for [`EmbeddedPostgres::start`].
#[derive(Debug, Clone, Default)]
pub struct EmbeddedOptions {
    /// For tests: fsync, synchronous_commit and full_page_writes off, and initdb
    /// without syncing. Data may be lost on a machine crash; never for a daemon.
    pub fast_unsafe: bool,
    /// The port, which names the socket file; `None`: `PORT`.
    pub port: Option<u16>,
    /// Further server settings (`-c name=value`, after botflow's own, so they win):
    /// for tests that need the server on TCP, or with TLS.
    pub settings: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "no PostgreSQL server binaries found (looked for `postgres` and `initdb` on PATH and in \
         {searched}): install them (Debian/Ubuntu: `apt-get install postgresql`), or set \
         database.url (environment: BOTFLOW_DATABASE__URL) to use an existing PostgreSQL server"
    )]
    NoBinaries { searched: String },

    #[error(
        "running as root, but neither a `postgres` nor a `nobody` user exists to run the embedded \
         PostgreSQL (initdb and postgres refuse root): create a `postgres` system user, or set \
         database.url (environment: BOTFLOW_DATABASE__URL) to use an existing PostgreSQL server"
    )]
    NoUser,

    #[error(
        "the {user} user (uid {uid}), which runs the embedded PostgreSQL because initdb and \
         postgres refuse root, cannot reach {dir}: choose a data_dir outside it, or allow \
         traversal with `chmod o+x {dir}`",
        dir = dir.display()
    )]
    Unreachable {
        dir: PathBuf,
        user: String,
        uid: u32,
    },

    #[error(
        "the PostgreSQL socket path {path} is {len} bytes long, at most {MAX_SOCKET_PATH} fit in \
         a unix socket address: choose a shorter data_dir",
        path = path.display()
    )]
    SocketPathTooLong { path: PathBuf, len: usize },

    #[error("{action} {path}: {source}", path = path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{path} is neither empty nor a PostgreSQL data directory (it has no PG_VERSION): move it \
         away or choose another data_dir",
        path = path.display()
    )]
    NotADataDir { path: PathBuf },

    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },

    #[error("`{command}` failed ({status}):\n{output}")]
    Initdb {
        command: String,
        status: ExitStatus,
        output: String,
    },

    #[error(
        "a previous PostgreSQL server (pid {pid}) still runs on {pgdata}; waited {waited:?} for \
         it to exit: stop it (`kill -INT {pid}`) and start again",
        pgdata = pgdata.display()
    )]
    AlreadyRunning {
        pid: i32,
        pgdata: PathBuf,
        waited: Duration,
    },

    #[error("postgres exited during start-up ({status}); last lines of {log}:\n{tail}", log = log.display())]
    Exited {
        status: String,
        log: PathBuf,
        tail: String,
    },

    #[error(
        "postgres did not accept connections in {socket_dir} within {waited:?}; last lines of \
         {log}:\n{tail}",
        socket_dir = socket_dir.display(),
        log = log.display()
    )]
    NotReady {
        socket_dir: PathBuf,
        waited: Duration,
        log: PathBuf,
        tail: String,
    },

    #[error("connecting to the embedded PostgreSQL ({url}): {source}")]
    Connect {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("creating database {dbname:?} in the embedded PostgreSQL: {source}")]
    CreateDatabase {
        dbname: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("signalling postgres (pid {pid}): {source}")]
    Signal {
        pid: i32,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> EmbeddedError + 'a {
    move |source| EmbeddedError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

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
fn parse_version(name: &OsStr) -> Option<Vec<u32>> {
    name.to_str()?.split('.').map(|p| p.parse().ok()).collect()
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The account the server processes run as.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: u32,
    gid: u32,
}

fn lookup_user(name: &str) -> Option<RunAs> {
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
fn can_traverse(meta: &fs::Metadata, uid: u32, gid: u32) -> bool {
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
fn first_unreachable(dir: &Path, user: &RunAs) -> Option<PathBuf> {
    let mut ancestors: Vec<&Path> = dir.ancestors().collect();
    ancestors.reverse();
    ancestors
        .into_iter()
        .find(|a| fs::metadata(a).map_or(true, |m| !can_traverse(&m, user.uid, user.gid)))
        .map(Path::to_path_buf)
}

/// Gives the tree under `path` to `user`, touching only entries that are not theirs yet so a
/// restart of a large cluster costs one walk and no writes.
fn chown_tree(path: &Path, user: &RunAs) -> Result<(), EmbeddedError> {
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

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A running (or stopped) private PostgreSQL server.
pub struct EmbeddedPostgres {
    pgdata: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    log_path: PathBuf,
    server: Option<Supervised>,
}

impl std::fmt::Debug for EmbeddedPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedPostgres")
            .field("pgdata", &self.pgdata)
            .field("socket_dir", &self.socket_dir)
            .field("pid", &self.pid())
            .finish()
    }
}

impl EmbeddedPostgres {
    /// Blocking. Finds the binaries, runs initdb on first use, starts postgres and waits until
    /// it accepts connections. Call it outside async code (or in `spawn_blocking`).
    pub fn start(
        data_dir: &Path,
        opts: &EmbeddedOptions,
    ) -> Result<EmbeddedPostgres, EmbeddedError> {
        let path_env = std::env::var_os("PATH");
        let roots: Vec<&Path> = SEARCH_ROOTS.iter().map(Path::new).collect();
        let binaries = find_binaries(path_env.as_deref(), &roots)?;
        Self::start_with(&binaries, data_dir, opts)
    }

    fn start_with(
        binaries: &Binaries,
        data_dir: &Path,
        opts: &EmbeddedOptions,
    ) -> Result<EmbeddedPostgres, EmbeddedError> {
        let run_as = if is_root() {
            Some(
                lookup_user("postgres")
                    .or_else(|| lookup_user("nobody"))
                    .ok_or(EmbeddedError::NoUser)?,
            )
        } else {
            None
        };

        fs::create_dir_all(data_dir).map_err(io_err("creating", data_dir))?;
        // Absolute and free of symlinks: the socket directory must be absolute, and the
        // reachability check must look at the directories the kernel will actually walk.
        let data_dir = data_dir
            .canonicalize()
            .map_err(io_err("resolving", data_dir))?;
        if let Some(user) = &run_as {
            if let Some(dir) = first_unreachable(&data_dir, user) {
                return Err(EmbeddedError::Unreachable {
                    dir,
                    user: user.name.clone(),
                    uid: user.uid,
                });
            }
        }

        let base = data_dir.join("postgres");
        let pgdata = base.join("data");
        let socket_dir = base.join("run");
        let log_path = base.join("postgres.log");
        let port = opts.port.unwrap_or(PORT);
        let socket_len = socket_dir.as_os_str().len() + format!("/.s.PGSQL.{port}").len();
        if socket_len > MAX_SOCKET_PATH {
            return Err(EmbeddedError::SocketPathTooLong {
                path: socket_dir,
                len: socket_len,
            });
        }

        fs::create_dir_all(&socket_dir).map_err(io_err("creating", &socket_dir))?;
        fs::set_permissions(&socket_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("setting permissions of", &socket_dir))?;
        let _lock = LaunchLock::acquire(&base.join("launch.lock"))?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("opening", &log_path))?;
        if let Some(user) = &run_as {
            chown_tree(&base, user)?;
        }

        if !pgdata.join("PG_VERSION").exists() {
            initdb(binaries, &base, &pgdata, run_as.as_ref(), opts, &mut log)?;
        }
        wait_for_previous_server(&pgdata, PREVIOUS_SERVER_WAIT)?;

        let log_offset = log
            .seek(SeekFrom::End(0))
            .map_err(io_err("reading", &log_path))?;
        let mut args: Vec<OsString> = vec!["-D".into(), pgdata.clone().into()];
        let mut set = |k: &str, v: &OsStr| {
            let mut kv = OsString::from(format!("{k}="));
            kv.push(v);
            args.extend(["-c".into(), kv]);
        };
        set("listen_addresses", OsStr::new(""));
        set("unix_socket_directories", socket_dir.as_os_str());
        set("port", OsStr::new(&port.to_string()));
        set("max_connections", OsStr::new("200"));
        set("shared_buffers", OsStr::new("128MB"));
        if opts.fast_unsafe {
            set("fsync", OsStr::new("off"));
            set("synchronous_commit", OsStr::new("off"));
            set("full_page_writes", OsStr::new("off"));
        }
        for (name, value) in &opts.settings {
            set(name, OsStr::new(value));
        }
        let spec = ServerSpec {
            program: binaries.postgres.clone(),
            args,
            cwd: base.clone(),
            run_as: run_as.clone(),
            log: log.try_clone().map_err(io_err("opening", &log_path))?,
        };
        let command = spec.describe();
        tracing::info!(pgdata = %pgdata.display(), "starting embedded PostgreSQL: {command}");
        let server =
            Supervised::spawn(spec).map_err(|source| EmbeddedError::Spawn { command, source })?;

        let mut pg = EmbeddedPostgres {
            pgdata,
            socket_dir,
            port,
            log_path,
            server: Some(server),
        };
        if let Err(e) = pg.wait_ready(log_offset) {
            // Do not leave a half-started server behind the error.
            let _ = pg.stop();
            return Err(e);
        }
        tracing::info!(pid = pg.pid(), socket_dir = %pg.socket_dir.display(), "embedded PostgreSQL is ready");
        Ok(pg)
    }

    /// Polls with real connections: the socket file appears before recovery has finished, and
    /// only a successful start-up handshake proves the server will serve queries.
    fn wait_ready(&self, log_offset: u64) -> Result<(), EmbeddedError> {
        let server = self.server.as_ref().expect("server was just started");
        let mut config = self.config("postgres");
        config.connect_timeout(Duration::from_secs(2));
        let started = Instant::now();
        // A thread of its own, so that a caller inside a tokio runtime does not trip over
        // nested runtimes.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(io_err("creating a runtime for", &self.socket_dir))?;
                    let mut pause = Duration::from_millis(5);
                    loop {
                        if let Some(status) = server.exit_status() {
                            return Err(EmbeddedError::Exited {
                                status,
                                log: self.log_path.clone(),
                                tail: log_tail(&self.log_path, log_offset),
                            });
                        }
                        match rt.block_on(config.connect(tokio_postgres::NoTls)) {
                            Ok(_) => return Ok(()),
                            Err(e) => {
                                // 57P03: "the database system is starting up"; anything else
                                // from the server itself (a missing role, say) will not go away.
                                if let Some(db) = e.as_db_error() {
                                    if db.code()
                                        != &tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW
                                    {
                                        return Err(EmbeddedError::Connect {
                                            url: self.url("postgres"),
                                            source: e,
                                        });
                                    }
                                }
                            }
                        }
                        if started.elapsed() > READY_WAIT {
                            return Err(EmbeddedError::NotReady {
                                socket_dir: self.socket_dir.clone(),
                                waited: READY_WAIT,
                                log: self.log_path.clone(),
                                tail: log_tail(&self.log_path, log_offset),
                            });
                        }
                        server.wait_exit(pause);
                        pause = (pause * 2).min(Duration::from_millis(100));
                    }
                })
                .join()
                .expect("readiness thread panicked")
        })
    }

    /// Config for tokio-postgres: the socket directory as host, the port, the user, `dbname`.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .port(self.port)
            .user(USER)
            .dbname(dbname);
        config
    }

    /// A libpq key/value connection string for the same (for logs and `psql`).
    pub fn url(&self, dbname: &str) -> String {
        // Always quoted, so data_dir paths with spaces survive.
        let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        format!(
            "host={} port={} user={USER} dbname={}",
            quote(&self.socket_dir.to_string_lossy()),
            self.port,
            quote(dbname)
        )
    }

    /// Creates the database `dbname` unless it exists.
    pub async fn ensure_database(&self, dbname: &str) -> Result<(), EmbeddedError> {
        let (client, connection) = self
            .config("postgres")
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|source| EmbeddedError::Connect {
                url: self.url("postgres"),
                source,
            })?;
        let connection = tokio::spawn(connection);
        let create_err = |source| EmbeddedError::CreateDatabase {
            dbname: dbname.to_string(),
            source,
        };
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&dbname])
            .await
            .map_err(create_err)?
            .is_some();
        if !exists {
            let sql = format!("CREATE DATABASE \"{}\"", dbname.replace('"', "\"\""));
            if let Err(e) = client.batch_execute(&sql).await {
                // Another caller created it between our check and our CREATE.
                if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                    return Err(create_err(e));
                }
            }
        }
        drop(client);
        let _ = connection.await;
        Ok(())
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server
            .as_ref()
            .filter(|s| s.exit_status().is_none())
            .map(|s| s.pid as u32)
    }

    /// The socket directory (the `host` of every connection).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Fast shutdown (SIGINT: running transactions are rolled back, the data is consistent),
    /// then SIGKILL to the server's process group if it has not exited in time.
    pub fn stop(&mut self) -> Result<(), EmbeddedError> {
        let Some(mut server) = self.server.take() else {
            return Ok(());
        };
        if let Some(status) = server.exit_status() {
            tracing::warn!(
                pid = server.pid,
                "embedded PostgreSQL had already exited ({status})"
            );
            server.join();
            return Ok(());
        }
        tracing::info!(pid = server.pid, "stopping embedded PostgreSQL");
        if let Err(source) = server.signal(libc::SIGINT, false) {
            let pid = server.pid;
            self.server = Some(server);
            return Err(EmbeddedError::Signal { pid, source });
        }
        if server.wait_exit(STOP_WAIT).is_none() {
            tracing::warn!(
                pid = server.pid,
                "embedded PostgreSQL ignored fast shutdown for {STOP_WAIT:?}; killing it"
            );
            // The whole group: its backends would otherwise linger until they notice.
            if let Err(source) = server.signal(libc::SIGKILL, true) {
                let pid = server.pid;
                self.server = Some(server);
                return Err(EmbeddedError::Signal { pid, source });
            }
        }
        server.join();
        Ok(())
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!("stopping embedded PostgreSQL: {e}");
        }
    }
}

fn initdb(
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
fn wait_for_previous_server(pgdata: &Path, wait: Duration) -> Result<(), EmbeddedError> {
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

fn read_postmaster_pid(pid_file: &Path) -> Option<i32> {
    let text = fs::read_to_string(pid_file).ok()?;
    text.lines()
        .next()?
        .trim()
        .parse()
        .ok()
        .filter(|&p: &i32| p > 0)
}

#[derive(Debug, PartialEq, Eq)]
enum PidState {
    /// No such process.
    Gone,
    /// A live process working in this PGDATA: a postmaster (or one of its backends).
    Ours,
    /// A live process that is something else, or a zombie.
    Other,
}

fn postmaster_state(pid: i32, pgdata: &Path) -> PidState {
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

/// Serialises launchers on one data_dir (two test processes, or a daemon started twice), so
/// they never run initdb into the same place. Released when dropped.
struct LaunchLock {
    _file: File,
}

impl LaunchLock {
    fn acquire(path: &Path) -> Result<LaunchLock, EmbeddedError> {
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

/// Output of this run only, so an error does not quote an older run's failure.
fn log_tail(path: &Path, offset: u64) -> String {
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

fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// The server runs as another user and needs none of the daemon's environment, which can
/// hold secrets (tokens in BOTFLOW_* overrides); only time zone and locale variables pass.
fn minimal_env(cmd: &mut Command) {
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

fn describe<'a>(program: &OsStr, args: impl Iterator<Item = &'a OsStr>) -> String {
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
struct ServerSpec {
    program: PathBuf,
    args: Vec<OsString>,
    cwd: PathBuf,
    run_as: Option<RunAs>,
    log: File,
}

impl ServerSpec {
    fn describe(&self) -> String {
        describe(
            self.program.as_os_str(),
            self.args.iter().map(OsString::as_os_str),
        )
    }

    fn command(self) -> io::Result<Command> {
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
struct Supervised {
    pid: i32,
    exit: Arc<(Mutex<Option<String>>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Supervised {
    fn spawn(spec: ServerSpec) -> io::Result<Supervised> {
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

    fn exit_status(&self) -> Option<String> {
        self.exit.0.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for the server to exit; returns its status if it has.
    fn wait_exit(&self, timeout: Duration) -> Option<String> {
        let (lock, cvar) = &*self.exit;
        let guard = lock.lock().unwrap();
        let (guard, _) = cvar
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .unwrap();
        guard.clone()
    }

    /// Signals the server (or its whole process group) unless it has exited already.
    fn signal(&self, sig: libc::c_int, whole_group: bool) -> io::Result<()> {
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

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl EmbeddedPostgres {
    /// The connection settings of an embedded server already running under `data_dir`
    /// (a daemon's), or `None` when no live postmaster serves that directory. One-shot
    /// commands use it instead of starting a second server on the same data.
    pub fn running(data_dir: &Path) -> Option<tokio_postgres::Config> {
        let data_dir = data_dir.canonicalize().ok()?;
        let root = data_dir.join("postgres");
        let pgdata = root.join("data");
        let pid = read_postmaster_pid(&pgdata.join("postmaster.pid"))?;
        if postmaster_state(pid, &pgdata) != PidState::Ours {
            return None;
        }
        let socket_dir = root.join("run");
        if !socket_dir.join(format!(".s.PGSQL.{PORT}")).exists() {
            return None;
        }
        let mut config = tokio_postgres::Config::new();
        config.host_path(&socket_dir).port(PORT).user(USER).dbname(EMBEDDED_DB);
        Some(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory under the temp dir, removed when dropped (after any server in it, since it
    /// is declared first).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let mut base = std::env::temp_dir();
            // The server runs as the postgres user when we are root; a TMPDIR it cannot
            // reach would test only the error message.
            if is_root() {
                let user = lookup_user("postgres")
                    .or_else(|| lookup_user("nobody"))
                    .unwrap();
                if first_unreachable(&base, &user).is_some() {
                    base = PathBuf::from("/tmp");
                }
            }
            let id = uuid::Uuid::new_v4().simple().to_string();
            let dir = base.join(format!("botflow-pg-{tag}-{}", &id[..12]));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn fast() -> EmbeddedOptions {
        EmbeddedOptions { fast_unsafe: true, ..Default::default() }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Alive and not a zombie: an orphaned server is reaped by whatever runs as pid 1, which
    /// in a container may never do it.
    fn process_alive(pid: i32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let state = stat
                    .rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next());
                state != Some('Z')
            }
            Err(_) => false,
        }
    }

    async fn connect(pg: &EmbeddedPostgres, dbname: &str) -> tokio_postgres::Client {
        let (client, connection) = pg
            .config(dbname)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    fn touch_executable(path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn missing_binaries_say_what_to_install() {
        let tmp = TempDir::new("nobin");
        let empty_root = tmp.0.join("lib-postgresql");
        fs::create_dir_all(empty_root.join("15/bin")).unwrap();
        let path =
            std::env::join_paths([tmp.0.join("bin"), PathBuf::from("/nonexistent")]).unwrap();
        let err = find_binaries(Some(&path), &[&empty_root]).unwrap_err();
        assert!(matches!(err, EmbeddedError::NoBinaries { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("database.url"), "{msg}");
        assert!(msg.contains("BOTFLOW_DATABASE__URL"), "{msg}");
        assert!(
            msg.contains(&format!("{}/*/bin", empty_root.display())),
            "{msg}"
        );
        assert!(find_binaries(None, &[]).is_err());
    }

    #[test]
    fn binaries_from_path_first_then_highest_version() {
        let tmp = TempDir::new("bins");
        let root = tmp.0.join("lib");
        for v in ["9.6", "15", "13"] {
            touch_executable(&root.join(v).join("bin/postgres"));
            touch_executable(&root.join(v).join("bin/initdb"));
        }
        // Newest, but incomplete: without initdb it cannot be used.
        touch_executable(&root.join("16/bin/postgres"));
        fs::create_dir_all(root.join("notaversion/bin")).unwrap();
        let found = find_binaries(None, &[&root]).unwrap();
        assert_eq!(found.postgres, root.join("15/bin/postgres"));
        assert_eq!(found.initdb, root.join("15/bin/initdb"));

        let on_path = tmp.0.join("bin");
        touch_executable(&on_path.join("postgres"));
        touch_executable(&on_path.join("initdb"));
        let path = std::env::join_paths([PathBuf::from("/nonexistent"), on_path.clone()]).unwrap();
        let found = find_binaries(Some(&path), &[&root]).unwrap();
        assert_eq!(found.postgres, on_path.join("postgres"));
        assert_eq!(found.initdb, on_path.join("initdb"));
    }

    #[test]
    fn unreachable_data_dir_is_named() {
        if !is_root() {
            return;
        }
        let tmp = TempDir::new("locked");
        let locked = tmp.0.join("locked");
        fs::create_dir_all(&locked).unwrap();
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o700)).unwrap();
        let err = EmbeddedPostgres::start(&locked.join("var"), &fast()).unwrap_err();
        assert!(
            matches!(err, EmbeddedError::Unreachable { ref dir, .. } if *dir == locked),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("chmod o+x {}", locked.display())),
            "{msg}"
        );
    }

    #[test]
    fn overlong_socket_path_is_refused_up_front() {
        let tmp = TempDir::new("long");
        let data_dir = tmp.0.join("d".repeat(100));
        let err = EmbeddedPostgres::start(&data_dir, &fast()).unwrap_err();
        assert!(
            matches!(err, EmbeddedError::SocketPathTooLong { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("choose a shorter data_dir"),
            "{err}"
        );
    }

    #[test]
    fn url_is_a_connection_string_for_the_same_server() {
        let pg = EmbeddedPostgres {
            pgdata: PathBuf::from("/x/postgres/data"),
            socket_dir: PathBuf::from("/my data/it's/postgres/run"),
            port: PORT,
            log_path: PathBuf::from("/x/postgres/postgres.log"),
            server: None,
        };
        let url = pg.url("t1");
        let parsed: tokio_postgres::Config = url.parse().unwrap();
        let expected = pg.config("t1");
        assert_eq!(parsed.get_hosts(), expected.get_hosts(), "{url}");
        assert_eq!(parsed.get_ports(), &[PORT]);
        assert_eq!(parsed.get_user(), Some(USER));
        assert_eq!(parsed.get_dbname(), Some("t1"));
    }

    #[test]
    fn keeps_data_across_restarts() {
        let tmp = TempDir::new("restart");
        let rt = runtime();
        if is_root() {
            // Give root a supplementary group, so the check below shows that the server
            // does not inherit it.
            let groups = [0 as libc::gid_t];
            assert_eq!(unsafe { libc::setgroups(1, groups.as_ptr()) }, 0);
        }
        let mut pg = EmbeddedPostgres::start(&tmp.0, &fast()).unwrap();
        let base = tmp.0.canonicalize().unwrap().join("postgres");
        assert_eq!(pg.socket_dir(), base.join("run"));
        assert_eq!(pg.log_path(), base.join("postgres.log"));
        assert!(base.join("data/PG_VERSION").is_file());
        let mode = fs::metadata(base.join("run")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        let pid = pg.pid().unwrap() as i32;
        if is_root() {
            // Dropped to the postgres user, with none of root's groups.
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap()
                    .trim()
                    .to_string()
            };
            let user = lookup_user("postgres")
                .or_else(|| lookup_user("nobody"))
                .unwrap();
            assert!(
                field("Uid:")
                    .split_whitespace()
                    .all(|u| u == user.uid.to_string()),
                "{status}"
            );
            assert!(
                field("Gid:")
                    .split_whitespace()
                    .all(|g| g == user.gid.to_string()),
                "{status}"
            );
            assert_eq!(field("Groups:"), "", "{status}");
        }
        // None of the launcher's environment beyond locale and time zone (cargo sets CARGO_*).
        let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
        for var in environ.split(|&b| b == 0).filter(|v| !v.is_empty()) {
            let var = String::from_utf8_lossy(var);
            let key = var.split('=').next().unwrap();
            assert!(
                ["PATH", "TZ", "LANG", "LANGUAGE"].contains(&key)
                    || key.starts_with("LC_")
                    || key.starts_with("PG"),
                "{var}"
            );
        }

        rt.block_on(async {
            pg.ensure_database("t1").await.unwrap();
            // Idempotent, and names that need quoting work.
            pg.ensure_database("t1").await.unwrap();
            pg.ensure_database("odd \"name\"").await.unwrap();
            let client = connect(&pg, "t1").await;
            let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
            assert_eq!(one, 1);
            let settings: Vec<String> = client
                .query("SELECT current_setting(name) FROM unnest(ARRAY['listen_addresses', 'fsync', 'max_connections', 'server_encoding']) AS name", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert_eq!(settings, ["", "off", "200", "UTF8"]);
            client
                .batch_execute("CREATE TABLE kept (id int PRIMARY KEY, note text); INSERT INTO kept VALUES (1, 'still here')")
                .await
                .unwrap();
        });
        pg.stop().unwrap();
        assert!(pg.pid().is_none());
        assert!(!process_alive(pid));
        pg.stop().unwrap();

        // A stale postmaster.pid whose pid now belongs to an unrelated live process (pid 1):
        // postgres alone would refuse to start.
        fs::write(base.join("data/postmaster.pid"), "1\n").unwrap();

        let mut pg = EmbeddedPostgres::start(&tmp.0, &fast()).unwrap();
        rt.block_on(async {
            let client = connect(&pg, "t1").await;
            let note: String = client
                .query_one("SELECT note FROM kept WHERE id = 1", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(note, "still here");
        });
        pg.stop().unwrap();
    }

    #[test]
    fn drop_stops_the_server_and_start_failures_quote_the_log() {
        let tmp = TempDir::new("drop");
        let pg = EmbeddedPostgres::start(&tmp.0, &fast()).unwrap();
        let pid = pg.pid().unwrap() as i32;
        assert!(process_alive(pid));
        let pgdata = tmp.0.canonicalize().unwrap().join("postgres/data");

        // A live postmaster on the same PGDATA is waited for, then named.
        let err = wait_for_previous_server(&pgdata, Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(err, EmbeddedError::AlreadyRunning { pid: p, .. } if p == pid),
            "{err:?}"
        );
        assert!(err.to_string().contains(&format!("pid {pid}")), "{err}");

        drop(pg);
        assert!(!process_alive(pid));
        wait_for_previous_server(&pgdata, Duration::ZERO).unwrap();
        assert!(!pgdata.join("postmaster.pid").exists());

        // A setting postgres rejects: it exits at once, and the error shows why.
        let mut conf = OpenOptions::new()
            .append(true)
            .open(pgdata.join("postgresql.conf"))
            .unwrap();
        writeln!(conf, "botflow_no_such_setting_x = 1").unwrap();
        drop(conf);
        let started = Instant::now();
        let err = EmbeddedPostgres::start(&tmp.0, &fast()).unwrap_err();
        assert!(matches!(err, EmbeddedError::Exited { .. }), "{err:?}");
        assert!(
            err.to_string().contains("botflow_no_such_setting_x"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
