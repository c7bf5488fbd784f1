//! The Xilinx Runtime (XRT) device: the real-driver path, for a card programmed with the
//! `kiln_gemm_tile` kernel built from `fpga/rtl/`. Compiled only with the `xrt` feature, against
//! Debian's libxrt-dev (through the C ABI layer in `fpga/xrt/kiln_xrt.cpp`, which turns XRT's C++ exceptions into
//! error returns). Without a board,
//! [`XrtDevice::open`] reports "no device" and nothing else happens.

use std::collections::HashMap;
use std::ffi::{CString, c_int, c_uint, c_void};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::device::{BufferId, Device, DeviceError, DeviceInfo, RunHandle, RunReport, TileCommand};
use crate::image::AcceleratorImage;
use crate::numerics;

unsafe extern "C" {
    fn kiln_xrt_open(index: c_uint) -> *mut c_void;
    fn kiln_xrt_close(dev: *mut c_void) -> c_int;
    fn kiln_xrt_load_xclbin(dev: *mut c_void, path: *const std::ffi::c_char, uuid: *mut u8) -> c_int;
    fn kiln_xrt_kernel_open(dev: *mut c_void, uuid: *const u8, name: *const std::ffi::c_char) -> *mut c_void;
    fn kiln_xrt_kernel_close(kernel: *mut c_void) -> c_int;
    fn kiln_xrt_arg_group(kernel: *mut c_void, argno: c_int) -> c_int;
    fn kiln_xrt_bo_alloc(dev: *mut c_void, size: usize, group: c_int) -> *mut c_void;
    fn kiln_xrt_bo_free(bo: *mut c_void) -> c_int;
    fn kiln_xrt_bo_write(bo: *mut c_void, src: *const c_void, size: usize, seek: usize) -> c_int;
    fn kiln_xrt_bo_read(bo: *mut c_void, dst: *mut c_void, size: usize, skip: usize) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn kiln_xrt_run_tile(
        kernel: *mut c_void,
        a: *mut c_void,
        w: *mut c_void,
        bias: *mut c_void,
        requant: *mut c_void,
        out: *mut c_void,
        r: c_int,
        k: c_int,
        c: c_int,
        zp_a: c_int,
        zp_y: c_int,
        relu: c_int,
    ) -> *mut c_void;
    fn kiln_xrt_run_wait(run: *mut c_void, timeout_ms: c_uint) -> c_int;
    fn kiln_xrt_run_close(run: *mut c_void);
    fn kiln_xrt_errno() -> c_int;
    fn kiln_xrt_last_error() -> *const std::ffi::c_char;
}

/// The message of the last XRT exception on this thread, if the last call threw.
fn last_error() -> Option<String> {
    // SAFETY: returns a pointer to a NUL-terminated thread-local string that stays valid until the
    // next shim call on this thread; it is copied out at once.
    let msg = unsafe { std::ffi::CStr::from_ptr(kiln_xrt_last_error()) }.to_string_lossy().into_owned();
    (!msg.is_empty()).then_some(msg)
}

/// `msg`, with the exception XRT threw if it did.
fn with_xrt_error(msg: impl Into<String>) -> String {
    let msg = msg.into();
    match last_error() {
        Some(why) => format!("{msg}: {why}"),
        None => msg,
    }
}

/// A raw XRT handle owned by this device.
#[derive(Clone, Copy, Debug)]
struct Handle(*mut c_void);
// SAFETY: XRT handles are plain references to driver objects, documented as usable from any
// thread; every use below is serialised by the device's mutexes.
unsafe impl Send for Handle {}
// SAFETY: as above: shared references only ever pass the pointer value to XRT calls under a lock.
unsafe impl Sync for Handle {}

/// An FPGA card driven through XRT.
pub struct XrtDevice {
    index: u32,
    device: Handle,
    kernel: Mutex<Option<Handle>>,
    buffers: Mutex<HashMap<BufferId, (Handle, usize)>>,
    runs: Mutex<HashMap<RunHandle, (Handle, Instant, u64)>>,
    next: AtomicU64,
    dma: AtomicU64,
}

