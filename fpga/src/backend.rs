//! `--backend fpga`: the scoring seam over an accelerator image. The accelerated layers run on
//! the configured device; everything else in the host graph runs on the CPU through tract. A
//! device that was asked for is used or the load fails: there is no silent fallback to the CPU.

use std::sync::Arc;
use std::time::Duration;

use kiln_runtime_core::{Backend, Error, LoadOptions, ModelFile, Session, Support};

use crate::device::Device;
use crate::emulated::EmulatedDevice;
use crate::image::AcceleratorImage;
use crate::runtime::AccelRuntime;

const NAME: &str = "fpga";

/// Which device runs the accelerated layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The bit-exact emulator with N compute units.
    Emulated(usize),
    /// The RTL compute unit in Verilator (built with the `rtl-sim` feature).
    RtlSim,
    /// A Xilinx card through XRT (built with the `xrt` feature).
    Xrt(u32),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "emulated" => Ok(DeviceSpec::Emulated(2)),
            None if s == "rtl-sim" => Ok(DeviceSpec::RtlSim),
            Some(("emulated", n)) => n
                .parse()
                .ok()
                .filter(|&n| (1..=64).contains(&n))
                .map(DeviceSpec::Emulated)
                .ok_or_else(|| format!("emulated:{n}: the compute-unit count must be 1..=64")),
            Some(("xrt", n)) => {
                n.parse().map(DeviceSpec::Xrt).map_err(|_| format!("xrt:{n}: expected a device index"))
            }
            _ => Err(format!("unknown FPGA device {s:?}; use emulated[:N], rtl-sim or xrt:INDEX")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Emulated(n) => write!(f, "emulated:{n}"),
            DeviceSpec::RtlSim => f.write_str("rtl-sim"),
            DeviceSpec::Xrt(i) => write!(f, "xrt:{i}"),
        }
    }
}

/// Opens a device.
pub fn open(spec: &DeviceSpec) -> Result<Arc<dyn Device>, Error> {
    let unavailable = |reason: String| Error::Unavailable { backend: NAME, reason };
    match spec {
        DeviceSpec::Emulated(n) => Ok(Arc::new(EmulatedDevice::new(*n))),
        #[cfg(feature = "rtl-sim")]
        DeviceSpec::RtlSim => crate::emulated::rtl_sim_device()
            .map(|d| Arc::new(d) as Arc<dyn Device>)
            .map_err(|e| unavailable(e.to_string())),
        #[cfg(not(feature = "rtl-sim"))]
        DeviceSpec::RtlSim => Err(unavailable(
            "this kiln was built without the rtl-sim feature (Verilator co-simulation)".into(),
        )),
        #[cfg(feature = "xrt")]
        DeviceSpec::Xrt(i) => crate::xrt::XrtDevice::open(*i)
            .map(|d| Arc::new(d) as Arc<dyn Device>)
            .map_err(|e| unavailable(e.to_string())),
        #[cfg(not(feature = "xrt"))]
        DeviceSpec::Xrt(i) => {
            Err(unavailable(format!("xrt:{i}: this kiln was built without the xrt feature (Xilinx Runtime)")))
        }
    }
}

/// The FPGA backend.
#[derive(Clone, Debug)]
pub struct FpgaBackend {
    device: DeviceSpec,
    timeout: Duration,
}

impl FpgaBackend {
    /// A backend on `device`, failing a command that does not complete within `timeout`.
    pub fn new(device: DeviceSpec, timeout: Duration) -> Self {
        FpgaBackend { device, timeout }
    }
}

fn image_of(model: &ModelFile) -> Result<AcceleratorImage, Error> {
    if !AcceleratorImage::sniff(model.bytes()) {
        return Err(Error::InvalidModel {
            path: model.path().to_path_buf(),
            reason: "--backend fpga runs accelerator images; compile the model first: kiln fpga compile MODEL --calibration DATA -o IMAGE".into(),
        });
    }
    AcceleratorImage::parse(model.bytes())
        .map_err(|e| Error::InvalidModel { path: model.path().to_path_buf(), reason: e.to_string() })
}

impl Backend for FpgaBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self) -> Result<(), Error> {
        open(&self.device).map(|_| ())
    }

    fn supports(&self, model: &ModelFile) -> Result<Support, Error> {
        // Anything but a valid accelerator image is an error here, not a partial support: the
        // FPGA backend is only ever chosen explicitly, and must say exactly what to do instead.
        image_of(model).map(|_| Support::default())
    }

    fn load(&self, model: &ModelFile, options: &LoadOptions) -> Result<Box<dyn Session>, Error> {
        let image = Arc::new(image_of(model)?);
        let device = open(&self.device)?;
        let runtime = AccelRuntime::new(device, Arc::clone(&image), self.timeout)
            .map_err(|e| Error::InvalidModel { path: model.path().to_path_buf(), reason: e.to_string() })?;
        let runtime = Arc::new(runtime);
        let host = ModelFile::from_bytes(model.path().to_path_buf(), image.host_graph().to_vec());
        let mut onnx = tract_onnx::onnx();
        crate::op::register(&mut onnx.op_register);
        let session = crate::op::with_runtime(runtime, || {
            kiln_runtime_tract::TractSession::load_with(&host, options, &onnx)
        })?;
        Ok(Box::new(session))
    }
}
