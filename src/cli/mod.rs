//! The `kiln` command line: one file per subcommand.

pub mod fpga;
pub mod image;
pub mod inspect;
pub mod model;
pub mod predict;
pub mod serve;
pub mod workspace;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::backends::{BackendChoice, BackendConfig};
use crate::logging::LogFormat;

/// Model packaging and inference serving runtime.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about = None, max_term_width = 100)]
pub struct Cli {
    /// Log filter (tracing directives: error, warn, info, debug, or per-module like `kiln=debug`).
    #[arg(long, global = true, env = "KILN_LOG", default_value = "info")]
    pub log: String,
    /// Log line format.
    #[arg(long, global = true, env = "KILN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Workspace directory (model registry and image store) [default: $XDG_DATA_HOME/kiln or
    /// ~/.local/share/kiln]; created on first use.
    #[arg(long, global = true, env = "KILN_WORKSPACE", value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Score one request with a model, without a server, and print the V2-style outputs JSON.
    Predict(predict::PredictArgs),
    /// Show a model's inputs, outputs, opsets, operators and which backends can run it.
    Inspect(inspect::InspectArgs),
    /// Serve models over HTTP: Open Inference Protocol V2, V1, and Azure ML /score.
    Serve(Box<crate::serve::config::ServeArgs>),
    /// The model registry: register, list, show, tag, download, delete, push, pull.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// The workspace: show, verify, gc.
    #[command(subcommand)]
    Workspace(workspace::WorkspaceCommand),
    /// OCI images: build (no Docker), list, show, delete, export, push.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// The FPGA accelerator path: compile models to accelerator images, list devices.
    #[command(subcommand)]
    Fpga(fpga::FpgaCommand),
}

/// How a model is run: backend choice and engine settings.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Engine: auto picks the first of ort, tract that can run the whole graph.
    #[arg(long, env = "KILN_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// ONNX Runtime library (libonnxruntime.so) or a directory holding it; default: search
    /// ORT_DYLIB_PATH, next to the executable, the Python venv, python3's onnxruntime.
    #[arg(long, env = "KILN_ORT_LIB", value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Threads used inside one operator (ONNX Runtime; default: the engine's choice).
    #[arg(long, env = "KILN_INTRA_OP_THREADS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub intra_op_threads: Option<u16>,
    /// Threads running independent operators in parallel (ONNX Runtime; default: 1).
    #[arg(long, env = "KILN_INTER_OP_THREADS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub inter_op_threads: Option<u16>,
    /// Device for --backend fpga: emulated[:N compute units], rtl-sim, xrt:INDEX.
    #[arg(long, env = "KILN_FPGA_DEVICE", default_value = "emulated:2", value_name = "DEVICE")]
    pub fpga_device: kiln_fpga::backend::DeviceSpec,
    /// Longest one accelerator command may take before the request fails, e.g. 10s.
    #[arg(long, env = "KILN_FPGA_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = crate::serve::config::parse_duration)]
    pub fpga_timeout: std::time::Duration,
}

impl BackendArgs {
    /// The backend configuration these flags describe.
    pub fn config(&self) -> BackendConfig {
        BackendConfig {
            choice: self.backend,
            ort_lib: self.ort_lib.clone(),
            fpga_device: self.fpga_device.clone(),
            fpga_timeout: self.fpga_timeout,
        }
    }

    /// Load options from these flags.
    pub fn load_options(&self) -> kiln_runtime_core::LoadOptions {
        kiln_runtime_core::LoadOptions {
            intra_op_threads: self.intra_op_threads.map(usize::from),
            inter_op_threads: self.inter_op_threads.map(usize::from),
            ..Default::default()
        }
    }
}

impl Cli {
    /// The workspace directory: `--workspace`, `KILN_WORKSPACE`, or the default.
    pub fn workspace_dir(&self) -> PathBuf {
        self.workspace.clone().unwrap_or_else(crate::registry::default_dir)
    }
}

/// A mistake in what the user asked for (exit code 2), as opposed to a failure while doing it
/// (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A single-threaded runtime for the registry client (push, pull, base images), with TLS set up.
pub fn registry_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    kiln_images::init_tls();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

/// Maps a scoring-seam error to usage (the user's file or data is wrong) or failure.
pub fn classify(e: kiln_runtime_core::Error) -> anyhow::Error {
    match e {
        kiln_runtime_core::Error::InvalidInput(_) | kiln_runtime_core::Error::ModelFile { .. } => {
            UsageError(e.to_string()).into()
        }
        other => other.into(),
    }
}

/// The process exit code for an error: 2 for usage errors, 1 for failures.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<UsageError>()) { 2 } else { 1 }
}
