//! Where log lines go and in what form: stderr, as text for people or as
//! one JSON object per line for log shippers (journald, Vector, Loki, …).
//!
//! The format is chosen before any command runs, so it cannot wait for the
//! node to be opened: `--log-format` wins, else `log_format` in the data
//! dir's config.toml, read here on its own. A config file that does not
//! parse gives text logs here; the command then fails on it with the usual
//! message when it opens the node.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use super::Cli;
use crate::config::{Config, LogFormat};
use crate::node::Paths;

impl Cli {
    /// The log format: the flag, else config.toml's `log_format`, else text.
    fn log_format(&self) -> LogFormat {
        if let Some(f) = self.log_format {
            return f;
        }
        let path = Paths::new(self.data_dir()).config();
        if !path.is_file() {
            return LogFormat::Text;
        }
        Config::load(&path).map_or(LogFormat::Text, |c| c.log_format)
    }
}

/// Install the process's log subscriber: levels from `RUST_LOG`, else the
/// command's default (see [`Cli::default_log_filter`]); lines on stderr.
pub fn init(cli: &Cli) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cli.default_log_filter()));
    // Colours only for a person at a terminal: in a file or a pipe the
    // escape codes would be in every line a shipper reads.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match cli.log_format() {
        LogFormat::Text => builder.init(),
        // Fields at the top level (`"peer": "…"` beside `"message"`), so a
        // shipper indexes them without unnesting.
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
