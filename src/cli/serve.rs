//! `serve`, `migrate` and `check-config`.

use super::database::Database;
use super::systemd::SystemdNotifier;
use crate::app::App;
use crate::config::Config;
use anyhow::Context;

/// Runs the daemon until SIGTERM or SIGINT, then shuts down cleanly.
pub fn serve(config: Config) -> anyhow::Result<()> {
    // Taken (and hidden from the processes started later) before anything starts.
    let systemd = SystemdNotifier::from_env().map(std::sync::Arc::new);
    crate::telemetry::init_logging(&config.log.format, &config.log.level);
    let system = actix_rt::System::new();
    // Watched before anything slow starts: a signal that comes while PostgreSQL starts
    // or the listeners open is kept, and stops the daemon cleanly once it is up, instead
    // of killing it half-started (the default action of SIGTERM).
    let stop = system.block_on(async { StopSignals::register() }).context("cannot watch SIGTERM and SIGINT")?;
    // Started outside the actor system: the embedded server's lifetime is this
    // process's, and it must outlive every actor.
    let mut db = Database::open_owned(&config)?;
    let result = system.block_on(async {
        let app = App::start(&config, db.pg.clone()).await?;
        if let Some(sd) = &systemd {
            // The listeners are open: `systemctl start` may return.
            sd.notify(&format!("READY=1\nSTATUS=serving\nMAINPID={}", std::process::id()));
            if let Some(every) = SystemdNotifier::watchdog_interval() {
                // On the actor system's own thread: a wedged system stops the pings.
                let sd = sd.clone();
                actix_rt::spawn(async move {
                    loop {
                        sd.notify("WATCHDOG=1");
                        tokio::time::sleep(every).await;
                    }
                });
            }
        }
        stop.wait().await;
        if let Some(sd) = &systemd {
            sd.notify("STOPPING=1\nSTATUS=draining: answering what is in flight, finishing running executions");
        }
        app.shutdown().await;
        anyhow::Ok(())
    });
    if let Some(pg) = db.embedded.as_mut() {
        if let Err(error) = pg.stop() {
            tracing::warn!(%error, "the embedded PostgreSQL did not stop cleanly");
        }
    }
    result
}

/// SIGTERM and SIGINT, registered once and waited for later.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn register() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

pub fn migrate(config: Config) -> anyhow::Result<()> {
    crate::telemetry::init_logging(&config.log.format, &config.log.level);
    let db = Database::open_shared(&config)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let store = crate::store::Store::new(db.pg.clone(), 1, std::time::Duration::from_millis(config.database.connect_timeout_ms), config.database_ca_file())?;
        store.wait_until_reachable(std::time::Duration::from_secs(10)).await.context("the database is not reachable")?;
        // A migration that rewrites a large table (V6 recounts the rollups) takes a while.
        let progress = super::progress::spinner("migrating the database");
        let report = crate::store::migrate::migrate(&store).await;
        progress.finish_and_clear();
        let report = report?;
        if report.applied.is_empty() {
            eprintln!("the database is at the latest schema version ({})", report.latest);
        } else {
            for m in &report.applied {
                eprintln!("applied {m}");
            }
        }
        anyhow::Ok(())
    })
}

pub fn check_config(config: Config) -> anyhow::Result<()> {
    eprintln!("configuration is valid; effective values:");
    print!("{}", config.to_redacted_toml());
    Ok(())
}
