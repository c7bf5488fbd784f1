//! `kiln predict` and `kiln inspect` as a user runs them: the real binary, real files.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use serde_json::Value;

fn kiln(args: &[&str]) -> Output {
    Command::new(kiln_bin()).args(args).env("KILN_LOG", "warn").output().expect("running kiln")
}

fn kiln_stdin(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(kiln_bin())
        .args(args)
        .env("KILN_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kiln");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Asserts a failure with the given exit code and exactly one stderr line containing `needle`.
fn assert_fails(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout on failure: {}", String::from_utf8_lossy(&out.stdout));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line, got: {stderr}");
    assert!(lines[0].contains(needle), "{needle:?} not in: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

fn model(name: &str) -> String {
    fixture(name).join("model.onnx").display().to_string()
}

fn input(name: &str) -> String {
    fixture(name).join("input.json").display().to_string()
}

#[test]
fn predict_matches_onnxruntime_on_every_fixture() {
    for name in fixture_names() {
        let out = kiln(&["predict", "--model", &model(&name), "--input", &input(&name)]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = read_json(fixture(&name).join("expected.json"));
        compare_outputs(&got["outputs"], &want["outputs"]).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn predict_reads_stdin_and_selects_outputs() {
    let mut request = read_json(fixture("iris").join("input.json"));
    request["outputs"] = serde_json::json!([{"name": "label"}]);
    request["id"] = "req-1".into();
    let out =
        kiln_stdin(&["predict", "--model", &model("iris"), "--input", "-"], request.to_string().as_bytes());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["id"], "req-1");
    assert_eq!(got["outputs"].as_array().unwrap().len(), 1);
    let want = read_json(fixture("iris").join("expected.json"));
    assert_eq!(got["outputs"][0]["data"], want["outputs"][0]["data"]);
}

#[test]
fn predict_logs_the_auto_choice_and_reason() {
    let out = Command::new(kiln_bin())
        .args(["predict", "--model", &model("mlp"), "--input", &input("mlp")])
        .env("KILN_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("backend chosen") && stderr.contains("reason="), "{stderr}");
}

#[test]
fn inspect_reports_io_opsets_and_backends() {
    let out = kiln(&["inspect", &model("iris"), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["inputs"][0]["name"], "float_input");
    assert_eq!(report["inputs"][0]["shape"], serde_json::json!([-1, 4]));
    assert_eq!(report["opsets"]["ai.onnx"], 17);
    assert!(report["operators"]["ai.onnx.ml:Scaler"].as_u64() == Some(1));
    let backends = report["backends"].as_array().unwrap();
    let verdict = |b: &str| backends.iter().find(|v| v["backend"] == b).unwrap().clone();
    assert_eq!(verdict("ort")["supported"], true);
    assert_eq!(verdict("tract")["supported"], false);
    assert!(verdict("tract")["reason"].as_str().unwrap().contains("Scaler"));

    let table = kiln(&["inspect", &model("cnn")]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("image") && text.contains("[-1, 3, 32, 32]") && text.contains("Conv x3"), "{text}");
}

fn write_temp(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

#[test]
fn corrupt_and_missing_models_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture("cnn").join("model.onnx")).unwrap();
    let truncated = write_temp(dir.path(), "truncated.onnx", &good[..good.len() / 2]);
    let garbage = write_temp(dir.path(), "garbage.onnx", b"this is not a model at all");
    let empty = write_temp(dir.path(), "empty.onnx", b"");
    let cnn_input = input("cnn");
    for backend in ["tract", "ort", "auto"] {
        for path in [&truncated, &garbage] {
            let out = kiln(&["predict", "--model", path, "--input", &cnn_input, "--backend", backend]);
            assert_fails(&out, 1, "not an ONNX model");
        }
        let out = kiln(&["predict", "--model", &empty, "--input", &cnn_input, "--backend", backend]);
        assert_fails(&out, 2, "is empty");
    }
    let out = kiln(&["predict", "--model", &dir.path().display().to_string(), "--input", &cnn_input]);
    assert_fails(&out, 2, "is a directory");
    let out = kiln(&["predict", "--model", "/nonexistent/model.onnx", "--input", &cnn_input]);
    assert_fails(&out, 2, "no such file");
    let out = kiln(&["inspect", &truncated]);
    assert_fails(&out, 1, "not an ONNX model");
}

#[test]
fn mismatched_inputs_are_usage_errors() {
    let cases = [
        (
            r#"{"inputs":[{"name":"nope","shape":[1,64],"datatype":"FP32","data":[]}]}"#,
            "data has 0 elements, but shape [1, 64] needs 64",
        ),
        (&mlp_request("nope", "FP32", "[1,64]", 64), "unknown input \"nope\"; the model's inputs are: input"),
        (&mlp_request("input", "FP64", "[1,64]", 64), "datatype FP64, the model expects FP32"),
        (&mlp_request("input", "FP32", "[1,63]", 63), "has shape [1, 63], the model expects [-1, 64]"),
        (&mlp_request("input", "FP32", "[1,64]", 60), "data has 60 elements, but shape [1, 64] needs 64"),
        (
            r#"{"inputs":[{"name":"input","shape":[1,2],"datatype":"FP32","data":[1,"x"]}]}"#,
            "is the string \"x\"",
        ),
        (r#"{"inputs":[{"name":"input","shape":[1,2],"datatype":"FP32","data":[1,2]"#, "invalid V2 request"),
        (r#"{"inputs":[]}"#, "missing input \"input\""),
        (r#"{"inputs":[{"name":"input","shape":[1,2],"datatype":"FP99","data":[1,2]}]}"#, "unknown datatype"),
    ];
    for backend in ["tract", "ort"] {
        for (body, needle) in &cases {
            let out = kiln_stdin(
                &["predict", "--model", &model("mlp"), "--input", "-", "--backend", backend],
                body.as_bytes(),
            );
            assert_fails(&out, 2, needle);
        }
    }
    let mut request = read_json(fixture("mlp").join("input.json"));
    request["outputs"] = serde_json::json!([{"name": "logits"}]);
    let out =
        kiln_stdin(&["predict", "--model", &model("mlp"), "--input", "-"], request.to_string().as_bytes());
    assert_fails(&out, 2, "unknown output \"logits\"");
    let out = kiln(&["predict", "--model", &model("mlp"), "--input", "/nonexistent.json"]);
    assert_fails(&out, 2, "cannot read --input /nonexistent.json");
}

fn mlp_request(name: &str, datatype: &str, shape: &str, n: usize) -> String {
    let data = vec!["0.5"; n].join(",");
    format!(r#"{{"inputs":[{{"name":"{name}","shape":{shape},"datatype":"{datatype}","data":[{data}]}}]}}"#)
}

#[test]
fn explicit_backend_that_cannot_run_the_model_is_refused() {
    let out = kiln(&["predict", "--model", &model("iris"), "--input", &input("iris"), "--backend", "tract"]);
    assert_fails(&out, 1, "backend tract cannot run this model: unsupported operator(s) ai.onnx.ml:Scaler");
}

#[test]
fn missing_ort_library_names_every_place_searched() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(kiln_bin())
        .args(["predict", "--model", &model("mlp"), "--input", &input("mlp"), "--backend", "ort"])
        .current_dir(empty.path())
        .env_clear()
        .env("PATH", empty.path())
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert_fails(&out, 1, "ONNX Runtime library not found");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for place in [
        "--ort-lib (not given)",
        "ORT_DYLIB_PATH (not set)",
        "next to the executable",
        "python3's onnxruntime package",
    ] {
        assert!(stderr.contains(place), "{place:?} not named in: {stderr}");
    }
    assert!(stderr.contains("pip install onnxruntime==1.31.1"), "{stderr}");

    let out = kiln(&[
        "predict",
        "--model",
        &model("mlp"),
        "--input",
        &input("mlp"),
        "--backend",
        "ort",
        "--ort-lib",
        "/nonexistent/libonnxruntime.so",
    ]);
    assert_fails(&out, 1, "--ort-lib: /nonexistent/libonnxruntime.so (does not exist)");

    // A file that is not the library at all.
    let fake = write_temp(empty.path(), "libonnxruntime.so", b"not a shared object");
    let out = kiln(&[
        "predict",
        "--model",
        &model("mlp"),
        "--input",
        &input("mlp"),
        "--backend",
        "ort",
        "--ort-lib",
        &fake,
    ]);
    assert_fails(&out, 1, "failed to load");

    // auto falls back to tract, and says why.
    let out = Command::new(kiln_bin())
        .args(["predict", "--model", &model("mlp"), "--input", &input("mlp")])
        .current_dir(empty.path())
        .env_clear()
        .env("PATH", empty.path())
        .env("KILN_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("backend=\"tract\"") || stderr.contains("backend=tract"), "{stderr}");
    assert!(stderr.contains("passed over") && stderr.contains("ONNX Runtime library not found"), "{stderr}");
}

#[test]
fn bad_flags_exit_2() {
    let out = kiln(&["predict", "--model", &model("mlp"), "--input", &input("mlp"), "--backend", "gpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'gpu'"));
    let out = kiln(&["predict", "--input", &input("mlp")]);
    assert_eq!(out.status.code(), Some(2));
    let out =
        kiln(&["predict", "--model", &model("mlp"), "--input", &input("mlp"), "--intra-op-threads", "0"]);
    assert_eq!(out.status.code(), Some(2));
}

/// The README's demo model is the iris fixture, byte for byte, so its provenance is the generator.
#[test]
fn bundled_example_is_the_generated_iris_fixture() {
    let example =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/iris/model.onnx")).unwrap();
    let generated = std::fs::read(fixture("iris").join("model.onnx")).unwrap();
    assert!(
        example == generated,
        "examples/iris/model.onnx differs from the generated fixture; copy it again"
    );
}
