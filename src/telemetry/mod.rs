//! Logs (tracing-subscriber, text or JSON) and metrics (Prometheus).

pub mod metrics;

use crate::config::LogConfig;
use tracing_subscriber::EnvFilter;

/// Installs the global log subscriber. `RUST_LOG` wins over `log.level`. Safe to call
/// twice (the second call does nothing), which tests rely on.
pub fn init_logging(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if cfg.format == "json" {
        builder.json().flatten_event(true).with_current_span(false).try_init()
    } else {
        builder.try_init()
    };
}
