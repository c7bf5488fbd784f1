//! The FPGA path end to end: compile with calibration data, run on the bit-exact emulated device
//! behind the scoring seam, compare with fp32 onnxruntime; the CLI, `kiln serve --backend fpga`,
//! metrics, and every kind of bad input.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::server::Server;
use common::*;
use kiln::protocol::v2::decode_request;
use kiln_fpga::backend::{DeviceSpec, FpgaBackend};
use kiln_fpga::image::AcceleratorImage;
use kiln_runtime_core::{Backend, LoadOptions, ModelFile, NamedTensor, Session};

fn kiln(args: &[&str]) -> Output {
    Command::new(kiln_bin()).args(args).env("KILN_LOG", "warn").output().unwrap()
}

/// `kiln fpga compile MODEL --calibration DATA -o OUT`.
fn fpga_compile(model: &Path, calibration: &Path, out: &Path) -> Output {
    kiln(&[
        "fpga",
        "compile",
        model.to_str().unwrap(),
        "--calibration",
        calibration.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ])
}

/// `kiln predict --model MODEL --input INPUT --backend BACKEND [EXTRA...]`.
fn predict(model: &Path, input: &Path, backend: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--backend",
        backend,
    ];
    args.extend_from_slice(extra);
    kiln(&args)
}

fn compile(dir: &Path, fixture_name: &str) -> PathBuf {
    let out = dir.join(format!("{fixture_name}.kacc"));
    let f = fixture(fixture_name);
    ok(&fpga_compile(&f.join("model.onnx"), &f.join("calibration.json"), &out));
    out
}

fn inputs(path: PathBuf) -> Vec<NamedTensor> {
    decode_request(&std::fs::read(path).unwrap())
        .unwrap()
        .inputs
        .into_iter()
        .map(|i| NamedTensor::new(i.name, i.tensor.unwrap()))
        .collect()
}

fn session(image: &Path) -> Box<dyn Session> {
    let backend = FpgaBackend::new(DeviceSpec::Emulated(2), Duration::from_secs(30));
    backend.load(&ModelFile::read(image).unwrap(), &LoadOptions::default()).unwrap()
}

/// Signal-to-noise ratio of `got` against `want`, in dB.
fn sqnr_db(want: &[f32], got: &[f32]) -> f64 {
    assert_eq!(want.len(), got.len());
    let signal: f64 = want.iter().map(|&x| f64::from(x).powi(2)).sum();
    let noise: f64 = want.iter().zip(got).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum();
    10.0 * (signal / noise).log10()
}

/// Rows of 10 classes on which `got` and `want` pick the same top class.
fn top1_agreement(got: &[f32], want: &[f32]) -> usize {
    argmax_rows(got, 10).iter().zip(argmax_rows(want, 10)).filter(|(a, b)| **a == *b).count()
}

/// The first output of a V2 response file, as f32.
fn expected_output(path: PathBuf) -> Vec<f32> {
    flatten(&read_json(path)["outputs"][0]["data"]).iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn argmax_rows(data: &[f32], classes: usize) -> Vec<usize> {
    data.chunks(classes)
        .map(|row| row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best }))
        .collect()
}