impl XrtDevice {
    /// Opens card `index`; without a board (or driver) this is [`DeviceError::NoDevice`].
    pub fn open(index: u32) -> Result<Self, DeviceError> {
        // SAFETY: xrtDeviceOpen takes any index and returns NULL when there is no such device.
        let dev = unsafe { kiln_xrt_open(index) };
        if dev.is_null() {
            let why = last_error().unwrap_or_else(|| {
                // SAFETY: reads the calling thread's errno, set by the failed open.
                std::io::Error::from_raw_os_error(unsafe { kiln_xrt_errno() }).to_string()
            });
            return Err(DeviceError::NoDevice(format!(
                "no XRT device at index {index} (xrtDeviceOpen failed: {why}); is a Xilinx card installed with its driver and XRT set up?"
            )));
        }
        Ok(XrtDevice {
            index,
            device: Handle(dev),
            kernel: Mutex::new(None),
            buffers: Mutex::new(HashMap::new()),
            runs: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            dma: AtomicU64::new(0),
        })
    }

    fn kernel(&self) -> Result<Handle, DeviceError> {
        self.kernel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| DeviceError::Fault("no accelerator image loaded".into()))
    }
}

impl Drop for XrtDevice {
    fn drop(&mut self) {
        for (_, (bo, _)) in self.buffers.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            // SAFETY: each buffer handle came from xrtBOAlloc on this device and is freed once.
            unsafe { kiln_xrt_bo_free(bo.0) };
        }
        if let Some(k) = self.kernel.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // SAFETY: the kernel handle came from xrtPLKernelOpen and is closed once.
            unsafe { kiln_xrt_kernel_close(k.0) };
        }
        // SAFETY: the device handle came from xrtDeviceOpen and is closed once, last.
        unsafe { kiln_xrt_close(self.device.0) };
    }
}

