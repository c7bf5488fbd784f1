//! Verilator co-simulation of the RTL compute unit (`fpga/rtl/gemm_tile.v`): the model and a
//! small C ABI shim (`fpga/sim/`) are compiled by `build.rs` under the `rtl-sim` feature, and
//! [`RtlTile`] drives one simulated compute unit cycle by cycle through its host interface.

use std::ptr::NonNull;

use crate::numerics::{Requant, TileQuant, TileShape, check_tile, tile_cycles};

/// Opaque handle of the C++ shim (`kiln_tile_sim`).
#[repr(C)]
struct RawSim {
    _opaque: [u8; 0],
}

/// `kiln_tile_args` of `fpga/sim/kiln_tile_sim.h`; field order and types must match.
#[repr(C)]
struct TileArgs {
    r: u32,
    k: u32,
    c: u32,
    zp_a: i8,
    zp_y: i8,
    relu: u8,
    reserved: u8,
    a: *const i8,
    w: *const i8,
    bias: *const i32,
    m0: *const i32,
    shift: *const u8,
    max_cycles: u64,
}

const SIM_OK: i32 = 0;
const SIM_BAD_ARGS: i32 = -1;
const SIM_NOT_STARTED: i32 = -2;
const SIM_TIMEOUT: i32 = -3;

unsafe extern "C" {
    fn kiln_tile_sim_new() -> *mut RawSim;
    fn kiln_tile_sim_free(sim: *mut RawSim);
    fn kiln_tile_sim_run(sim: *mut RawSim, args: *const TileArgs, out: *mut i8, cycles: *mut u64) -> i32;
    fn kiln_tile_sim_total_cycles(sim: *const RawSim) -> u64;
}

/// One simulated RTL compute unit (a Verilator model instance with its own context).
pub struct RtlTile {
    raw: NonNull<RawSim>,
}

// SAFETY: the handle exclusively owns its Verilator context and model (no state shared with other
// handles, no thread-local state used by this design, which has no $display/$finish), and every
// use goes through `&mut self` or `&self` methods that only read, so moving it to another thread
// is sound; it is not `Sync` because the shim is not safe for concurrent calls.
unsafe impl Send for RtlTile {}

impl RtlTile {
    /// Creates and resets a simulated compute unit.
    pub fn new() -> Result<Self, String> {
        // SAFETY: `kiln_tile_sim_new` has no preconditions; it returns an owned handle or null.
        let raw = unsafe { kiln_tile_sim_new() };
        NonNull::new(raw)
            .map(|raw| RtlTile { raw })
            .ok_or_else(|| "cannot create the Verilator model of the compute unit".to_string())
    }

    /// Runs one tile through the RTL; returns the R×C outputs (row-major) and the measured cycles
    /// from the clock edge that samples `start` to the first edge with `done` high.
    pub fn run(
        &mut self,
        shape: TileShape,
        a: &[i8],
        w: &[i8],
        bias: &[i32],
        rq: &[Requant],
        q: TileQuant,
    ) -> Result<(Vec<i8>, u64), String> {
        check_tile(shape, a, w, bias, rq)?;
        let m0: Vec<i32> = rq.iter().map(|x| x.multiplier).collect();
        let shift: Vec<u8> = rq.iter().map(|x| x.shift).collect();
        let expected = tile_cycles(shape);
        let args = TileArgs {
            r: u32::try_from(shape.r).map_err(|e| e.to_string())?,
            k: u32::try_from(shape.k).map_err(|e| e.to_string())?,
            c: u32::try_from(shape.c).map_err(|e| e.to_string())?,
            zp_a: q.zp_a,
            zp_y: q.zp_y,
            relu: u8::from(q.relu),
            reserved: 0,
            a: a.as_ptr(),
            w: w.as_ptr(),
            bias: bias.as_ptr(),
            m0: m0.as_ptr(),
            shift: shift.as_ptr(),
            max_cycles: 2 * expected + 256,
        };
        let mut out = vec![0i8; shape.r * shape.c];
        let mut cycles = 0u64;
        // SAFETY: `self.raw` is a live handle used by this thread only (`&mut self`); `args`
        // points at slices that `check_tile` verified hold r*k, k*c, c, c and c elements and that
        // outlive the call; `out` has room for the r*c outputs the shim writes; `cycles` is a
        // valid `u64`. The shim does not retain any pointer after returning.
        let status = unsafe { kiln_tile_sim_run(self.raw.as_ptr(), &args, out.as_mut_ptr(), &mut cycles) };
        match status {
            SIM_OK => Ok((out, cycles)),
            SIM_BAD_ARGS => Err(format!("rtl-sim rejected tile {}x{}x{}", shape.r, shape.k, shape.c)),
            SIM_NOT_STARTED => Err("rtl-sim: the compute unit did not start".into()),
            SIM_TIMEOUT => Err(format!(
                "rtl-sim: done did not rise within {} cycles (expected {expected})",
                args.max_cycles
            )),
            other => Err(format!("rtl-sim: unknown status {other}")),
        }
    }

    /// Clock edges this instance has simulated so far (host writes, compute and reset).
    pub fn total_cycles(&self) -> u64 {
        // SAFETY: `self.raw` is a live handle; the call only reads a counter.
        unsafe { kiln_tile_sim_total_cycles(self.raw.as_ptr()) }
    }
}

impl Drop for RtlTile {
    fn drop(&mut self) {
        // SAFETY: `self.raw` came from `kiln_tile_sim_new`, is freed exactly once, here, and is
        // never used afterwards.
        unsafe { kiln_tile_sim_free(self.raw.as_ptr()) }
    }
}

impl std::fmt::Debug for RtlTile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtlTile").field("total_cycles", &self.total_cycles()).finish()
    }
}
