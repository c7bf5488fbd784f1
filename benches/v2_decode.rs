//! V2 request decoding: Kiln's typed decoder against parsing the same body into a generic
//! `serde_json::Value` (what a straightforward server would do first).
//!
//! Guards: the hot-path decoder must stay well below a generic parse; a regression here adds
//! directly to every request's latency. Bodies are built outside the timed loop.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln::protocol::v2::decode_request;

fn body(name: &str, shape: &[usize]) -> Vec<u8> {
    let n: usize = shape.iter().product();
    // Realistic float text: what Python's json and tritonclient emit for FP32 data.
    let data: Vec<String> =
        (0..n).map(|i| format!("{}", ((i * 7919) % 1000) as f32 / 997.0 + 0.001)).collect();
    format!(
        r#"{{"id":"bench","inputs":[{{"name":"{name}","shape":{shape:?},"datatype":"FP32","data":[{}]}}]}}"#,
        data.join(",")
    )
    .into_bytes()
}

fn bench_decode(c: &mut Criterion) {
    for (label, name, shape) in
        [("mlp_1x64", "input", vec![1, 64]), ("cnn_1x3x32x32", "image", vec![1, 3, 32, 32])]
    {
        let b = body(name, &shape);
        let mut group = c.benchmark_group(format!("v2_decode/{label}"));
        group.throughput(Throughput::Bytes(b.len() as u64));
        group.bench_function("kiln_typed", |bench| bench.iter(|| decode_request(&b).expect("valid request")));
        group.bench_function("serde_json_value", |bench| {
            bench.iter(|| serde_json::from_slice::<serde_json::Value>(&b).expect("valid JSON"))
        });
        // What a generic server does: parse to Value, then copy `data` into a typed buffer.
        group.bench_function("serde_json_value_to_vec", |bench| {
            bench.iter(|| {
                let v = serde_json::from_slice::<serde_json::Value>(&b).expect("valid JSON");
                let data = v["inputs"][0]["data"].as_array().expect("data array");
                data.iter().map(|x| x.as_f64().unwrap_or_default() as f32).collect::<Vec<f32>>()
            })
        });
        group.bench_function("serde_json_ignored_any", |bench| {
            bench.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(&b).expect("valid JSON"))
        });
        group.finish();
    }
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
