//! `kiln fpga ...`: compile models to accelerator images, list devices.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use kiln_fpga::backend::{DeviceSpec, open};
use kiln_fpga::compile::{CompileError, EXACT_SQNR_DB, compile};
use kiln_fpga::image::{AcceleratorImage, LayerOp};
use kiln_runtime_core::NamedTensor;

use super::UsageError;
use crate::protocol::v2::decode_request;

/// `kiln fpga` subcommands.
#[derive(Debug, Subcommand)]
pub enum FpgaCommand {
    /// Partition and quantize an ONNX model into an accelerator image; prints the partition report
    /// (operators on the accelerator and on the CPU, per-layer SQNR).
    ///
    /// An fp32 model is quantized from the ranges its calibration data reaches. A model already
    /// quantized in QDQ form (QuantizeLinear/DequantizeLinear around Conv, Gemm, MatMul) or with
    /// QLinearConv/QLinearMatMul keeps the scales, zero points and integer weights it states, and
    /// needs no calibration; given some, the report measures each layer against the model's own
    /// output of that layer.
    Compile(CompileArgs),
    /// List FPGA devices and whether each is usable here.
    Devices {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `kiln fpga compile`.
#[derive(Debug, Args)]
pub struct CompileArgs {
    /// The ONNX model: fp32, or quantized in QDQ or QLinear form.
    #[arg(value_name = "MODEL.onnx")]
    pub model: PathBuf,
    /// Calibration inputs, a V2-style JSON request ({"inputs": [...]}, as for `kiln predict`).
    /// Required for fp32 layers; optional when the model states its quantization, where it
    /// measures SQNR.
    #[arg(long, value_name = "DATA.json")]
    pub calibration: Option<PathBuf>,
    /// Where to write the accelerator image.
    #[arg(short, long, value_name = "IMAGE")]
    pub output: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn load_calibration(path: &PathBuf) -> anyhow::Result<Vec<NamedTensor>> {
    let body = std::fs::read(path)
        .map_err(|e| UsageError(format!("cannot read --calibration {}: {e}", path.display())))?;
    let req = decode_request(&body)
        .map_err(|e| UsageError(format!("{}: invalid V2 request: {e}", path.display())))?;
    req.inputs
        .into_iter()
        .map(|i| match i.tensor {
            Some(t) => Ok(NamedTensor::new(i.name, t)),
            None => Err(UsageError(format!("calibration input {:?} must carry JSON data", i.name)).into()),
        })
        .collect()
}

/// Runs `kiln fpga ...`.
pub fn run(cmd: FpgaCommand) -> anyhow::Result<()> {
    match cmd {
        FpgaCommand::Compile(a) => {
            let model = kiln_runtime_core::ModelFile::read(&a.model).map_err(super::classify)?;
            let calibration = a.calibration.as_ref().map(load_calibration).transpose()?.unwrap_or_default();
            let dir = a.model.parent().and_then(|p| p.to_str()).map(str::to_string);
            let image = compile(model.bytes(), dir.as_deref(), &calibration).map_err(|e| match e {
                CompileError::Calibration(_) | CompileError::NoSubgraph(_) => {
                    anyhow::Error::from(UsageError(e.to_string()))
                }
                CompileError::Model(m) => anyhow::anyhow!("{}: {m}", a.model.display()),
            })?;
            let bytes = image.to_bytes();
            let tmp = a.output.with_extension("partial");
            std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &a.output)).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                anyhow::anyhow!("writing {}: {e}", a.output.display())
            })?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "image": a.output.display().to_string(),
                        "digest": image.digest,
                        "layers": image.header.layers.iter().map(|l| serde_json::json!({
                            "replaces": l.replaces, "op": l.op, "k": l.k, "cout": l.cout, "relu": l.relu,
                            "sqnr_db": l.sqnr_db, "in_scale": l.in_scale, "out_scale": l.out_scale,
                        })).collect::<Vec<_>>(),
                        "report": image.header.report,
                    }))?
                );
            } else {
                print_report(&image, &a.output);
            }
        }
        FpgaCommand::Devices { json } => {
            let specs = [DeviceSpec::Emulated(2), DeviceSpec::RtlSim, DeviceSpec::Xrt(0)];
            let rows: Vec<serde_json::Value> = specs
                .iter()
                .map(|s| match open(s) {
                    Ok(d) => serde_json::json!({"device": s.to_string(), "usable": true, "info": d.info()}),
                    Err(e) => {
                        serde_json::json!({"device": s.to_string(), "usable": false, "reason": e.to_string()})
                    }
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for r in rows {
                    let name = r["device"].as_str().unwrap_or_default();
                    if r["usable"] == true {
                        let i = &r["info"];
                        println!(
                            "{name:<12} yes  {} — {} compute unit(s), {}x{} array, K ≤ {}, numerics v{}, modelled clock {} MHz",
                            i["name"].as_str().unwrap_or_default(),
                            i["compute_units"],
                            i["array"][0],
                            i["array"][1],
                            i["max_k"],
                            i["numerics_version"],
                            i["clock_hz"].as_u64().unwrap_or(0) / 1_000_000
                        );
                    } else {
                        println!("{name:<12} no   {}", r["reason"].as_str().unwrap_or_default());
                    }
                }
            }
        }
    }
    Ok(())
}

fn print_report(image: &AcceleratorImage, path: &Path) {
    let h = &image.header;
    println!("accelerator image {} ({})", path.display(), image.digest);
    println!("numerics v{}, {}x{} array, K ≤ {}", h.numerics_version, h.array.0, h.array.1, h.max_k);
    println!(
        "{:<4} {:<60} {:>6} {:>6} {:>5}  {:>9}",
        "#", "on the accelerator (ONNX nodes replaced)", "K", "out", "relu", "SQNR dB"
    );
    for (i, l) in h.layers.iter().enumerate() {
        let op = match &l.op {
            LayerOp::Conv { kernel, .. } => format!("Conv {}x{}", kernel[0], kernel[1]),
            LayerOp::Gemm => "Gemm".into(),
        };
        // The main operator first; a long list (a QDQ layer absorbs its Q/DQ nodes) is counted,
        // `--json` has every name.
        let mut replaces = format!("{op}: {}", l.replaces.join(" + "));
        if replaces.chars().count() > 60 {
            let main = l.replaces.first().map(String::as_str).unwrap_or_default();
            replaces = format!("{op}: {main} + {} more", l.replaces.len() - 1);
        }
        println!(
            "{i:<4} {:<60} {:>6} {:>6} {:>5}  {:>9}",
            replaces,
            l.k,
            l.cout,
            if l.relu { "yes" } else { "no" },
            match l.sqnr_db {
                None => "-".to_string(),
                Some(db) if db >= EXACT_SQNR_DB => "exact".to_string(),
                Some(db) => format!("{db:.1}"),
            }
        );
    }
    let cpu: Vec<String> = h.report.cpu_ops.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    println!(
        "accelerator: {} ONNX node(s), {} MACs per sample",
        h.report.accelerated_nodes, h.report.accelerated_macs
    );
    println!("cpu (tract): {}", if cpu.is_empty() { "nothing".into() } else { cpu.join(", ") });
    for k in &h.report.kept_on_cpu {
        println!("kept on cpu: {k}");
    }
}
