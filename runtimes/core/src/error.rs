//! The errors every backend reports, by kind, so the server maps them to one status each.

use std::path::PathBuf;

/// What went wrong in the scoring seam.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file could not be read (missing, a directory, unreadable, empty).
    #[error("model file {}: {reason}", path.display())]
    ModelFile {
        /// The path the caller gave.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file was read but is not a model this backend can load (corrupt, truncated, bad graph).
    #[error("cannot load model {}: {reason}", path.display())]
    InvalidModel {
        /// The model file.
        path: PathBuf,
        /// The engine's explanation.
        reason: String,
    },
    /// The backend cannot run here at all (library missing, no device).
    #[error("backend {backend} is not usable here: {reason}")]
    Unavailable {
        /// Backend name.
        backend: &'static str,
        /// Why, and what to do about it.
        reason: String,
    },
    /// The backend can run, but not every operator of this model.
    #[error("backend {backend} cannot run this model: unsupported operator(s) {}", ops.join(", "))]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// Operator types it lacks, as `domain:OpType` or `OpType`.
        ops: Vec<String>,
    },
    /// The request does not fit the model (name, datatype, shape, element count, values).
    #[error("{0}")]
    InvalidInput(String),
    /// The engine failed while running a request that was valid.
    #[error("inference failed: {0}")]
    Inference(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid_input(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    /// True when the caller's data, not the model or engine, is at fault.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::InvalidInput(_))
    }
}
