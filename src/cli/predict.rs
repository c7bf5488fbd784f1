//! `kiln predict`: one-shot scoring of a V2-style request file, no server.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kiln_runtime_core::{ModelFile, NamedTensor};

use super::{BackendArgs, UsageError, classify};
use crate::protocol::v2::{InferResponse, ResponseOutput, decode_request};

/// Arguments of `kiln predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The ONNX model file.
    #[arg(long, value_name = "PATH.onnx")]
    pub model: PathBuf,
    /// V2-style request JSON: {"inputs":[{"name","shape","datatype","data"}]}; `-` reads stdin.
    #[arg(long, value_name = "FILE|-")]
    pub input: String,
    /// Pretty-print the output JSON.
    #[arg(long)]
    pub pretty: bool,
    #[command(flatten)]
    pub backend: BackendArgs,
}

fn read_input(input: &str) -> anyhow::Result<Vec<u8>> {
    if input == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).context("reading the request from stdin")?;
        return Ok(buf);
    }
    std::fs::read(input).map_err(|e| UsageError(format!("cannot read --input {input}: {e}")).into())
}

/// Runs `kiln predict`.
pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let model = ModelFile::read(&args.model).map_err(classify)?;
    let body = read_input(&args.input)?;
    let request = decode_request(&body)
        .map_err(|e| UsageError(format!("{}: invalid V2 request: {e}", display_input(&args.input))))?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let Some(tensor) = input.tensor else {
            return Err(UsageError(format!(
                "input \"{}\" uses binary_data_size; predict reads JSON data only",
                input.name
            ))
            .into());
        };
        inputs.push(NamedTensor::new(input.name, tensor));
    }

    let selected = args.backend.config().select(&model).map_err(classify)?;
    tracing::info!(backend = selected.backend.name(), reason = %selected.reason, "backend chosen");
    let started = std::time::Instant::now();
    let session = selected.backend.load(&model, &args.backend.load_options()).map_err(classify)?;
    tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "model loaded");

    let outputs = session.infer(inputs).map_err(classify)?;
    let wanted: Option<Vec<String>> = request.outputs.map(|o| o.into_iter().map(|o| o.name).collect());
    if let Some(names) = &wanted
        && let Some(unknown) = names.iter().find(|n| !outputs.iter().any(|o| &o.name == *n))
    {
        let known: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        return Err(UsageError(format!(
            "unknown output \"{unknown}\" requested; the model's outputs are: {}",
            known.join(", ")
        ))
        .into());
    }
    let selected_outputs = outputs
        .iter()
        .filter(|o| wanted.as_ref().is_none_or(|names| names.contains(&o.name)))
        .map(|o| ResponseOutput { name: &o.name, tensor: &o.tensor, binary_data_size: None })
        .collect();
    let model_name = args.model.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let response = InferResponse {
        model_name,
        model_version: None,
        id: request.id.as_deref(),
        outputs: selected_outputs,
    };
    let mut out = std::io::stdout().lock();
    let written = if args.pretty {
        serde_json::to_writer_pretty(&mut out, &response).map_err(std::io::Error::from)
    } else {
        serde_json::to_writer(&mut out, &response).map_err(std::io::Error::from)
    }
    .and_then(|()| writeln!(out));
    match written {
        // A reader that stopped early (`| head`) is not a failure of the prediction.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn display_input(input: &str) -> &str {
    if input == "-" { "stdin" } else { input }
}
