//! `kiln inspect`: what a model file declares and which backends can run it.

use std::path::PathBuf;

use clap::Args;
use kiln_runtime_core::ModelFile;
use kiln_runtime_core::onnx::{OnnxInfo, ValueDecl};
use serde::Serialize;

use super::{BackendArgs, classify};

/// Arguments of `kiln inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The ONNX model file.
    #[arg(value_name = "PATH.onnx")]
    pub model: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// One backend's verdict on the model.
#[derive(Debug, Serialize)]
pub struct BackendVerdict {
    /// Backend name.
    pub backend: &'static str,
    /// True when the backend is usable here and runs every operator.
    pub supported: bool,
    /// Why not, when not.
    pub reason: Option<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    path: String,
    size_bytes: usize,
    #[serde(flatten)]
    info: &'a OnnxInfo,
    backends: Vec<BackendVerdict>,
}

fn shape(v: &ValueDecl) -> String {
    match &v.shape {
        Some(s) => kiln_runtime_core::format_shape(s),
        None => "(unknown)".into(),
    }
}

/// Runs `kiln inspect`.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let model = ModelFile::read(&args.model).map_err(classify)?;
    let info =
        OnnxInfo::parse(model.bytes()).map_err(|e| anyhow::anyhow!("{}: {e}", args.model.display()))?;
    let backends = args
        .backend
        .config()
        .candidates()
        .into_iter()
        .map(|b| {
            let verdict = b.check().and_then(|()| b.supports(&model)?.into_result(b.name()));
            BackendVerdict {
                backend: b.name(),
                supported: verdict.is_ok(),
                reason: verdict.err().map(|e| e.to_string()),
            }
        })
        .collect::<Vec<_>>();
    if args.json {
        let report = Report {
            path: args.model.display().to_string(),
            size_bytes: model.bytes().len(),
            info: &info,
            backends,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model       {} ({} bytes)", args.model.display(), model.bytes().len());
    println!("graph       {}", info.graph_name);
    println!("producer    {}", info.producer);
    println!("ir version  {}", info.ir_version);
    let opsets: Vec<String> = info.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
    println!("opsets      {}", opsets.join(", "));
    for (title, values) in [("inputs", &info.inputs), ("outputs", &info.outputs)] {
        let width = values.iter().map(|v| v.name.len()).max().unwrap_or(0);
        for (i, v) in values.iter().enumerate() {
            let head = if i == 0 { title } else { "" };
            println!("{head:<11} {:<width$}  {:<6} {}", v.name, v.datatype, shape(v));
        }
    }
    let ops: Vec<String> = info.operators.iter().map(|(op, n)| format!("{op} x{n}")).collect();
    println!("operators   {}", ops.join(", "));
    for (i, b) in backends.iter().enumerate() {
        let head = if i == 0 { "backends" } else { "" };
        match &b.reason {
            None => println!("{head:<11} {:<6} yes", b.backend),
            Some(r) => println!("{head:<11} {:<6} no: {r}", b.backend),
        }
    }
    Ok(())
}