#[test]
fn digits_on_the_accelerator_agrees_with_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let image = compile(dir.path(), "digits_mlp");
    let s = session(&image);
    let out = s.infer(inputs(fixture("digits_mlp").join("holdout.json"))).unwrap();
    let probs = out[0].tensor.to_vec::<f32>().unwrap();
    let fpga = argmax_rows(&probs, 10);
    let labels = read_json(fixture("digits_mlp").join("holdout_labels.json"));
    let truth: Vec<usize> =
        labels["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let ort: Vec<usize> =
        labels["onnxruntime_top1"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let n = truth.len() as f64;
    let agreement = fpga.iter().zip(&ort).filter(|(a, b)| a == b).count() as f64 / n;
    let acc_fpga = fpga.iter().zip(&truth).filter(|(a, b)| a == b).count() as f64 / n;
    let acc_ort = ort.iter().zip(&truth).filter(|(a, b)| a == b).count() as f64 / n;
    eprintln!(
        "digits held-out ({} samples): top-1 agreement {agreement:.4}, accuracy fpga {acc_fpga:.4} vs fp32 {acc_ort:.4}",
        truth.len()
    );
    assert!(agreement >= 0.99, "top-1 agreement {agreement}");
    assert!(acc_ort - acc_fpga <= 0.01, "accuracy drop {} points", 100.0 * (acc_ort - acc_fpga));
}

#[test]
fn the_cnn_partitions_and_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let image = compile(dir.path(), "cnn");
    let parsed = AcceleratorImage::parse(&std::fs::read(&image).unwrap()).unwrap();
    let report = &parsed.header.report;
    assert_eq!(parsed.header.layers.len(), 4, "3 convolutions (BatchNorm folded, Relu fused) and the Gemm");
    assert_eq!(report.cpu_ops.get("MaxPool"), Some(&2));
    assert!(report.cpu_ops.contains_key("GlobalAveragePool"));
    assert!(
        parsed.header.layers.iter().all(|l| l.sqnr_db.unwrap() > 25.0),
        "{:?}",
        parsed.header.layers.iter().map(|l| l.sqnr_db).collect::<Vec<_>>()
    );
    let s = session(&image);
    let out = s.infer(inputs(fixture("cnn").join("holdout.json"))).unwrap();
    let got = out[0].tensor.to_vec::<f32>().unwrap();
    let want = expected_output(fixture("cnn").join("holdout_expected.json"));
    let sqnr = sqnr_db(&want, &got);
    let agreement = top1_agreement(&got, &want);
    eprintln!("cnn end to end: output SQNR {sqnr:.1} dB, top-1 agreement {agreement}/32");
    assert!(sqnr > 20.0, "end-to-end SQNR {sqnr} dB");
    assert!(agreement >= 28, "top-1 agreement {agreement}/32");
}

#[test]
fn cli_reports_devices_partitions_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture("cnn");
    let out =
        ok(&fpga_compile(&f.join("model.onnx"), &f.join("calibration.json"), &dir.path().join("c.kacc")));
    assert!(
        out.contains("SQNR") && out.contains("cpu (tract): Flatten x1, GlobalAveragePool x1, MaxPool x2"),
        "{out}"
    );
    let devices = ok(&kiln(&["fpga", "devices"]));
    assert!(devices.contains("emulated:2") && devices.contains("yes"), "{devices}");
    assert!(devices.contains("xrt:0") && devices.contains("no"), "{devices}");
    let image = compile(dir.path(), "digits_mlp");
    let predicted: serde_json::Value =
        serde_json::from_str(&ok(&predict(&image, &fixture("digits_mlp").join("input.json"), "fpga", &[])))
            .unwrap();
    let want = read_json(fixture("digits_mlp").join("expected.json"));
    let (g, w) = (flatten(&predicted["outputs"][0]["data"]), flatten(&want["outputs"][0]["data"]));
    let gt = argmax_rows(&g.iter().map(|v| v.as_f64().unwrap() as f32).collect::<Vec<_>>(), 10);
    let wt = argmax_rows(&w.iter().map(|v| v.as_f64().unwrap() as f32).collect::<Vec<_>>(), 10);
    assert_eq!(gt, wt);
}

