//! `Session::infer` on tract and ONNX Runtime, iris, MLP and CNN fixtures, batch 1, 8 and 32
//! (a backend whose `supports()` declines a model is skipped for it: tract cannot run iris).
//!
//! Guards: a regression in a backend's per-call overhead (tensor conversion in and out, state
//! reuse) or in its compute. Model loading and input construction stay outside the timed loop.
//! Fixtures come from tests/fixtures/generate.py (scripts/setup writes them). Run with
//! `scripts/bench-infer`, which also prints the medians and tract/ort ratios for
//! docs/benchmarks.md.

use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kiln_runtime_core::{Backend, LoadOptions, ModelFile, NamedTensor, Tensor};

fn fixtures() -> PathBuf {
    std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generated"))
}

/// A deterministic input batch for a model with one FP32 input of shape [-1, ...].
fn batch(session: &dyn kiln_runtime_core::Session, rows: usize) -> Vec<NamedTensor> {
    let spec = &session.metadata().inputs[0];
    let mut shape: Vec<usize> = spec.shape.iter().map(|&d| d.max(1) as usize).collect();
    shape[0] = rows;
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    vec![NamedTensor::new(spec.name.clone(), Tensor::from_vec(shape, values).expect("valid tensor"))]
}

fn bench_infer(c: &mut Criterion) {
    let backends: Vec<Box<dyn Backend>> = vec![
        Box::new(kiln_runtime_tract::TractBackend::new()),
        Box::new(kiln_runtime_ort::OrtBackend::new(None)),
    ];
    for model_name in ["iris", "mlp", "cnn"] {
        let path = fixtures().join(model_name).join("model.onnx");
        let model = ModelFile::read(&path).unwrap_or_else(|e| panic!("{e}; run scripts/setup test first"));
        let mut group = c.benchmark_group(format!("infer/{model_name}"));
        for backend in &backends {
            backend.check().unwrap_or_else(|e| panic!("{e}"));
            if !backend.supports(&model).expect("readable model").is_full() {
                continue;
            }
            // One intra-op thread: the server runs one session per instance thread.
            let options =
                LoadOptions { intra_op_threads: Some(1), inter_op_threads: Some(1), ..Default::default() };
            let session = backend.load(&model, &options).expect("load");
            for rows in [1usize, 8, 32] {
                let inputs = batch(session.as_ref(), rows);
                group.throughput(Throughput::Elements(rows as u64));
                group.bench_with_input(BenchmarkId::new(backend.name(), rows), &inputs, |b, inputs| {
                    b.iter(|| session.infer(inputs.clone()).expect("infer"))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_infer);
criterion_main!(benches);
