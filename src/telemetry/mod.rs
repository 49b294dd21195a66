//! Logs (tracing-subscriber, text or JSON) and metrics (Prometheus).

pub mod metrics;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Installs the global log subscriber: `format` is `log.format` (`text` or `json`),
/// `level` is `log.level`, and `RUST_LOG` wins over it. Safe to call twice (the second
/// call does nothing), which tests rely on.
pub fn init_logging(format: &str, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // At debug level the operator asked for everything, client faults included.
    let quiet = QuietClientFaults { enabled: filter.max_level_hint().is_none_or(|max| max < Level::DEBUG) };
    // Colour codes only for a person at a terminal: a log file or a journal keeps them
    // as noise.
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if format == "json" {
        builder.json().flatten_event(true).with_current_span(false).finish().with(quiet).try_init()
    } else {
        builder.finish().with(quiet).try_init()
    };
}

/// Lines that are noise below debug level, dropped unless the operator asked for debug:
/// - actix-http logs a request it cannot parse (a bad header, say) at ERROR, although
///   the client is at fault and got its 400: logs of a daemon facing the internet would
///   fill with errors no operator can act on;
/// - tokio-postgres logs every notice the server sends at INFO (`NOTICE: relation
///   "botflow_schema_history" already exists, skipping` on each restart): PostgreSQL's
///   chatter, not the daemon's news.
struct QuietClientFaults {
    enabled: bool,
}

/// The message of an event and, for one bridged from the `log` crate, its real target.
#[derive(Default)]
struct Fields {
    message: String,
    log_target: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "log.target" => self.log_target = value.to_string(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "log.target" => self.log_target = format!("{value:?}"),
            _ => {}
        }
    }
}

impl QuietClientFaults {
    fn is_noise(event: &Event<'_>) -> bool {
        let meta = event.metadata();
        let client_fault = *meta.level() == Level::ERROR && meta.target().starts_with("actix_http::h1");
        let notice_level = *meta.level() == Level::INFO;
        if !client_fault && !notice_level {
            return false;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        if client_fault {
            return f.message.starts_with("stream error: request parse error");
        }
        meta.target().starts_with("tokio_postgres") || f.log_target.starts_with("tokio_postgres")
    }
}

impl<S: Subscriber> Layer<S> for QuietClientFaults {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        !(self.enabled && Self::is_noise(event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(level: &str, emit: impl FnOnce()) -> String {
        let out = Captured::default();
        let filter = EnvFilter::new(level);
        let quiet = QuietClientFaults { enabled: filter.max_level_hint().is_none_or(|max| max < Level::DEBUG) };
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish()
            .with(quiet);
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_clients_malformed_request_is_not_an_error_line_but_other_errors_are() {
        let emit = || {
            tracing::error!(target: "actix_http::h1::dispatcher", "stream error: {}", "request parse error: invalid Header provided");
            tracing::error!(target: "actix_http::h1::dispatcher", "Upgrade handler error: boom");
            tracing::error!(target: "botflow::store", "stream error: request parse error (not actix)");
        };
        let info = logged("info", emit);
        assert!(!info.contains("invalid Header"), "{info}");
        assert!(info.contains("Upgrade handler error: boom"), "{info}");
        assert!(info.contains("(not actix)"), "{info}");
        let debug = logged("debug", emit);
        assert!(debug.contains("invalid Header"), "at debug level everything is kept: {debug}");
    }

    #[test]
    fn postgresql_notices_are_kept_for_debug_level() {
        let emit = || {
            tracing::info!(target: "tokio_postgres::connection", "NOTICE: relation \"botflow_schema_history\" already exists, skipping");
            tracing::info!(target: "botflow::app", "botflow is ready");
            tracing::warn!(target: "tokio_postgres::connection", "a warning of the client itself");
        };
        let info = logged("info", emit);
        assert!(!info.contains("already exists"), "{info}");
        assert!(info.contains("botflow is ready") && info.contains("a warning of the client itself"), "{info}");
        assert!(logged("debug", emit).contains("already exists, skipping"));
    }
}