/// A device this build cannot open, and what the error says about it.
#[cfg(not(feature = "rtl-sim"))]
const UNAVAILABLE_DEVICE: (&str, &str) = ("rtl-sim", "without the rtl-sim feature");
#[cfg(all(feature = "rtl-sim", not(feature = "xrt")))]
const UNAVAILABLE_DEVICE: (&str, &str) = ("xrt:0", "without the xrt feature");
#[cfg(all(feature = "rtl-sim", feature = "xrt"))]
const UNAVAILABLE_DEVICE: (&str, &str) = ("xrt:0", "no XRT device at index 0");

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // No supported subgraph: a CPU-only plan is offered.
    let f = fixture("int64_bool");
    fails(
        &fpga_compile(&f.join("model.onnx"), &f.join("input.json"), &dir.path().join("x")),
        2,
        "CPU-only plan: serve it with --backend tract or --backend ort",
    );
    // onnxruntime's contrib QGemm (its QOperator form of Gemm) is not read, and tract cannot run
    // it on the CPU either: said so, with the form that is read.
    let c = fixture("cnn");
    fails(
        &kiln(&["fpga", "compile", c.join("model_qgemm.onnx").to_str().unwrap(), "-o", "/dev/null"]),
        1,
        "unsupported operator(s) com.microsoft:QGemm; quantized forms read: QDQ, QLinearConv, QLinearMatMul",
    );
    // A model that quantizes only some layers needs calibration for the rest, and names them.
    fails(
        &kiln(&["fpga", "compile", c.join("model_qlinear.onnx").to_str().unwrap(), "-o", "/dev/null"]),
        2,
        "none given, and the model does not quantize the input or output of Gemm -> logits",
    );
    // Calibration data of the wrong shape.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"inputs":[{"name":"pixels","shape":[2,63],"datatype":"FP32","data":[[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]]}]}"#).unwrap();
    let m = fixture("digits_mlp").join("model.onnx");
    fails(
        &fpga_compile(&m, &bad, &dir.path().join("x")),
        2,
        "input \"pixels\" has shape [2, 63], the model expects [-1, 64]",
    );
    std::fs::write(&bad, r#"{"inputs":[{"name":"wrong","shape":[1,1],"datatype":"FP32","data":[0]}]}"#)
        .unwrap();
    fails(&fpga_compile(&m, &bad, &dir.path().join("x")), 2, "no data for model input \"pixels\"");

    // An image built for another array size, or numerics version, is refused with both named.
    let image = compile(dir.path(), "digits_mlp");
    let parsed = AcceleratorImage::parse(&std::fs::read(&image).unwrap()).unwrap();
    let input = fixture("digits_mlp").join("input.json");
    for (edit, needle) in [
        (
            Box::new(|h: &mut kiln_fpga::image::Header| h.array = (16, 16))
                as Box<dyn Fn(&mut kiln_fpga::image::Header)>,
            "built for a 16x16 array",
        ),
        (
            Box::new(|h: &mut kiln_fpga::image::Header| h.numerics_version = 7),
            "numerics version 7 but the emulated device implements version 1",
        ),
    ] {
        let mut h = parsed.header.clone();
        edit(&mut h);
        let other = dir.path().join("other.kacc");
        std::fs::write(&other, AcceleratorImage::new(h, parsed.payload.clone()).to_bytes()).unwrap();
        fails(&predict(&other, &input, "fpga", &[]), 1, needle);
    }
    // A corrupt image, a plain ONNX file on the FPGA backend, an image on a CPU backend.
    let mut bytes = std::fs::read(&image).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0xff;
    let corrupt = dir.path().join("corrupt.kacc");
    std::fs::write(&corrupt, bytes).unwrap();
    fails(&predict(&corrupt, &input, "fpga", &[]), 1, "accelerator image is corrupt");
    fails(&predict(&m, &input, "fpga", &[]), 1, "compile the model first");
    fails(&predict(&image, &input, "tract", &[]), 1, "run it with --backend fpga");
    fails(
        &predict(&image, &input, "fpga", &["--fpga-device", UNAVAILABLE_DEVICE.0]),
        1,
        UNAVAILABLE_DEVICE.1,
    );
    fails(&predict(&image, &input, "fpga", &["--fpga-device", "gpu"]), 2, "unknown FPGA device");
}

#[test]
fn serve_answers_v2_on_the_accelerator_and_survives_a_stalling_device() {
    let dir = tempfile::tempdir().unwrap();
    let digits = compile(dir.path(), "digits_mlp");
    let cnn = compile(dir.path(), "cnn");
    let server = Server::start(&[
        "--model",
        &format!("digits={}", digits.display()),
        "--model",
        &format!("cnn={}", cnn.display()),
        "--backend",
        "fpga",
    ]);
    let body = std::fs::read_to_string(fixture("digits_mlp").join("input.json")).unwrap();
    let r = server.post_json("/v2/models/digits/infer", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let want = read_json(fixture("digits_mlp").join("expected.json"));
    let got: Vec<f32> =
        flatten(&r.json()["outputs"][0]["data"]).iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let w: Vec<f32> =
        flatten(&want["outputs"][0]["data"]).iter().map(|v| v.as_f64().unwrap() as f32).collect();
    assert_eq!(argmax_rows(&got, 10), argmax_rows(&w, 10));
    let body = std::fs::read_to_string(fixture("cnn").join("input.json")).unwrap();
    assert_eq!(server.post_json("/v2/models/cnn/infer", &body).status, 200);
    let metrics = server.get("/metrics").text();
    for m in [
        "kiln_fpga_cycles_total",
        "kiln_fpga_macs_total",
        "kiln_fpga_dma_bytes_total",
        "kiln_fpga_mac_utilization",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(m) && !l.ends_with(" 0")),
            "{m} missing or zero:\n{metrics}"
        );
    }
    drop(server);

    // A device that stalls one command in 25 past the timeout (a request is ~10 commands): those
    // requests fail cleanly,
    // the others succeed, and the server keeps serving.
    let stalling = Server::start_with_env(
        &[
            "--model",
            &format!("digits={}", digits.display()),
            "--backend",
            "fpga",
            "--fpga-timeout",
            "100ms",
            "--instances",
            "1",
            "--fpga-device",
            "emulated:1",
        ],
        &[("KILN_FPGA_FAULT", "stall:400:25")],
    );
    let body = std::fs::read_to_string(fixture("digits_mlp").join("input.json")).unwrap();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = stalling.post_json("/v2/models/digits/infer", &body);
        if r.status != 200 {
            assert!(r.json()["error"].as_str().unwrap().contains("did not complete within"), "{}", r.text());
        }
        statuses.push(r.status);
        std::thread::sleep(Duration::from_millis(450));
    }
    assert!(statuses.contains(&200) && statuses.contains(&500), "{statuses:?}");
    assert_eq!(stalling.get("/v2/health/ready").status, 200);
}

