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
//! This file drives a server's life (start, wait until ready, create databases, stop);
//! the jobs it calls on are split by kind: `binaries` (finding the installed server),
//! `user` (the unprivileged account and its access to the data directory), `cluster`
//! (initdb, a previous run's postmaster), `lock` (one launcher per directory) and
//! `process` (starting the server as its user and supervising it).
//!
//! Layout under `data_dir`:
//! - `postgres/data`          the cluster (PGDATA), kept across restarts
//! - `postgres/run`           socket directory (mode 0700); the server listens on no TCP port
//! - `postgres/postgres.log`  initdb and server output, appended
//! - `postgres/launch.lock`   serialises concurrent launchers on the same directory

mod binaries;
mod cluster;
mod lock;
mod process;
mod user;

pub(crate) use binaries::{find_binaries, Binaries};
use cluster::{initdb, postmaster_state, read_postmaster_pid, stop_orphaned_server, wait_for_previous_server, PidState};
use lock::{LaunchLock, OwnerLock};
use process::{log_tail, ServerSpec, Supervised};
use user::{chown_tree, first_unreachable, is_root, lookup_user};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
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

/// A running (or stopped) private PostgreSQL server.
pub struct EmbeddedPostgres {
    pgdata: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    log_path: PathBuf,
    server: Option<Supervised>,
    /// Held while this process owns the server of the data directory.
    owner: Option<OwnerLock>,
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
        // A server found running with no owner is stopped; one another process owns
        // (a daemon that is stopping, say) is waited for.
        let owner = OwnerLock::try_acquire(&base.join("owner.lock"))?;
        if owner.is_some() {
            stop_orphaned_server(&pgdata, STOP_WAIT);
        }
        wait_for_previous_server(&pgdata, PREVIOUS_SERVER_WAIT)?;
        let owner = match owner {
            Some(lock) => lock,
            None => OwnerLock::try_acquire(&base.join("owner.lock"))?.ok_or_else(|| EmbeddedError::AlreadyRunning {
                pid: read_postmaster_pid(&pgdata.join("postmaster.pid")).unwrap_or(0),
                pgdata: pgdata.clone(),
                waited: PREVIOUS_SERVER_WAIT,
            })?,
        };

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
            owner: Some(owner),
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
            // Restarted from outside (`pg_ctl restart`), the server is no child of
            // ours, but it serves our data directory, which this process owns: stop it.
            stop_orphaned_server(&self.pgdata, STOP_WAIT);
            self.owner = None;
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
        self.owner = None;
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
    use std::io::Write;

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
            owner: None,
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
