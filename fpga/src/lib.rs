//! Kiln's FPGA accelerator path.
//!
//! Models run on an int8 GEMM accelerator behind the same scoring seam as the ONNX backends: the
//! compiler claims the supported subgraph (Conv, Gemm/MatMul with fused Relu), quantizes it per
//! channel from calibration data and emits an accelerator image; the rest runs on the CPU through
//! tract. Devices sit behind [`device::Device`], shaped like XRT/VART/OPAE: the bit-exact
//! emulator (what CI runs), the Verilator co-simulation of the RTL compute unit (`rtl-sim`), and
//! the XRT driver (`xrt`), which reports "no device" when there is no board.

pub mod backend;
pub mod compile;
pub mod device;
pub mod emulated;
pub mod image;
pub mod numerics;
pub mod op;
pub mod runtime;

#[cfg(feature = "rtl-sim")]
pub mod rtl_sim;

#[cfg(feature = "xrt")]
pub mod xrt;