/// With the `rtl-sim` feature (scripts/test builds it): the CNN's accelerated layers run on the RTL
/// compute unit in Verilator and produce exactly the emulator's outputs, so what CI checks on the
/// emulator is what the hardware description computes.
#[cfg(feature = "rtl-sim")]
#[test]
fn the_rtl_compute_unit_scores_the_cnn_exactly_as_the_emulator() {
    let dir = tempfile::tempdir().unwrap();
    let image = compile(dir.path(), "cnn");
    let model = ModelFile::read(&image).unwrap();
    let on = |device: DeviceSpec| {
        let backend = FpgaBackend::new(device, Duration::from_secs(120));
        let s = backend.load(&model, &LoadOptions::default()).unwrap();
        s.infer(inputs(fixture("cnn").join("holdout.json"))).unwrap()[0].tensor.to_vec::<f32>().unwrap()
    };
    let emulated = on(DeviceSpec::Emulated(2));
    let rtl = on(DeviceSpec::RtlSim);
    assert_eq!(rtl.len(), 32 * 10);
    let differing = emulated.iter().zip(&rtl).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differing, 0, "{differing} of {} outputs differ between the RTL and the emulator", rtl.len());
    let info = kiln_fpga::backend::open(&DeviceSpec::RtlSim).unwrap().info();
    assert_eq!(info.kind, "rtl-sim");
}

/// Relu6 (`Clip(0, 6)`) after a Gemm and `Clip(-1, 1)` after MatMul + Add fuse into the
/// accelerated layers; the saturating requantizer applies both clips (checked against onnxruntime).
#[test]
fn clip_activations_fuse_and_match_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let image = compile(dir.path(), "clip_mlp");
    let parsed = AcceleratorImage::parse(&std::fs::read(&image).unwrap()).unwrap();
    let layers = &parsed.header.layers;
    assert_eq!(layers.len(), 2, "{:?}", parsed.header.report);
    assert!(layers.iter().all(|l| l.replaces.iter().any(|n| n.starts_with("Clip"))), "{layers:?}");
    assert!(parsed.header.report.cpu_ops.is_empty(), "{:?}", parsed.header.report.cpu_ops);
    assert!(layers[0].relu && !layers[1].relu, "Clip(0, 6) clamps at zero, Clip(-1, 1) does not");
    let out = session(&image).infer(inputs(fixture("clip_mlp").join("holdout.json"))).unwrap();
    let got = out[0].tensor.to_vec::<f32>().unwrap();
    let want = expected_output(fixture("clip_mlp").join("holdout_expected.json"));
    assert_eq!(got.len(), want.len());
    let step = layers[1].out_scale;
    let max_err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let saturated = want.iter().filter(|v| v.abs() == 1.0).count();
    let sqnr = sqnr_db(&want, &got);
    let exact_at_bounds =
        want.iter().zip(&got).filter(|(w, g)| w.abs() == 1.0 && (*w - *g).abs() <= step).count();
    eprintln!(
        "clip_mlp: SQNR {sqnr:.1} dB, max |fpga - onnxruntime| = {max_err:.4} ({:.1} output steps), \
         {exact_at_bounds} of {saturated} clipped outputs within one step of the bound",
        max_err / step
    );
    assert!(
        got.iter().all(|v| (-1.0 - step / 2.0..=1.0 + step / 2.0).contains(v)),
        "outputs leave the clip range"
    );
    assert!(saturated > 50, "the fixture must exercise the clip ({saturated} clipped)");
    // Two int8 layers: the error is a few steps of the first layer's 6/255 output grid carried
    // through the second; the bound is ~2.5x what this fixture shows.
    assert!(sqnr > 25.0, "SQNR {sqnr} dB");
    assert!(max_err <= 0.15, "max error {max_err}");
    assert!(
        exact_at_bounds * 10 >= saturated * 9,
        "{exact_at_bounds} of {saturated} clipped outputs at the bound"
    );
}

