//! Helpers shared by the integration tests: fixture location and output comparison.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

/// Absolute tolerance for floating-point outputs against onnxruntime's reference.
pub const ATOL: f64 = 1e-5;
/// Relative tolerance for floating-point outputs against onnxruntime's reference.
pub const RTOL: f64 = 1e-4;

/// Where `tests/fixtures/generate.py` wrote the fixtures (see scripts/test).
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generated"));
    assert!(
        dir.join("index.json").is_file(),
        "fixtures missing at {}: run scripts/test, which generates them with tests/fixtures/generate.py",
        dir.display()
    );
    dir
}

/// Every fixture name, from the generator's index.
pub fn fixture_names() -> Vec<String> {
    let index: Value = read_json(fixtures_dir().join("index.json"));
    index["fixtures"]
        .as_array()
        .expect("fixtures list")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// A fixture's directory.
pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// Reads and parses a JSON file.
pub fn read_json(path: impl Into<PathBuf>) -> Value {
    let path = path.into();
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Compares V2 `outputs` arrays: names, datatypes and shapes exactly; integers, booleans and
/// strings exactly; floats within `ATOL + RTOL * |expected|`. Returns a description of the
/// first difference.
pub fn compare_outputs(actual: &Value, expected: &Value) -> Result<(), String> {
    let actual = actual.as_array().ok_or("actual outputs are not an array")?;
    let expected = expected.as_array().ok_or("expected outputs are not an array")?;
    if actual.len() != expected.len() {
        return Err(format!("{} outputs, expected {}", actual.len(), expected.len()));
    }
    for exp in expected {
        let name = exp["name"].as_str().ok_or("expected output without name")?;
        let act = actual.iter().find(|a| a["name"] == exp["name"]).ok_or(format!("no output {name}"))?;
        for field in ["datatype", "shape"] {
            if act[field] != exp[field] {
                return Err(format!("{name}: {field} {} != expected {}", act[field], exp[field]));
            }
        }
        let (a, e) = (flatten(&act["data"]), flatten(&exp["data"]));
        if a.len() != e.len() {
            return Err(format!("{name}: {} elements, expected {}", a.len(), e.len()));
        }
        let float = matches!(exp["datatype"].as_str(), Some("FP16" | "BF16" | "FP32" | "FP64"));
        for (i, (x, y)) in a.iter().zip(&e).enumerate() {
            let ok = if float {
                let (x, y) = (x.as_f64().ok_or("non-number")?, y.as_f64().ok_or("non-number")?);
                (x - y).abs() <= ATOL + RTOL * y.abs()
            } else {
                x == y
            };
            if !ok {
                return Err(format!("{name}[{i}]: {x} != expected {y}"));
            }
        }
    }
    Ok(())
}

/// Flattens nested JSON arrays.
pub fn flatten(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items.iter().flat_map(flatten).collect(),
        other => vec![other.clone()],
    }
}

/// Path of the built `kiln` binary.
pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

pub mod oci_registry;
pub mod server;

/// The project venv's Python (scripts/setup creates it with tritonclient and onnxruntime).
pub fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(p.is_file(), "{} missing: run scripts/setup test", p.display());
    p
}

/// Runs a script from tests/python with the venv's Python; panics with its output on failure.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(script);
    let out = std::process::Command::new(python()).arg(&path).args(args).output().expect("running python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The stdout of a kiln run that must have succeeded (its stderr and stdout in the failure).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kiln failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts a kiln run failed with `code` and a stderr naming `needle`.
pub fn fails(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
}
