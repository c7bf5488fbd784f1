//! Open Inference Protocol V2 routes, with Triton's model configuration, statistics and
//! repository extensions.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::HeaderValue;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use kiln_runtime_core::{ModelMetadata, NamedTensor};
use serde_json::{Value, json};

use super::binary::{self, HEADER_LENGTH};
use super::error::ApiError;
use super::http::{AppState, ModelAction, Resp, Served, check_content, json, read_body, with_type};
use super::repository::{LoadedModel, Repository};
use super::stats::RequestTimes;
use crate::protocol::v2::{InferResponse, RequestOutput, ResponseOutput, decode_request};

/// Extensions this server implements, as advertised by `GET /v2`.
pub const EXTENSIONS: &[&str] =
    &["binary_tensor_data", "model_repository", "model_configuration", "statistics", "parameters"];

/// `GET /v2`.
pub fn server_metadata() -> Resp {
    json(
        StatusCode::OK,
        &json!({"name": "kiln", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS}),
    )
}

/// `GET /v2/models`: every model with its versions and state.
pub fn list_models(repo: &Repository) -> Resp {
    let index = repo.index();
    let models: Vec<Value> = repo
        .names()
        .into_iter()
        .map(|name| {
            let versions: Vec<&str> =
                index.iter().filter(|e| e.name == name).map(|e| e.version.as_str()).collect();
            let ready = index.iter().any(|e| e.name == name && e.state == "READY");
            json!({"name": name, "versions": versions, "ready": ready})
        })
        .collect();
    json(StatusCode::OK, &json!({ "models": models }))
}

/// `GET /v2/models/stats`.
pub fn all_stats(repo: &Repository) -> Resp {
    let stats: Vec<Value> = repo.ready_models().iter().map(|m| m.stats.json(&m.name, &m.version)).collect();
    json(StatusCode::OK, &json!({ "model_stats": stats }))
}

fn platform(model: &LoadedModel) -> &'static str {
    match model.backend {
        "ort" => "onnxruntime_onnx",
        "tract" => "tract_onnx",
        _ => "onnx",
    }
}

fn tensors_json(specs: &[kiln_runtime_core::TensorSpec]) -> Vec<Value> {
    specs.iter().map(|s| json!({"name": s.name, "datatype": s.datatype, "shape": s.shape})).collect()
}

/// Triton's model configuration, which perf_analyzer reads: with batching, dims omit axis 0.
fn model_config(model: &LoadedModel) -> Value {
    let batching = model.max_batch_size > 0;
    let io = |specs: &[kiln_runtime_core::TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|s| {
                let dims = if batching { &s.shape[1..] } else { &s.shape[..] };
                json!({"name": s.name, "data_type": s.datatype.triton_config_name(), "dims": dims})
            })
            .collect()
    };
    let mut config = json!({
        "name": model.name,
        "platform": platform(model),
        "backend": model.backend,
        "version_policy": {"specific": {"versions": [model.version]}},
        "max_batch_size": model.max_batch_size,
        "input": io(&model.metadata.inputs),
        "output": io(&model.metadata.outputs),
        "instance_group": [{"count": model.spec.settings.instances, "kind": "KIND_CPU"}],
    });
    if batching {
        config["dynamic_batching"] =
            json!({"max_queue_delay_microseconds": model.spec.settings.max_queue_delay.as_micros() as u64});
    }
    config
}

/// Routes under `/v2/models/{m}[/versions/{v}]`.
pub async fn model_route(
    state: &AppState,
    req: Request<Incoming>,
    name: &str,
    version: Option<&str>,
    action: ModelAction,
    served: &mut Served,
) -> Result<Resp, ApiError> {
    let allowed = if action == ModelAction::Infer { Method::POST } else { Method::GET };
    if req.method() != allowed {
        return Err(ApiError::MethodNotAllowed(if allowed == Method::POST { "POST" } else { "GET" }));
    }
    if action == ModelAction::Ready {
        return match state.repo.get(name, version) {
            Ok(_) => Ok(json(StatusCode::OK, &json!({"name": name, "ready": true}))),
            Err(ApiError::Unavailable(_)) => {
                Ok(json(StatusCode::SERVICE_UNAVAILABLE, &json!({"name": name, "ready": false})))
            }
            Err(e) => Err(e),
        };
    }
    let model = state.repo.get(name, version)?;
    served.version.clone_from(&model.version);
    match action {
        ModelAction::Metadata => Ok(json(
            StatusCode::OK,
            &json!({
                "name": model.name,
                "versions": state.repo.versions(name),
                "platform": platform(&model),
                "inputs": tensors_json(&model.metadata.inputs),
                "outputs": tensors_json(&model.metadata.outputs),
            }),
        )),
        ModelAction::Config => Ok(json(StatusCode::OK, &model_config(&model))),
        ModelAction::Stats => {
            Ok(json(StatusCode::OK, &json!({"model_stats": [model.stats.json(&model.name, &model.version)]})))
        }
        ModelAction::Infer => infer(state, req, model).await,
        ModelAction::Ready => unreachable!("handled above"),
    }
}

