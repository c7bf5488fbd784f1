//! The emulated device: what CI runs. It implements the numerics contract exactly, with one
//! worker thread per simulated compute unit and cycle counts from the datapath model
//! (`numerics::tile_cycles`). Its GEMM is written differently from the golden reference
//! (zero-point correction by column sums, i32 dot products) and property-tested against it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::device::{
    BufferId, Device, DeviceError, DeviceInfo, RunHandle, RunReport, TileCommand, unpack_requant,
};
use crate::image::AcceleratorImage;
use crate::numerics::{self, ARRAY_COLS, Requant, TileQuant, TileShape};

/// The emulator's GEMM tile: `acc = bias + Σ a·w − zp_a·Σ_k w`, the zero point folded out of the
/// inner loop. Bit-identical to [`numerics::tile`] by algebra; property tests check it.
pub fn emulate_tile(
    shape: TileShape,
    a: &[i8],
    w: &[i8],
    bias: &[i32],
    rq: &[Requant],
    q: TileQuant,
) -> Vec<i8> {
    let TileShape { r, k, c } = shape;
    let mut col_sums = [0i32; ARRAY_COLS];
    // Transposed W: each output channel's weights contiguous, for a straight dot product.
    let mut wt = vec![0i32; c * k];
    for kk in 0..k {
        for col in 0..c {
            let v = i32::from(w[kk * c + col]);
            wt[col * k + kk] = v;
            col_sums[col] += v;
        }
    }
    let zp = i32::from(q.zp_a);
    let mut out = vec![0i8; r * c];
    for row in 0..r {
        let arow: Vec<i32> = a[row * k..(row + 1) * k].iter().map(|&v| i32::from(v)).collect();
        for col in 0..c {
            let dot: i32 = arow.iter().zip(&wt[col * k..(col + 1) * k]).map(|(x, y)| x * y).sum();
            let acc = bias[col] + dot - zp * col_sums[col];
            out[row * c + col] = numerics::requantize(acc, rq[col], q);
        }
    }
    out
}

/// Fault injection for tests: stall every `every`-th command by `stall`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Stall one command in this many (0 = never).
    pub every: u64,
    /// How long a stalled command takes.
    pub stall: Duration,
}

impl Faults {
    /// From `KILN_FPGA_FAULT=stall:MS:EVERY` (e.g. `stall:500:3`), for tests of timeouts.
    pub fn from_env() -> Self {
        let Ok(v) = std::env::var("KILN_FPGA_FAULT") else { return Faults::default() };
        let parts: Vec<&str> = v.split(':').collect();
        match parts.as_slice() {
            ["stall", ms, every] => Faults {
                stall: Duration::from_millis(ms.parse().unwrap_or(0)),
                every: every.parse().unwrap_or(0),
            },
            _ => Faults::default(),
        }
    }
}

struct Job {
    cmd: TileCommand,
    a: Vec<i8>,
    w: Vec<i8>,
    bias: Vec<i32>,
    rq: Vec<Requant>,
    done: Sender<Result<RunReport, DeviceError>>,
}

struct Shared {
    buffers: Mutex<HashMap<BufferId, Vec<u8>>>,
    next_buffer: AtomicU64,
    next_run: AtomicU64,
    runs: Mutex<HashMap<RunHandle, Receiver<Result<RunReport, DeviceError>>>>,
    dma_bytes: AtomicU64,
    commands: AtomicU64,
    image: Mutex<Option<String>>,
    faults: Faults,
}

/// What computes a tile on a compute unit.
enum Engine {
    /// [`emulate_tile`], cycles from the datapath model.
    Emulator,
    /// The RTL compute unit in Verilator, cycles as measured by the simulation.
    #[cfg(feature = "rtl-sim")]
    Rtl(crate::rtl_sim::RtlTile),
}

impl Engine {
    fn run(&mut self, job: &Job) -> Result<(Vec<i8>, u64), DeviceError> {
        let shape = job.cmd.shape;
        match self {
            Engine::Emulator => Ok((
                emulate_tile(shape, &job.a, &job.w, &job.bias, &job.rq, job.cmd.quant),
                numerics::tile_cycles(shape),
            )),
            #[cfg(feature = "rtl-sim")]
            Engine::Rtl(tile) => {
                tile.run(shape, &job.a, &job.w, &job.bias, &job.rq, job.cmd.quant).map_err(DeviceError::Fault)
            }
        }
    }
}

/// A bit-exact emulation of the accelerator card: the emulator, or (with the `rtl-sim` feature)
/// the same card with the Verilator model of the RTL as its compute unit.
pub struct EmulatedDevice {
    shared: Arc<Shared>,
    workers: Vec<Sender<Job>>,
    next_cu: AtomicUsize,
    rtl: bool,
}