impl Device for XrtDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo::for_contract("xrt", format!("XRT device {}", self.index), 1)
    }

    fn load_image(&self, image: &AcceleratorImage) -> Result<(), DeviceError> {
        image.check_compatible(&self.info())?;
        let xclbin = std::env::var("KILN_XRT_XCLBIN").map_err(|_| {
            DeviceError::Fault(
                "set KILN_XRT_XCLBIN to the xclbin built from fpga/rtl (kernel kiln_gemm_tile)".into(),
            )
        })?;
        let path = CString::new(xclbin.clone())
            .map_err(|_| DeviceError::Fault("KILN_XRT_XCLBIN has a NUL byte".into()))?;
        let mut uuid = [0u8; 16];
        // SAFETY: the device handle is open, `path` is NUL-terminated, `uuid` has the 16 bytes XRT writes.
        if unsafe { kiln_xrt_load_xclbin(self.device.0, path.as_ptr(), uuid.as_mut_ptr()) } != 0 {
            return Err(DeviceError::Fault(with_xrt_error(format!("XRT could not load {xclbin}"))));
        }
        let name = CString::new("kiln_gemm_tile").map_err(|_| DeviceError::Fault("kernel name".into()))?;
        // SAFETY: uuid is the loaded xclbin's id; name is NUL-terminated.
        let kernel = unsafe { kiln_xrt_kernel_open(self.device.0, uuid.as_ptr(), name.as_ptr()) };
        if kernel.is_null() {
            return Err(DeviceError::Fault(with_xrt_error(format!("{xclbin} has no kernel kiln_gemm_tile"))));
        }
        *self.kernel.lock().unwrap_or_else(|p| p.into_inner()) = Some(Handle(kernel));
        Ok(())
    }

    fn alloc(&self, bytes: usize) -> Result<BufferId, DeviceError> {
        let kernel = self.kernel()?;
        // SAFETY: kernel is open; argument 0's memory bank serves every buffer of the kernel.
        let group = unsafe { kiln_xrt_arg_group(kernel.0, 0) };
        // SAFETY: the device handle is open; XRT returns NULL on failure.
        let bo = unsafe { kiln_xrt_bo_alloc(self.device.0, bytes.max(1), group) };
        if bo.is_null() {
            return Err(DeviceError::Fault(with_xrt_error(format!("XRT could not allocate {bytes} bytes"))));
        }
        let id = BufferId(self.next.fetch_add(1, Ordering::Relaxed));
        self.buffers.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (Handle(bo), bytes));
        Ok(id)
    }

    fn free(&self, buf: BufferId) {
        if let Some((bo, _)) = self.buffers.lock().unwrap_or_else(|p| p.into_inner()).remove(&buf) {
            // SAFETY: removed from the map, so freed exactly once.
            unsafe { kiln_xrt_bo_free(bo.0) };
        }
    }

    fn write(&self, buf: BufferId, offset: usize, data: &[u8]) -> Result<(), DeviceError> {
        let buffers = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let (bo, size) =
            buffers.get(&buf).copied().ok_or_else(|| DeviceError::Fault(format!("no buffer {buf:?}")))?;
        if offset.checked_add(data.len()).is_none_or(|e| e > size) {
            return Err(DeviceError::Fault("write past the end of a buffer".into()));
        }
        // SAFETY: the range was checked against the buffer's size; `data` is valid for its length.
        if unsafe { kiln_xrt_bo_write(bo.0, data.as_ptr().cast(), data.len(), offset) } != 0 {
            return Err(DeviceError::Fault(with_xrt_error("XRT buffer write failed")));
        }
        self.dma.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn read(&self, buf: BufferId, offset: usize, out: &mut [u8]) -> Result<(), DeviceError> {
        let buffers = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let (bo, size) =
            buffers.get(&buf).copied().ok_or_else(|| DeviceError::Fault(format!("no buffer {buf:?}")))?;
        if offset.checked_add(out.len()).is_none_or(|e| e > size) {
            return Err(DeviceError::Fault("read past the end of a buffer".into()));
        }
        // SAFETY: the range was checked; `out` is valid for writes of its length.
        if unsafe { kiln_xrt_bo_read(bo.0, out.as_mut_ptr().cast(), out.len(), offset) } != 0 {
            return Err(DeviceError::Fault(with_xrt_error("XRT buffer read failed")));
        }
        self.dma.fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn submit(&self, cmd: TileCommand) -> Result<RunHandle, DeviceError> {
        let kernel = self.kernel()?;
        let buffers = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let bo = |id: BufferId| {
            buffers.get(&id).map(|(h, _)| h.0).ok_or_else(|| DeviceError::Fault(format!("no buffer {id:?}")))
        };
        let (a, w, bias, rq, out) = (bo(cmd.a)?, bo(cmd.w)?, bo(cmd.bias)?, bo(cmd.requant)?, bo(cmd.out)?);
        let s = cmd.shape;
        // SAFETY: every handle is a live buffer of this device (looked up under the lock held
        // for the call); scalars are passed by value.
        let run = unsafe {
            kiln_xrt_run_tile(
                kernel.0,
                a,
                w,
                bias,
                rq,
                out,
                s.r as c_int,
                s.k as c_int,
                s.c as c_int,
                c_int::from(cmd.quant.zp_a),
                c_int::from(cmd.quant.zp_y),
                c_int::from(cmd.quant.relu),
            )
        };
        if run.is_null() {
            return Err(DeviceError::Fault(with_xrt_error("XRT could not start the kernel")));
        }
        let id = RunHandle(self.next.fetch_add(1, Ordering::Relaxed));
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (Handle(run), Instant::now(), numerics::tile_macs(s)));
        Ok(id)
    }

    fn wait(&self, run: RunHandle, timeout: Duration) -> Result<RunReport, DeviceError> {
        let (h, started, macs) = self
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&run)
            .ok_or_else(|| DeviceError::Fault(format!("unknown run {run:?}")))?;
        let ms = timeout.as_millis().min(u128::from(u32::MAX)) as c_uint;
        // SAFETY: `h` is a started run, removed from the map so waited on once.
        if unsafe { kiln_xrt_run_wait(h.0, ms) } < 0 {
            // SAFETY: a run that did not complete is still open: close it once.
            unsafe { kiln_xrt_run_close(h.0) };
            return Err(DeviceError::Timeout(timeout));
        }
        // A real card reports wall time; cycles are that time at the kernel clock.
        let cycles = (started.elapsed().as_secs_f64() * numerics::CLOCK_HZ as f64) as u64;
        Ok(RunReport { cycles, macs, compute_unit: 0 })
    }

    fn dma_bytes(&self) -> u64 {
        self.dma.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_board_open_reports_no_device() {
        match XrtDevice::open(0) {
            // The exception XRT throws here (no XILINX_XRT, no driver) is caught in the shim and
            // named, instead of aborting the process.
            Err(DeviceError::NoDevice(msg)) => {
                assert!(
                    msg.contains("no XRT device at index 0") && msg.contains("xrtDeviceOpen failed: "),
                    "{msg}"
                )
            }
            Err(other) => panic!("expected NoDevice, got {other}"),
            Ok(dev) => assert_eq!(dev.info().kind, "xrt"),
        }
    }
}
