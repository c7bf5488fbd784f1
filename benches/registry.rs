//! Model registry: `list` over 10,000 versions (target ≤ 50 ms).
//!
//! Guards: a per-row query explosion or a missing index in the listing path. The workspace is
//! populated outside the timed loop: 100 names × 100 versions, and 10,000 names × 1 version,
//! each version with one ONNX file, two tags and a property. The populated workspaces stay in
//! `$CARGO_TARGET_DIR/bench-registry/` so `scripts/bench-registry` can time the CLI on them.

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use kiln::registry::{ListFilter, ModelFileEntry, Registration, Workspace};

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-registry")
}

fn populate(dir: &std::path::Path, names: usize, versions: usize) -> Workspace {
    let _ = std::fs::remove_dir_all(dir);
    let mut ws = Workspace::open(dir).expect("workspace");
    let digest = ws.layout().put_bytes(b"not really a model, but a stored blob").expect("blob");
    let files = vec![ModelFileEntry { path: "model.onnx".into(), digest, size: 38, onnx: None }];
    for n in 0..names {
        for v in 0..versions {
            let reg = Registration {
                name: format!("model-{n:05}"),
                description: format!("version {v} of model {n}"),
                tags: [
                    ("stage".to_string(), if v % 2 == 0 { "dev" } else { "prod" }.to_string()),
                    ("team".into(), "ml".into()),
                ]
                .into_iter()
                .collect(),
                properties: [("accuracy".to_string(), format!("0.{v:02}"))].into_iter().collect(),
            };
            ws.insert_version(&reg, &files, "2026-11-22T00:00:00Z").expect("insert");
        }
    }
    ws
}

fn bench_list(c: &mut Criterion) {
    let mut group = c.benchmark_group("registry_list_10k_versions");
    for (label, names, versions) in
        [("100_names_x_100_versions", 100, 100), ("10000_names_x_1_version", 10_000, 1)]
    {
        let ws = populate(&target_dir().join(label), names, versions);
        group.bench_function(format!("{label}/latest_per_name"), |b| {
            b.iter(|| ws.list(&ListFilter::default()).expect("list"))
        });
        group.bench_function(format!("{label}/tag_filter"), |b| {
            let f = ListFilter { tags: vec![("stage".into(), Some("prod".into()))], ..Default::default() };
            b.iter(|| ws.list(&f).expect("list"))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench_list
}
criterion_main!(benches);