/// `kiln fpga compile MODEL -o OUT` with no calibration data.
fn compile_uncalibrated(dir: &Path, model: &Path) -> (PathBuf, AcceleratorImage) {
    let out = dir.join(format!("{}.kacc", model.file_stem().unwrap().to_str().unwrap()));
    ok(&kiln(&["fpga", "compile", model.to_str().unwrap(), "-o", out.to_str().unwrap()]));
    let parsed = AcceleratorImage::parse(&std::fs::read(&out).unwrap()).unwrap();
    (out, parsed)
}

/// How far `got` is from `want` in steps of the quantization grid `step`: the largest distance,
/// and how many elements sit on another grid point.
fn steps_apart(got: &[f32], want: &[f32], step: f32) -> (f32, usize) {
    assert_eq!(got.len(), want.len());
    let steps: Vec<f32> = got.iter().zip(want).map(|(g, w)| (g - w).abs() / step).collect();
    (steps.iter().copied().fold(0.0, f32::max), steps.iter().filter(|&&s| s > 0.5).count())
}

#[test]
fn a_qdq_model_keeps_its_own_quantization_and_matches_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let d = fixture("digits_mlp");
    // No calibration needed: the model states every scale, zero point and integer weight.
    let (image, parsed) = compile_uncalibrated(dir.path(), &d.join("model_qdq.onnx"));
    let layers = &parsed.header.layers;
    assert_eq!(layers.len(), 2, "{:?}", parsed.header.report);
    assert!(layers.iter().all(|l| l.sqnr_db.is_none()), "no calibration, no SQNR");
    // Both Gemms with their weight and bias DequantizeLinear and the Q/DQ pairs around them; the
    // Softmax and its output Q/DQ stay on the CPU.
    assert_eq!(parsed.header.report.accelerated_nodes, 12, "{:?}", parsed.header.report);
    let cpu: Vec<_> = parsed.header.report.cpu_ops.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    assert_eq!(cpu, ["DequantizeLinear x1", "QuantizeLinear x1", "Softmax x1"]);
    // The stated quantization, read exactly: onnxruntime's scales and zero points.
    assert_eq!((layers[0].in_scale, layers[0].in_zp), (1.0 / 255.0, -128), "pixels: [0, 1] on int8");
    // Held out: onnxruntime running the QDQ model operator by operator is the reference.
    let got =
        session(&image).infer(inputs(d.join("holdout.json"))).unwrap()[0].tensor.to_vec::<f32>().unwrap();
    let want = expected_output(d.join("holdout_qdq_expected.json"));
    let (max_steps, off_grid) = steps_apart(&got, &want, 1.0 / 255.0);
    let labels = read_json(d.join("holdout_labels.json"));
    let truth: Vec<usize> =
        labels["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let (fpga, ort) = (argmax_rows(&got, 10), argmax_rows(&want, 10));
    let agree = fpga.iter().zip(&ort).filter(|(a, b)| a == b).count();
    let correct = |top1: &[usize]| top1.iter().zip(&truth).filter(|(a, b)| a == b).count();
    eprintln!(
        "digits QDQ held-out: {off_grid} of {} probabilities off onnxruntime's (max {max_steps} steps), \
         top-1 agreement {agree}/{}, correct {} (fpga) vs {} (onnxruntime)",
        got.len(),
        truth.len(),
        correct(&fpga),
        correct(&ort)
    );
    // The accelerated layers are integer-exact; only the CPU's float Softmax (tract's, not
    // onnxruntime's) may put a probability on the neighbouring grid point.
    assert!(max_steps <= 1.0 && off_grid * 100 <= got.len(), "{off_grid} off, max {max_steps} steps");
    assert!(agree * 100 >= truth.len() * 99, "top-1 agreement {agree}/{}", truth.len());
    assert!(correct(&fpga).abs_diff(correct(&ort)) <= truth.len() / 100);
}