/// Checks inputs against the model and puts them in the model's input order.
pub fn order_inputs(
    metadata: &ModelMetadata,
    mut inputs: Vec<NamedTensor>,
) -> Result<Vec<NamedTensor>, ApiError> {
    metadata.validate_inputs(&inputs)?;
    let mut ordered = Vec::with_capacity(inputs.len());
    for spec in &metadata.inputs {
        if let Some(pos) = inputs.iter().position(|i| i.name == spec.name) {
            ordered.push(inputs.swap_remove(pos));
        }
    }
    Ok(ordered)
}

/// Which outputs to return, in order, and whether each goes as binary data.
fn select_outputs(
    metadata: &ModelMetadata,
    requested: Option<&[RequestOutput]>,
    binary_default: bool,
) -> Result<Vec<(usize, bool)>, ApiError> {
    let Some(requested) = requested else {
        return Ok((0..metadata.outputs.len()).map(|i| (i, binary_default)).collect());
    };
    requested
        .iter()
        .map(|r| {
            let ix = metadata.outputs.iter().position(|o| o.name == r.name).ok_or_else(|| {
                let names: Vec<&str> = metadata.outputs.iter().map(|o| o.name.as_str()).collect();
                ApiError::BadRequest(format!(
                    "unknown output \"{}\" requested; the model's outputs are: {}",
                    r.name,
                    names.join(", ")
                ))
            })?;
            Ok((ix, r.binary_data().unwrap_or(binary_default)))
        })
        .collect()
}

async fn infer(state: &AppState, req: Request<Incoming>, model: Arc<LoadedModel>) -> Result<Resp, ApiError> {
    let started = Instant::now();
    let result = infer_inner(state, req, &model, started).await;
    if result.is_err() {
        model.stats.fail.record(started.elapsed());
    }
    result
}

/// Scores one request; records its statistics when it succeeds.
async fn infer_inner(
    state: &AppState,
    req: Request<Incoming>,
    model: &LoadedModel,
    started: Instant,
) -> Result<Resp, ApiError> {
    let _permit = state.admission.admit()?;
    check_content(req.headers(), true)?;
    let header_len = match req.headers().get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()).ok_or_else(|| {
            ApiError::BadRequest("Inference-Header-Content-Length must be a non-negative integer".into())
        })?),
    };
    let (parts, body) = req.into_parts();
    let body = read_body(body, &parts.headers, state.config.max_body_bytes).await?;
    let decode_started = Instant::now();
    let (header, rest) = binary::split_body(body, header_len)?;
    let mut request = decode_request(&header)
        .map_err(|e| ApiError::BadRequest(format!("invalid inference request: {e}")))?;
    binary::attach(&mut request, rest)?;
    let outputs_wanted =
        select_outputs(&model.metadata, request.outputs.as_deref(), request.binary_data_output())?;
    let inputs: Vec<NamedTensor> = request
        .inputs
        .into_iter()
        .map(|i| NamedTensor::new(i.name, i.tensor.expect("attach() filled every input")))
        .collect();
    let inputs = order_inputs(&model.metadata, inputs)?;
    let input_time = decode_started.elapsed();

    let done = model.infer(inputs, state.config.request_timeout).await?;

    let encode_started = Instant::now();
    let mut binary_size = 0usize;
    let mut chunks = Vec::new();
    let outputs: Vec<ResponseOutput<'_>> = outputs_wanted
        .iter()
        .map(|&(ix, as_binary)| {
            let out = &done.outputs[ix];
            let binary_data_size = as_binary.then(|| {
                let bytes = binary::tensor_bytes(&out.tensor);
                binary_size += bytes.len();
                let n = bytes.len();
                chunks.push(bytes);
                n
            });
            ResponseOutput { name: &out.name, tensor: &out.tensor, binary_data_size }
        })
        .collect();
    let response = InferResponse {
        model_name: &model.name,
        model_version: Some(&model.version),
        id: request.id.as_deref(),
        outputs,
    };
    let header =
        serde_json::to_vec(&response).map_err(|e| ApiError::Internal(format!("encoding failed: {e}")))?;
    let resp = if chunks.is_empty() {
        with_type(StatusCode::OK, "application/json", header.into())
    } else {
        let mut body = BytesMut::with_capacity(header.len() + binary_size);
        body.extend_from_slice(&header);
        for c in &chunks {
            body.extend_from_slice(c);
        }
        let mut r = with_type(StatusCode::OK, "application/octet-stream", Bytes::from(body));
        r.headers_mut().insert(HEADER_LENGTH, HeaderValue::from(header.len()));
        r
    };
    model.stats.record_success(RequestTimes {
        total: started.elapsed(),
        queue: done.queue,
        input: input_time,
        infer: done.compute,
        output: encode_started.elapsed(),
    });
    Ok(resp)
}