/// A device whose compute unit is the RTL in Verilator (`--fpga-device rtl-sim`): same buffers,
/// DMA and command queue as the emulator, with outputs and cycle counts from the simulated
/// hardware.
#[cfg(feature = "rtl-sim")]
pub fn rtl_sim_device() -> Result<EmulatedDevice, DeviceError> {
    let tile = crate::rtl_sim::RtlTile::new().map_err(DeviceError::NoDevice)?;
    Ok(EmulatedDevice::with_engines(vec![Engine::Rtl(tile)], Faults::from_env(), true))
}

fn as_i8(b: &[u8]) -> Vec<i8> {
    b.iter().map(|&x| x as i8).collect()
}

impl EmulatedDevice {
    /// A device with `compute_units` compute units (one worker thread each).
    pub fn new(compute_units: usize) -> Self {
        Self::with_faults(compute_units, Faults::from_env())
    }

    /// A device with injected faults.
    pub fn with_faults(compute_units: usize, faults: Faults) -> Self {
        Self::with_engines((0..compute_units.max(1)).map(|_| Engine::Emulator).collect(), faults, false)
    }

    fn with_engines(engines: Vec<Engine>, faults: Faults, rtl: bool) -> Self {
        let shared = Arc::new(Shared {
            buffers: Mutex::new(HashMap::new()),
            next_buffer: AtomicU64::new(1),
            next_run: AtomicU64::new(1),
            runs: Mutex::new(HashMap::new()),
            dma_bytes: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            image: Mutex::new(None),
            faults,
        });
        let workers = engines
            .into_iter()
            .enumerate()
            .map(|(cu, mut engine)| {
                let (tx, rx) = channel::<Job>();
                let shared = Arc::clone(&shared);
                // A worker that cannot start leaves its channel closed; submit() reports it.
                let _ = std::thread::Builder::new().name(format!("kiln-fpga-cu{cu}")).spawn(move || {
                    for job in rx {
                        let n = shared.commands.fetch_add(1, Ordering::Relaxed) + 1;
                        if shared.faults.every > 0 && n.is_multiple_of(shared.faults.every) {
                            std::thread::sleep(shared.faults.stall);
                        }
                        let (out, cycles) = match engine.run(&job) {
                            Ok(done) => done,
                            Err(e) => {
                                let _ = job.done.send(Err(e));
                                continue;
                            }
                        };
                        let report =
                            RunReport { cycles, macs: numerics::tile_macs(job.cmd.shape), compute_unit: cu };
                        // The result lands in the output buffer, as the card's DMA engine writes it.
                        let written = {
                            let mut buffers = shared.buffers.lock().unwrap_or_else(|p| p.into_inner());
                            match buffers.get_mut(&job.cmd.out) {
                                Some(b) if b.len() >= out.len() => {
                                    for (d, s) in b.iter_mut().zip(&out) {
                                        *d = *s as u8;
                                    }
                                    Ok(report)
                                }
                                _ => Err(DeviceError::Fault("output buffer freed or too small".into())),
                            }
                        };
                        let _ = job.done.send(written);
                    }
                });
                tx
            })
            .collect();
        EmulatedDevice { shared, workers, next_cu: AtomicUsize::new(0), rtl }
    }

