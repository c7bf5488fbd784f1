//! Choosing the backend that runs a model: an explicit name, or `auto`.

use std::path::PathBuf;

use kiln_runtime_core::{Backend, Error, ModelFile};
use kiln_runtime_ort::OrtBackend;
use kiln_runtime_tract::TractBackend;

/// Which engine runs the model.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The first of ort, tract that is usable here and supports every operator of the model.
    #[default]
    Auto,
    /// tract: pure Rust, always available, lacks some ai.onnx.ml operators.
    Tract,
    /// ONNX Runtime, loaded from libonnxruntime at run time.
    Ort,
    /// The FPGA accelerator path: runs accelerator images (`kiln fpga compile`) on
    /// `--fpga-device`; never picked by auto.
    Fpga,
}

/// Where backends come from: the choice and the settings each backend needs.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// The choice.
    pub choice: BackendChoice,
    /// `--ort-lib`: an explicit ONNX Runtime library (or directory holding it).
    pub ort_lib: Option<PathBuf>,
    /// `--fpga-device`: the device accelerator images run on.
    pub fpga_device: kiln_fpga::backend::DeviceSpec,
    /// `--fpga-timeout`: how long one accelerator command may take.
    pub fpga_timeout: std::time::Duration,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            choice: BackendChoice::Auto,
            ort_lib: None,
            fpga_device: kiln_fpga::backend::DeviceSpec::Emulated(2),
            fpga_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// A backend picked for a model, with the reason, for the log and for `inspect`.
pub struct Selected {
    /// The backend.
    pub backend: Box<dyn Backend>,
    /// Why this one.
    pub reason: String,
}

impl BackendConfig {
    fn make(&self, choice: BackendChoice) -> Box<dyn Backend> {
        match choice {
            BackendChoice::Tract => Box::new(TractBackend::new()),
            BackendChoice::Fpga => {
                Box::new(kiln_fpga::backend::FpgaBackend::new(self.fpga_device.clone(), self.fpga_timeout))
            }
            BackendChoice::Ort | BackendChoice::Auto => Box::new(OrtBackend::new(self.ort_lib.clone())),
        }
    }

    /// Every concrete backend, in `auto`'s order of preference.
    pub fn candidates(&self) -> Vec<Box<dyn Backend>> {
        vec![self.make(BackendChoice::Ort), self.make(BackendChoice::Tract)]
    }

    /// Picks the backend for `model`. An explicit choice that cannot run the model is an error,
    /// never a silent switch to another engine.
    pub fn select(&self, model: &ModelFile) -> Result<Selected, Error> {
        if kiln_fpga::image::AcceleratorImage::sniff(model.bytes()) && self.choice != BackendChoice::Fpga {
            return Err(Error::InvalidModel {
                path: model.path().to_path_buf(),
                reason: "this is an accelerator image: run it with --backend fpga".into(),
            });
        }
        if self.choice != BackendChoice::Auto {
            let backend = self.make(self.choice);
            backend.check()?;
            backend.supports(model)?.into_result(backend.name())?;
            return Ok(Selected { reason: "chosen with --backend".into(), backend });
        }
        let mut passed_over = Vec::new();
        for backend in self.candidates() {
            if let Err(e) = backend.check() {
                passed_over.push(e.to_string());
                continue;
            }
            let support = backend.supports(model)?;
            if support.is_full() {
                let reason = if passed_over.is_empty() {
                    format!("{} is usable here and supports every operator of the model", backend.name())
                } else {
                    format!(
                        "{} supports every operator of the model; passed over: {}",
                        backend.name(),
                        passed_over.join("; ")
                    )
                };
                return Ok(Selected { backend, reason });
            }
            passed_over.push(
                Error::Unsupported { backend: backend.name(), ops: support.unsupported_ops }.to_string(),
            );
        }
        Err(Error::Unavailable {
            backend: "auto",
            reason: format!("no backend can run this model: {}", passed_over.join("; ")),
        })
    }
}