#[test]
fn the_qdq_cnn_is_exact_layer_by_layer_and_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let c = fixture("cnn");
    let (image, parsed) = compile_uncalibrated(dir.path(), &c.join("model_qdq.onnx"));
    assert_eq!(parsed.header.layers.len(), 4, "3 convolutions and the Gemm");
    // With calibration data, each layer is measured against tract running the QDQ model: the
    // integers are the same, so the SQNR is recorded as exact.
    let measured = dir.path().join("measured.kacc");
    ok(&fpga_compile(&c.join("model_qdq.onnx"), &c.join("calibration.json"), &measured));
    let measured = AcceleratorImage::parse(&std::fs::read(&measured).unwrap()).unwrap();
    let sqnr: Vec<_> = measured.header.layers.iter().map(|l| l.sqnr_db).collect();
    assert!(sqnr.iter().all(|s| *s == Some(kiln_fpga::compile::EXACT_SQNR_DB)), "{sqnr:?}");
    let got =
        session(&image).infer(inputs(c.join("holdout.json"))).unwrap()[0].tensor.to_vec::<f32>().unwrap();
    let want = expected_output(c.join("holdout_qdq_expected.json"));
    let step = parsed.header.layers[3].out_scale;
    let (max_steps, off_grid) = steps_apart(&got, &want, step);
    eprintln!(
        "cnn QDQ held-out: {off_grid} of {} logits off onnxruntime's (max {max_steps} steps)",
        got.len()
    );
    assert!(max_steps <= 1.0 && off_grid * 100 <= got.len(), "{off_grid} off, max {max_steps} steps");
}

#[test]
fn qlinear_layers_chain_through_int8_ops_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let c = fixture("cnn");
    let image = dir.path().join("qlinear.kacc");
    ok(&fpga_compile(&c.join("model_qlinear.onnx"), &c.join("calibration.json"), &image));
    let parsed = AcceleratorImage::parse(&std::fs::read(&image).unwrap()).unwrap();
    let layers = &parsed.header.layers;
    assert_eq!(layers.len(), 4, "{:?}", parsed.header.report);
    assert!(layers[..3].iter().all(|l| l.replaces.iter().any(|n| n.starts_with("QLinearConv"))));
    // The int8 MaxPools stay on the CPU between the accelerated convolutions: a QuantizeLinear
    // after one layer and a DequantizeLinear before the next carry the integers across.
    let cpu = &parsed.header.report.cpu_ops;
    assert_eq!(
        (cpu.get("MaxPool"), cpu.get("QuantizeLinear"), cpu.get("DequantizeLinear")),
        (Some(&2), Some(&2), Some(&2)),
        "{cpu:?}"
    );
    // The fp32 Gemm was calibrated; the convolutions kept their stated quantization.
    let got =
        session(&image).infer(inputs(c.join("holdout.json"))).unwrap()[0].tensor.to_vec::<f32>().unwrap();
    let want = expected_output(c.join("holdout_qlinear_expected.json"));
    let sqnr = sqnr_db(&want, &got);
    let agree = top1_agreement(&got, &want);
    eprintln!("cnn QLinear held-out: SQNR {sqnr:.1} dB against onnxruntime, top-1 agreement {agree}/32");
    assert!(sqnr > 30.0, "SQNR {sqnr} dB");
    assert!(agree >= 31, "top-1 agreement {agree}/32");
}

#[test]
fn a_uint8_qlinear_conv_matches_the_specification_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let c = fixture("cnn");
    let (image, parsed) = compile_uncalibrated(dir.path(), &c.join("conv1_qlinear_u8.onnx"));
    assert_eq!(parsed.header.layers.len(), 1);
    let got =
        session(&image).infer(inputs(c.join("holdout.json"))).unwrap()[0].tensor.to_vec::<f32>().unwrap();
    let want = expected_output(c.join("conv1_qlinear_u8_expected.json"));
    let (max_steps, off_grid) = steps_apart(&got, &want, parsed.header.layers[0].out_scale);
    eprintln!("uint8 QLinearConv: {off_grid} of {} outputs off the integer reference", got.len());
    assert_eq!(off_grid, 0, "max {max_steps} steps");
}
