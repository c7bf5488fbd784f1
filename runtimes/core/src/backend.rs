//! The scoring seam: a backend loads a model into sessions; a session scores batches.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Error, ModelMetadata, NamedTensor};

/// The bytes of a model file and where they came from.
#[derive(Clone)]
pub struct ModelFile {
    path: PathBuf,
    bytes: Arc<[u8]>,
}

impl fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelFile").field("path", &self.path).field("len", &self.bytes.len()).finish()
    }
}

impl ModelFile {
    /// Reads a model file, with an error that says what is wrong with the path.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let err = |reason: String| Error::ModelFile { path: path.to_path_buf(), reason };
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => err("no such file".into()),
            _ => err(e.to_string()),
        })?;
        if meta.is_dir() {
            return Err(err("is a directory; give the path of the .onnx file inside it".into()));
        }
        let bytes = read_shared(path).map_err(|e| err(e.to_string()))?;
        if bytes.is_empty() {
            return Err(err("is empty".into()));
        }
        Ok(ModelFile { path: path.to_path_buf(), bytes })
    }

    /// Wraps bytes already in memory; `path` is used in messages and to resolve external data.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: impl Into<Arc<[u8]>>) -> Self {
        ModelFile { path: path.into(), bytes: bytes.into() }
    }

    /// Where the model came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's contents.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Reads a whole file straight into shared memory: one allocation, one copy, where
/// `fs::read(..).into()` makes two (a model can be gigabytes).
pub fn read_shared(path: &Path) -> std::io::Result<Arc<[u8]>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
    let mut bytes: Arc<[u8]> = std::iter::repeat_n(0u8, len).collect();
    let Some(buf) = Arc::get_mut(&mut bytes) else {
        return Err(std::io::Error::other("shared buffer in use"));
    };
    file.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => std::io::Error::other("the file shrank while it was read"),
        _ => e,
    })?;
    let mut probe = [0u8; 1];
    if file.read(&mut probe)? != 0 {
        return Err(std::io::Error::other("the file grew while it was read"));
    }
    Ok(bytes)
}

/// Whether a backend can run every operator of a model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Support {
    /// Operators the backend lacks (`domain:OpType` outside the default domain). Empty = all supported.
    pub unsupported_ops: Vec<String>,
}

impl Support {
    /// True when the whole graph can run.
    pub fn is_full(&self) -> bool {
        self.unsupported_ops.is_empty()
    }

    /// `Ok` when the whole graph can run, else [`Error::Unsupported`].
    pub fn into_result(self, backend: &'static str) -> Result<(), Error> {
        if self.is_full() { Ok(()) } else { Err(Error::Unsupported { backend, ops: self.unsupported_ops }) }
    }
}

/// Default largest batch a session accepts when the model's batch axis is dynamic.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 64;

/// Knobs for [`Backend::load`]; every field has a sane default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Threads inside one operator (engine default when `None`).
    pub intra_op_threads: Option<usize>,
    /// Threads running independent operators in parallel (engine default when `None`).
    pub inter_op_threads: Option<usize>,
    /// Largest batch to accept along a dynamic axis 0.
    pub max_batch_size: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { intra_op_threads: None, inter_op_threads: None, max_batch_size: DEFAULT_MAX_BATCH_SIZE }
    }
}

/// An inference engine that can load models.
pub trait Backend: Send + Sync {
    /// Short name used on the command line (`tract`, `ort`, ...).
    fn name(&self) -> &'static str;

    /// Whether this engine can run on this machine at all (library found, device present).
    fn check(&self) -> Result<(), Error>;

    /// Which operators of this model the engine lacks; cheap, done before loading.
    fn supports(&self, model: &ModelFile) -> Result<Support, Error>;

    /// Loads and optimises the model once; the session then serves many requests.
    fn load(&self, model: &ModelFile, options: &LoadOptions) -> Result<Box<dyn Session>, Error>;
}

/// A loaded model, ready to score. `infer` blocks; call it from a dedicated thread.
pub trait Session: Send + Sync {
    /// Inputs and outputs of the model.
    fn metadata(&self) -> &ModelMetadata;

    /// Largest batch accepted along axis 0; 0 when the model has no dynamic batch axis.
    fn max_batch_size(&self) -> usize;

    /// Scores one batch. Inputs are checked against [`Session::metadata`] first.
    fn infer(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, Error>;

    /// Whether the session can still serve (a device may go away).
    fn health(&self) -> Result<(), Error> {
        Ok(())
    }
}
