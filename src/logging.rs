//! Structured logs on stderr, as text or JSON, filtered by `KILN_LOG`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. `filter` uses `tracing`'s directive syntax (`info`,
/// `kiln=debug,warn`); ONNX Runtime's own chatter is kept at warnings unless asked for.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = if filter.contains("ort") { filter.to_string() } else { format!("{filter},ort=warn") };
    let filter = EnvFilter::try_new(&filter).map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
    result.map_err(|e| e.to_string())
}
