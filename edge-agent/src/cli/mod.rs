//! Commands for the person on the gateway: `status`, `upload`, `doctor` and
//! `print-default-config`. Formatting (progress bars, sizes, ETA) is pure code, tested
//! without a terminal; the commands themselves print to stdout and return their exit code.
//!
//! - `format`: progress bars, sizes, durations and the [`JobView`] `status` prints.
//! - `jobs`: `status` and `upload`, on the agent's database.
//! - `doctor`: the checks of `doctor`.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::store::StoreError;

mod doctor;
mod format;
mod jobs;

pub use doctor::*;
pub use format::*;
pub use jobs::*;

/// Exit codes (also listed in `--help`).
pub const EXIT_OK: u8 = 0;
/// `doctor`: a check failed; any command: an error (configuration, database).
pub const EXIT_FAIL: u8 = 1;
/// `upload`: the path policy refused the file.
pub const EXIT_REFUSED: u8 = 2;

/// The commented default configuration `print-default-config` prints.
pub const DEFAULT_CONFIG: &str = include_str!("../default-agent.toml");

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("no state database at {0} (has the agent run yet? check state_dir)")]
    NoDatabase(PathBuf),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn default_config_parses_and_documents_new_fields() {
        let cfg: Config = toml::from_str(DEFAULT_CONFIG).unwrap();
        assert_eq!(cfg.concurrency, 4);
        assert_eq!(cfg.metrics_listen, None);
        assert!(DEFAULT_CONFIG.contains("# metrics_listen = \"127.0.0.1:9464\""));
        assert!(DEFAULT_CONFIG.contains("# api_url"));
    }
}
