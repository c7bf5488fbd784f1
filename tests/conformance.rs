//! The conformance suite: every fixture against every backend.
//!
//! For each fixture a backend either returns outputs matching onnxruntime's reference (see
//! `common::compare_outputs` for the tolerance: 1e-5 absolute + 1e-4 relative for floats, exact
//! for everything else), or its `supports()` says no before anything is loaded. `auto` must run
//! every fixture. The backends' verdicts are pinned below so a change in coverage is noticed.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use kiln::backends::{BackendChoice, BackendConfig};
use kiln::protocol::v2::{InferResponse, ResponseOutput, decode_request};
use kiln_runtime_core::{Backend, LoadOptions, ModelFile, NamedTensor, Session};
use serde_json::Value;

/// Fixtures each backend is expected to decline (with the reason it gives).
fn expected_declines(backend: &str) -> &'static [&'static str] {
    match backend {
        // Scaler and LabelEncoder are ai.onnx.ml operators tract lacks; int64_bool sums 64-bit
        // integers, which tract 0.23 computes in 32 bits; slow uses Loop, which tract lacks.
        "tract" => &["iris", "strings", "int64_bool", "slow"],
        _ => &[],
    }
}

fn inputs_of(name: &str) -> Vec<NamedTensor> {
    let body = std::fs::read(fixture(name).join("input.json")).unwrap();
    decode_request(&body)
        .unwrap()
        .inputs
        .into_iter()
        .map(|i| NamedTensor::new(i.name, i.tensor.expect("JSON data")))
        .collect()
}

fn outputs_json(outputs: &[NamedTensor]) -> Value {
    let response = InferResponse {
        model_name: "m",
        model_version: None,
        id: None,
        outputs: outputs
            .iter()
            .map(|o| ResponseOutput { name: &o.name, tensor: &o.tensor, binary_data_size: None })
            .collect(),
    };
    serde_json::to_value(&response).unwrap()["outputs"].clone()
}

fn check_fixture(session: &dyn Session, name: &str) -> Result<(), String> {
    let expected = read_json(fixture(name).join("expected.json"));
    let outputs = session.infer(inputs_of(name)).map_err(|e| e.to_string())?;
    compare_outputs(&outputs_json(&outputs), &expected["outputs"])?;
    // A batch of one row must give that row's reference (exercises the symbolic batch axis).
    if session.metadata().batchable() {
        let first_rows: Vec<NamedTensor> = inputs_of(name)
            .into_iter()
            .map(|i| {
                let rows = i.tensor.shape()[0];
                let mut pieces = vec![1, rows - 1];
                pieces.retain(|&r| r > 0);
                NamedTensor::new(i.name, i.tensor.split(&pieces).unwrap().remove(0))
            })
            .collect();
        let single = session.infer(first_rows).map_err(|e| format!("batch of 1: {e}"))?;
        let want: Vec<Value> = expected["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let shape: Vec<usize> =
                    o["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
                let row: usize = shape[1..].iter().product();
                let mut o = o.clone();
                o["data"] = Value::Array(flatten(&o["data"])[..row].to_vec());
                o["shape"][0] = 1.into();
                o
            })
            .collect();
        compare_outputs(&outputs_json(&single), &Value::Array(want))
            .map_err(|e| format!("batch of 1: {e}"))?;
    }
    Ok(())
}

fn run_suite(choice: BackendChoice) -> BTreeMap<String, String> {
    let config = BackendConfig { choice, ..BackendConfig::default() };
    let mut verdicts = BTreeMap::new();
    let mut failures = Vec::new();
    for name in fixture_names() {
        let model = ModelFile::read(fixture(&name).join("model.onnx")).unwrap();
        let backend: Box<dyn Backend> = match config.select(&model) {
            Ok(selected) => selected.backend,
            Err(kiln_runtime_core::Error::Unsupported { ops, .. }) => {
                verdicts.insert(name, format!("declined: {}", ops.join(", ")));
                continue;
            }
            Err(e) => panic!("{choice:?} on {name}: {e} (a backend that is not usable here fails the suite)"),
        };
        let session = match backend.load(&model, &LoadOptions::default()) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{name}: supports() said yes but load failed: {e}"));
                continue;
            }
        };
        match check_fixture(session.as_ref(), &name) {
            Ok(()) => verdicts.insert(name, format!("pass ({})", backend.name())),
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                None
            }
        };
    }
    assert!(failures.is_empty(), "{choice:?} failed:\n{}", failures.join("\n"));
    eprintln!("{choice:?}: {verdicts:#?}");
    verdicts
}

fn assert_declines(choice: BackendChoice, name: &str) {
    let verdicts = run_suite(choice);
    let declined: Vec<&str> =
        verdicts.iter().filter(|(_, v)| v.starts_with("declined")).map(|(k, _)| k.as_str()).collect();
    let mut want = expected_declines(name).to_vec();
    want.sort();
    assert_eq!(declined, want, "{name}'s declined fixtures changed: {verdicts:#?}");
    assert!(verdicts.len() >= 7, "expected the 7 fixtures, got {verdicts:?}");
}

#[test]
fn tract_conforms() {
    assert_declines(BackendChoice::Tract, "tract");
}

#[test]
fn ort_conforms() {
    assert_declines(BackendChoice::Ort, "ort");
}

#[test]
fn auto_runs_every_fixture() {
    assert_declines(BackendChoice::Auto, "auto");
}

/// One tract plan serves concurrent calls from several threads with correct results.
#[test]
fn tract_session_is_shared_across_threads() {
    let model = ModelFile::read(fixture("cnn").join("model.onnx")).unwrap();
    let session: Arc<dyn Session> =
        Arc::from(kiln_runtime_tract::TractBackend.load(&model, &LoadOptions::default()).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let session = Arc::clone(&session);
            std::thread::spawn(move || {
                for _ in 0..10 {
                    check_fixture(session.as_ref(), "cnn").unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// tract 0.23 tabulates `DequantizeLinear → Softmax → QuantizeLinear` as if Softmax were
/// elementwise and answers 1.0 for every probability of onnxruntime's QDQ digits model; the tract
/// backend declines such a model (so `auto` picks ort) instead of answering wrongly, and still
/// takes a QDQ model without that chain.
#[test]
fn tract_declines_a_quantized_softmax_it_would_tabulate() {
    let tract = kiln_runtime_tract::TractBackend::new();
    let qdq = ModelFile::read(fixture("digits_mlp").join("model_qdq.onnx")).unwrap();
    let support = tract.supports(&qdq).unwrap();
    assert_eq!(support.unsupported_ops.len(), 1, "{support:?}");
    assert!(
        support.unsupported_ops[0]
            .starts_with("Softmax between DequantizeLinear and QuantizeLinear (\"probabilities"),
        "{support:?}"
    );
    let cnn = ModelFile::read(fixture("cnn").join("model_qdq.onnx")).unwrap();
    assert_eq!(tract.supports(&cnn).unwrap().unsupported_ops, Vec::<String>::new());
    let selected = BackendConfig::default().select(&qdq).unwrap();
    assert_eq!(selected.backend.name(), "ort");
}