    fn lock_buffers(&self) -> std::sync::MutexGuard<'_, HashMap<BufferId, Vec<u8>>> {
        self.shared.buffers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Device for EmulatedDevice {
    fn info(&self) -> DeviceInfo {
        let (kind, name) = if self.rtl {
            ("rtl-sim", "Kiln GEMM accelerator (RTL compute unit in Verilator)")
        } else {
            ("emulated", "Kiln GEMM accelerator (bit-exact emulator)")
        };
        DeviceInfo::for_contract(kind, name.into(), self.workers.len())
    }

    fn load_image(&self, image: &AcceleratorImage) -> Result<(), DeviceError> {
        image.check_compatible(&self.info())?;
        *self.shared.image.lock().unwrap_or_else(|p| p.into_inner()) = Some(image.digest.clone());
        Ok(())
    }

    fn alloc(&self, bytes: usize) -> Result<BufferId, DeviceError> {
        let id = BufferId(self.shared.next_buffer.fetch_add(1, Ordering::Relaxed));
        self.lock_buffers().insert(id, vec![0u8; bytes]);
        Ok(id)
    }

    fn free(&self, buf: BufferId) {
        self.lock_buffers().remove(&buf);
    }

    fn write(&self, buf: BufferId, offset: usize, data: &[u8]) -> Result<(), DeviceError> {
        let mut buffers = self.lock_buffers();
        let b = buffers.get_mut(&buf).ok_or_else(|| DeviceError::Fault(format!("no buffer {buf:?}")))?;
        let end = offset.checked_add(data.len()).filter(|&e| e <= b.len()).ok_or_else(|| {
            DeviceError::Fault(format!(
                "write of {} bytes at {offset} past the end of a {}-byte buffer",
                data.len(),
                b.len()
            ))
        })?;
        b[offset..end].copy_from_slice(data);
        self.shared.dma_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn read(&self, buf: BufferId, offset: usize, out: &mut [u8]) -> Result<(), DeviceError> {
        let buffers = self.lock_buffers();
        let b = buffers.get(&buf).ok_or_else(|| DeviceError::Fault(format!("no buffer {buf:?}")))?;
        let end = offset.checked_add(out.len()).filter(|&e| e <= b.len()).ok_or_else(|| {
            DeviceError::Fault(format!(
                "read of {} bytes at {offset} past the end of a {}-byte buffer",
                out.len(),
                b.len()
            ))
        })?;
        out.copy_from_slice(&b[offset..end]);
        self.shared.dma_bytes.fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn submit(&self, cmd: TileCommand) -> Result<RunHandle, DeviceError> {
        if self.shared.image.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
            return Err(DeviceError::Fault("no accelerator image loaded".into()));
        }
        let TileShape { r, k, c } = cmd.shape;
        let (a, w, bias, rq) = {
            let buffers = self.lock_buffers();
            let get = |id: BufferId, len: usize, what: &str| -> Result<Vec<u8>, DeviceError> {
                let b =
                    buffers.get(&id).ok_or_else(|| DeviceError::Fault(format!("no {what} buffer {id:?}")))?;
                b.get(..len)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| DeviceError::Fault(format!("{what} buffer too small")))
            };
            let a = as_i8(&get(cmd.a, r * k, "A")?);
            let w = as_i8(&get(cmd.w, k * c, "W")?);
            let bias: Vec<i32> = get(cmd.bias, 4 * c, "bias")?
                .chunks_exact(4)
                .map(|x| i32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                .collect();
            let rq = unpack_requant(&get(cmd.requant, 5 * c, "requant")?);
            if !buffers.contains_key(&cmd.out) {
                return Err(DeviceError::Fault(format!("no output buffer {:?}", cmd.out)));
            }
            (a, w, bias, rq)
        };
        numerics::check_tile(cmd.shape, &a, &w, &bias, &rq).map_err(DeviceError::Fault)?;
        let (done, rx) = channel();
        let handle = RunHandle(self.shared.next_run.fetch_add(1, Ordering::Relaxed));
        let cu = self.next_cu.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        self.shared.runs.lock().unwrap_or_else(|p| p.into_inner()).insert(handle, rx);
        self.workers[cu]
            .send(Job { cmd, a, w, bias, rq, done })
            .map_err(|_| DeviceError::Fault(format!("compute unit {cu} is not running")))?;
        Ok(handle)
    }

    fn wait(&self, run: RunHandle, timeout: Duration) -> Result<RunReport, DeviceError> {
        let rx = self
            .shared
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&run)
            .ok_or_else(|| DeviceError::Fault(format!("unknown run {run:?}")))?;
        match rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(DeviceError::Timeout(timeout)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(DeviceError::Fault("the compute unit stopped".into()))
            }
        }
    }

