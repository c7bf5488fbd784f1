//! The FPGA path, reported honestly: modelled cycles at the modelled 250 MHz clock, MAC
//! utilisation against the 8×8 array's peak, DMA bytes, and — separately, as what it is — the
//! emulator's wall time on this CPU. Emulator wall time is NOT accelerator latency.
//!
//! Guards: a regression in tiling (more cycles or DMA per inference) or in the emulator's speed.
//! Compilation and loading happen outside the timed loop. Run with `cargo bench --bench fpga`.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use kiln::protocol::v2::decode_request;
use kiln_fpga::backend::{DeviceSpec, FpgaBackend};
use kiln_fpga::numerics::{ARRAY_COLS, ARRAY_ROWS, CLOCK_HZ};
use kiln_runtime_core::{Backend, LoadOptions, ModelFile, NamedTensor, Tensor};

fn fixtures() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generated"))
}

fn calibration(name: &str) -> Vec<NamedTensor> {
    let body =
        std::fs::read(fixtures().join(name).join("calibration.json")).expect("run scripts/setup test first");
    decode_request(&body)
        .expect("valid")
        .inputs
        .into_iter()
        .map(|i| NamedTensor::new(i.name, i.tensor.expect("data")))
        .collect()
}

fn rows(input: &NamedTensor, n: usize) -> NamedTensor {
    let t = &input.tensor;
    let per: usize = t.shape()[1..].iter().product();
    let v = t.to_vec::<f32>().expect("fp32");
    let mut shape = t.shape().to_vec();
    shape[0] = n;
    NamedTensor::new(input.name.clone(), Tensor::from_vec(shape, v[..n * per].to_vec()).expect("tensor"))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let test_mode = !std::env::args().any(|a| a == "--bench");
    println!(
        "| model | batch | compute units | modelled cycles / inference | modelled time @ {} MHz (CUs in parallel) | MAC utilisation | DMA bytes / inference | emulator wall time (median) |",
        CLOCK_HZ / 1_000_000
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, batches) in [("digits_mlp", [1usize, 32]), ("cnn", [1, 8])] {
        let model = ModelFile::read(fixtures().join(name).join("model.onnx")).expect("fixture");
        let cal = calibration(name);
        let image = kiln_fpga::compile::compile(model.bytes(), None, &cal).expect("compiles");
        let path = std::env::temp_dir().join(format!("kiln-bench-{name}-{}.kacc", std::process::id()));
        std::fs::write(&path, image.to_bytes()).expect("write image");
        for cus in [1usize, 2] {
            let backend = FpgaBackend::new(DeviceSpec::Emulated(cus), Duration::from_secs(60));
            let session =
                backend.load(&ModelFile::read(&path).expect("image"), &LoadOptions::default()).expect("load");
            for n in batches {
                let input = vec![rows(&cal[0], n)];
                session.infer(input.clone()).expect("warm-up");
                let t = kiln_fpga::runtime::telemetry();
                let (c0, m0, d0) = (t.cycles.load(Relaxed), t.macs.load(Relaxed), t.dma_bytes.load(Relaxed));
                let runs = if test_mode { 2 } else { 30 };
                let mut times = Vec::with_capacity(runs);
                for _ in 0..runs {
                    let start = Instant::now();
                    session.infer(input.clone()).expect("infer");
                    times.push(start.elapsed());
                }
                times.sort();
                let (cycles, macs, dma) = (
                    (t.cycles.load(Relaxed) - c0) / runs as u64,
                    (t.macs.load(Relaxed) - m0) / runs as u64,
                    (t.dma_bytes.load(Relaxed) - d0) / runs as u64,
                );
                let util = macs as f64 / ((ARRAY_ROWS * ARRAY_COLS) as f64 * cycles as f64);
                let modelled_us = cycles as f64 / cus as f64 / CLOCK_HZ as f64 * 1e6;
                println!(
                    "| {name} | {n} | {cus} | {cycles} | {modelled_us:.1} µs | {:.1}% | {dma} | {:.2} ms |",
                    util * 100.0,
                    times[runs / 2].as_secs_f64() * 1e3
                );
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}
