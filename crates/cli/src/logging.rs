//! Structured logs on stderr: human-readable by default, JSON lines with `--log-format json`.

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct LogArgs {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level filter (e.g. info, debug, fedmicse=debug); RUST_LOG works too.
    #[arg(long, global = true, default_value = "info", env = "RUST_LOG")]
    pub log_level: String,
}

pub fn init(args: &LogArgs) {
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .init()
        }
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