    fn dma_bytes(&self) -> u64 {
        self.shared.dma_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::pack_requant;
    use crate::image::{AcceleratorImage, new_header};
    use crate::numerics::MAX_K;

    /// xorshift64*: seeded, reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn range(&mut self, lo: i64, hi: i64) -> i64 {
            lo + (self.next() % ((hi - lo + 1) as u64)) as i64
        }
    }

    fn random_tile(rng: &mut Rng) -> (TileShape, Vec<i8>, Vec<i8>, Vec<i32>, Vec<Requant>, TileQuant) {
        let k = if rng.next().is_multiple_of(10) { rng.range(1, MAX_K as i64) } else { rng.range(1, 96) }
            as usize;
        let shape = TileShape { r: rng.range(1, 8) as usize, k, c: rng.range(1, 8) as usize };
        let edge = |rng: &mut Rng, lo: i64, hi: i64| {
            if rng.next().is_multiple_of(8) {
                if rng.next().is_multiple_of(2) { lo } else { hi }
            } else {
                rng.range(lo, hi)
            }
        };
        let a = (0..shape.r * k).map(|_| edge(rng, -128, 127) as i8).collect();
        let w = (0..k * shape.c).map(|_| edge(rng, -127, 127) as i8).collect();
        let bias = (0..shape.c).map(|_| edge(rng, -(1 << 30) + 1, (1 << 30) - 1) as i32).collect();
        let rq = (0..shape.c)
            .map(|_| Requant {
                multiplier: edge(rng, 1 << 30, i64::from(i32::MAX)) as i32,
                shift: edge(rng, 0, 31) as u8,
            })
            .collect();
        let q = TileQuant {
            zp_a: edge(rng, -128, 127) as i8,
            zp_y: edge(rng, -128, 127) as i8,
            relu: rng.next().is_multiple_of(2),
        };
        (shape, a, w, bias, rq, q)
    }

    #[test]
    fn emulator_matches_the_naive_reference_on_random_tiles() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for i in 0..3000 {
            let (shape, a, w, bias, rq, q) = random_tile(&mut rng);
            let fast = emulate_tile(shape, &a, &w, &bias, &rq, q);
            let reference = numerics::tile(shape, &a, &w, &bias, &rq, q);
            assert_eq!(fast, reference, "tile {i}: {shape:?} {q:?}");
        }
    }

    fn image() -> AcceleratorImage {
        AcceleratorImage::new(new_header("test".into()), Vec::new())
    }

    fn run_one(dev: &EmulatedDevice, timeout: Duration) -> Result<(Vec<i8>, RunReport), DeviceError> {
        let shape = TileShape { r: 2, k: 3, c: 2 };
        let put = |bytes: &[u8]| {
            let b = dev.alloc(bytes.len()).unwrap();
            dev.write(b, 0, bytes).unwrap();
            b
        };
        let a = put(&[1u8, 2, 3, 4, 5, 6]);
        let w = put(&[1u8, 0, 0, 1, 1, 1]);
        let bias = put(&[0u8; 8]);
        let rq = put(&pack_requant(&[Requant { multiplier: 1 << 30, shift: 0 }; 2]));
        let out = dev.alloc(4).unwrap();
        let run = dev.submit(TileCommand {
            shape,
            quant: TileQuant { zp_a: 0, zp_y: 0, relu: false },
            a,
            w,
            bias,
            requant: rq,
            out,
        })?;
        let report = dev.wait(run, timeout)?;
        let mut y = [0u8; 4];
        dev.read(out, 0, &mut y)?;
        Ok((y.iter().map(|&v| v as i8).collect(), report))
    }

    #[test]
    fn device_api_runs_tiles_and_reports_modelled_cycles() {
        let dev = EmulatedDevice::with_faults(2, Faults::default());
        assert!(
            matches!(run_one(&dev, Duration::from_secs(1)), Err(DeviceError::Fault(m)) if m.contains("no accelerator image"))
        );
        dev.load_image(&image()).unwrap();
        let (y, report) = run_one(&dev, Duration::from_secs(1)).unwrap();
        // acc = [[1+3, 2+3], [4+6, 5+6]] = [[4,5],[10,11]]; times 0.5, half up: [[2,3],[5,6]]
        assert_eq!(y, vec![2, 3, 5, 6]);
        assert_eq!(report.cycles, numerics::tile_cycles(TileShape { r: 2, k: 3, c: 2 }));
        assert!(dev.dma_bytes() >= 6 + 6 + 8 + 10 + 4);
        let b = dev.alloc(4).unwrap();
        assert!(dev.write(b, 2, &[0; 4]).is_err(), "writes past the end are refused");
        dev.free(b);
        assert!(dev.read(b, 0, &mut [0; 1]).is_err(), "freed buffers are gone");
    }

    #[test]
    fn a_stalled_compute_unit_times_out_cleanly() {
        let dev = EmulatedDevice::with_faults(1, Faults { every: 2, stall: Duration::from_millis(300) });
        dev.load_image(&image()).unwrap();
        assert!(run_one(&dev, Duration::from_millis(100)).is_ok());
        assert!(matches!(run_one(&dev, Duration::from_millis(100)), Err(DeviceError::Timeout(_))));
        std::thread::sleep(Duration::from_millis(350));
        assert!(
            run_one(&dev, Duration::from_millis(100)).is_ok(),
            "the device keeps working after a timeout"
        );
    }

    #[test]
    fn incompatible_images_are_refused_naming_both_versions() {
        let dev = EmulatedDevice::with_faults(1, Faults::default());
        let mut h = new_header("x".into());
        h.array = (16, 16);
        let e = dev.load_image(&AcceleratorImage::new(h, vec![])).unwrap_err().to_string();
        assert!(e.contains("16x16") && e.contains("8x8"), "{e}");
        let mut h = new_header("x".into());
        h.numerics_version = 2;
        let e = dev.load_image(&AcceleratorImage::new(h, vec![])).unwrap_err().to_string();
        assert!(e.contains("numerics version 2") && e.contains("implements version 1"), "{e}");
    }
}
