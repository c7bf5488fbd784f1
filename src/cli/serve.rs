//! `kiln serve`: validate the configuration, then run the server on a tokio runtime.

use super::UsageError;
use crate::serve::config::{ServeArgs, ServeConfig};

/// Runs `kiln serve`.
pub fn run(args: ServeArgs, workspace: std::path::PathBuf) -> anyhow::Result<()> {
    let config = ServeConfig::from_args(&args, &workspace).map_err(UsageError)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-http")
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    runtime.block_on(crate::serve::run(config))
}
