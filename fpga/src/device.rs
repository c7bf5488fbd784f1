//! The device seam, shaped like real FPGA runtimes (XRT, Vitis AI VART, OPAE): query the device,
//! load an accelerator image, allocate device buffers, move data by DMA, submit a command to a
//! compute unit, wait with a timeout for its completion report.

use std::time::Duration;

use crate::image::AcceleratorImage;
use crate::numerics::{Requant, TileQuant, TileShape};

/// What a device is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// Kind: `emulated`, `rtl-sim`, `xrt`.
    pub kind: String,
    /// Human name.
    pub name: String,
    /// Compute units available.
    pub compute_units: usize,
    /// Systolic array rows × columns of each compute unit.
    pub array: (usize, usize),
    /// Largest reduction length per command.
    pub max_k: usize,
    /// Numerics contract version implemented.
    pub numerics_version: u32,
    /// Modelled (or real) clock.
    pub clock_hz: u64,
}

impl DeviceInfo {
    /// A device implementing this build's numerics contract: its array, K limit, version and
    /// modelled clock.
    pub fn for_contract(kind: &str, name: String, compute_units: usize) -> Self {
        use crate::numerics::{ARRAY_COLS, ARRAY_ROWS, CLOCK_HZ, MAX_K, NUMERICS_VERSION};
        DeviceInfo {
            kind: kind.into(),
            name,
            compute_units,
            array: (ARRAY_ROWS, ARRAY_COLS),
            max_k: MAX_K,
            numerics_version: NUMERICS_VERSION,
            clock_hz: CLOCK_HZ,
        }
    }
}

/// A device buffer handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(pub u64);

/// One GEMM tile command: operands already in device buffers.
#[derive(Clone, Debug)]
pub struct TileCommand {
    /// Shape.
    pub shape: TileShape,
    /// Quantization parameters.
    pub quant: TileQuant,
    /// A (R×K int8).
    pub a: BufferId,
    /// W (K×C int8).
    pub w: BufferId,
    /// bias (C int32, little-endian).
    pub bias: BufferId,
    /// Requantization (C × (i32 multiplier, u8 shift) packed as 5 bytes each).
    pub requant: BufferId,
    /// Output (R×C int8).
    pub out: BufferId,
}

/// A submitted command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RunHandle(pub u64);

/// The completion report of a command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Cycles of the compute unit (modelled for emulated and simulated devices).
    pub cycles: u64,
    /// MACs performed.
    pub macs: u64,
    /// Compute unit that ran it.
    pub compute_unit: usize,
}

/// Device errors.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No such device on this machine.
    #[error("no device: {0}")]
    NoDevice(String),
    /// The accelerator image does not fit this device.
    #[error("{0}")]
    IncompatibleImage(String),
    /// A command did not complete in time.
    #[error("compute unit did not complete within {0:?}")]
    Timeout(Duration),
    /// Bad buffer, bad command, device fault.
    #[error("{0}")]
    Fault(String),
}

/// Encodes per-channel requantization for a device buffer.
pub fn pack_requant(rq: &[Requant]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rq.len() * 5);
    for q in rq {
        out.extend_from_slice(&q.multiplier.to_le_bytes());
        out.push(q.shift);
    }
    out
}

/// Decodes [`pack_requant`].
pub fn unpack_requant(b: &[u8]) -> Vec<Requant> {
    b.chunks_exact(5)
        .map(|c| Requant { multiplier: i32::from_le_bytes([c[0], c[1], c[2], c[3]]), shift: c[4] })
        .collect()
}

/// An accelerator.
pub trait Device: Send + Sync {
    /// What it is.
    fn info(&self) -> DeviceInfo;
    /// Loads (programs) an accelerator image; refuses one built for another array or numerics.
    fn load_image(&self, image: &AcceleratorImage) -> Result<(), DeviceError>;
    /// Allocates a device buffer.
    fn alloc(&self, bytes: usize) -> Result<BufferId, DeviceError>;
    /// Frees a buffer.
    fn free(&self, buf: BufferId);
    /// Host to device DMA.
    fn write(&self, buf: BufferId, offset: usize, data: &[u8]) -> Result<(), DeviceError>;
    /// Device to host DMA.
    fn read(&self, buf: BufferId, offset: usize, out: &mut [u8]) -> Result<(), DeviceError>;
    /// Queues a command on a compute unit.
    fn submit(&self, cmd: TileCommand) -> Result<RunHandle, DeviceError>;
    /// Waits for a command, up to `timeout`.
    fn wait(&self, run: RunHandle, timeout: Duration) -> Result<RunReport, DeviceError>;
    /// Bytes moved by DMA so far (both directions).
    fn dma_bytes(&self) -> u64;
}
