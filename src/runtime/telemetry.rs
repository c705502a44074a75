//! Logging set-up: `tracing` to stderr, human-readable or JSON.

use tracing_subscriber::EnvFilter;

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Directives always added to the filter: the HTTP stacks log request details at debug and trace
/// level, which would include Authorization headers and form bodies.
pub const QUIET_DEPENDENCIES: &[&str] =
    &["hyper=info", "hyper_util=info", "h2=info", "reqwest=info", "rustls=info", "tower=info"];

/// Builds the filter from `level` (an `EnvFilter` directive such as `info` or
/// `registry_access_operator=debug`), keeping the HTTP stacks quiet.
pub fn filter(level: &str) -> EnvFilter {
    QUIET_DEPENDENCIES.iter().fold(EnvFilter::new(level), |f, d| f.add_directive(d.parse().expect("static directive")))
}

/// Installs the global subscriber.
pub fn init(level: &str, format: LogFormat) {
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}
