//! The Azure ML web-service contract: `GET /` -> `Healthy`, `POST /score`, `GET /swagger.json`.
//!
//! `/score` takes `{"data": rows}` for a single-input model or `{"inputs": {name: nested array}}`,
//! and answers `{output: nested array, ...}`. Errors are `{"message": ...}`. With several models
//! served, the model comes from `?model=NAME` or the `azureml-model-deployment` header.

use std::sync::Arc;
use std::time::Instant;

use http::header::HeaderValue;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use kiln_runtime_core::{DataType, NamedTensor, Tensor, TensorSpec};
use serde_json::{Value, json};

use super::error::ApiError;
use super::http::{AppState, Resp, Served, check_content, json, read_body};
use super::nested::{NamedJson, tensor_from_json};
use super::repository::LoadedModel;
use super::stats::RequestTimes;
use super::v2::order_inputs;

fn query_model(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|kv| kv.strip_prefix("model=")).filter(|m| !m.is_empty()).map(str::to_string)
}

fn query_version(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|kv| kv.strip_prefix("version="))
}

/// Picks the model a `/score` or swagger request is for.
fn pick_model(state: &AppState, req: &Request<Incoming>) -> Result<Arc<LoadedModel>, ApiError> {
    let wanted = query_model(req.uri().query()).or_else(|| {
        req.headers().get("azureml-model-deployment").and_then(|v| v.to_str().ok()).map(str::to_string)
    });
    match wanted {
        Some(name) => state.repo.get(&name, None),
        None => {
            let names = state.repo.names();
            match names.as_slice() {
                [only] => state.repo.get(only, None),
                _ => Err(ApiError::BadRequest(format!(
                    "several models are served ({}); choose one with ?model=NAME or the azureml-model-deployment header",
                    names.join(", ")
                ))),
            }
        }
    }
}

fn inputs_from_body(model: &LoadedModel, body: &Value) -> Result<Vec<NamedTensor>, ApiError> {
    let specs = &model.metadata.inputs;
    let obj = body.as_object().ok_or_else(|| {
        ApiError::BadRequest(
            "the body must be a JSON object: {\"data\": rows} or {\"inputs\": {name: array}}".into(),
        )
    })?;
    match (obj.get("data"), obj.get("inputs")) {
        (Some(data), None) => match specs.as_slice() {
            [spec] => Ok(vec![NamedTensor::new(spec.name.clone(), tensor_from_json(data, spec)?)]),
            _ => Err(ApiError::BadRequest(format!(
                "\"data\" is for single-input models; this model has inputs {}: send {{\"inputs\": {{name: array}}}}",
                specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        },
        (None, Some(Value::Object(map))) => {
            if let Some(unknown) = map.keys().find(|k| !specs.iter().any(|s| &s.name == *k)) {
                return Err(ApiError::BadRequest(format!("unknown input \"{unknown}\"")));
            }
            specs
                .iter()
                .map(|spec| {
                    let v = map
                        .get(&spec.name)
                        .ok_or_else(|| ApiError::BadRequest(format!("missing input \"{}\"", spec.name)))?;
                    Ok(NamedTensor::new(spec.name.clone(), tensor_from_json(v, spec)?))
                })
                .collect()
        }
        (None, Some(_)) => {
            Err(ApiError::BadRequest("\"inputs\" must be an object {name: nested array}".into()))
        }
        _ => Err(ApiError::BadRequest("send {\"data\": rows} or {\"inputs\": {name: nested array}}".into())),
    }
}

/// `POST /score`.
pub async fn score(state: &AppState, req: Request<Incoming>, served: &mut Served) -> Result<Resp, ApiError> {
    let model = pick_model(state, &req)?;
    served.model.clone_from(&model.name);
    served.version.clone_from(&model.version);
    let _permit = state.admission.admit()?;
    check_content(req.headers(), false)?;
    let (parts, body) = req.into_parts();
    let body = read_body(body, &parts.headers, state.config.max_body_bytes).await?;
    let started = Instant::now();
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not UTF-8: {e}")))?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    let inputs = order_inputs(&model.metadata, inputs_from_body(&model, &value)?)?;
    let done = match model.infer(inputs, state.config.request_timeout).await {
        Ok(d) => d,
        Err(e) => {
            model.stats.fail.record(started.elapsed());
            return Err(e);
        }
    };
    let named: Vec<(&str, &Tensor)> = done.outputs.iter().map(|o| (o.name.as_str(), &o.tensor)).collect();
    let mut resp = json(StatusCode::OK, &NamedJson(&named));
    let ms = started.elapsed().as_secs_f64() * 1e3;
    model.stats.record_success(RequestTimes {
        total: started.elapsed(),
        queue: done.queue,
        infer: done.compute,
        ..Default::default()
    });
    if let Ok(v) = HeaderValue::from_str(&format!("{ms:.3}")) {
        resp.headers_mut().insert("x-ms-run-fn-exec-ms", v);
    }
    Ok(resp)
}

fn item_schema(dt: DataType) -> Value {
    match dt {
        DataType::Bool => json!({"type": "boolean"}),
        DataType::Bytes => json!({"type": "string"}),
        DataType::Fp16 | DataType::Bf16 | DataType::Fp32 => json!({"type": "number", "format": "float"}),
        DataType::Fp64 => json!({"type": "number", "format": "double"}),
        DataType::Int64 | DataType::Uint64 | DataType::Uint32 => {
            json!({"type": "integer", "format": "int64"})
        }
        _ => json!({"type": "integer", "format": "int32"}),
    }
}

/// Nested arrays, one level per dimension.
fn tensor_schema(spec: &TensorSpec) -> Value {
    let mut schema = item_schema(spec.datatype);
    for &d in spec.shape.iter().rev() {
        let mut arr = json!({"type": "array", "items": schema});
        if d >= 0 {
            arr["minItems"] = d.into();
            arr["maxItems"] = d.into();
        }
        schema = arr;
    }
    schema["description"] =
        format!("{} {}", spec.datatype, kiln_runtime_core::format_shape(&spec.shape)).into();
    schema
}

fn io_schemas(model: &LoadedModel) -> (Value, Value) {
    let inputs: serde_json::Map<String, Value> =
        model.metadata.inputs.iter().map(|s| (s.name.clone(), tensor_schema(s))).collect();
    let outputs: serde_json::Map<String, Value> =
        model.metadata.outputs.iter().map(|s| (s.name.clone(), tensor_schema(s))).collect();
    let input_names: Vec<&str> = model.metadata.inputs.iter().map(|s| s.name.as_str()).collect();
    let mut input = json!({
        "type": "object",
        "properties": {"inputs": {"type": "object", "properties": inputs, "required": input_names}},
    });
    if let [only] = model.metadata.inputs.as_slice() {
        input["properties"]["data"] = tensor_schema(only);
    }
    (input, json!({"type": "object", "properties": outputs}))
}

/// `GET /swagger.json[?version=2|3]`, generated from the model's metadata.
pub fn swagger(state: &AppState, req: &Request<Incoming>) -> Result<Resp, ApiError> {
    let model = pick_model(state, req)?;
    let title = format!("kiln: {} version {}", model.name, model.version);
    let error = json!({"type": "object", "properties": {"message": {"type": "string"}}});
    let doc = match query_version(req.uri().query()).unwrap_or("2") {
        "2" => {
            let (input, output) = io_schemas(&model);
            json!({
                "swagger": "2.0",
                "info": {"title": title, "description": "Scoring API generated by kiln from the model's metadata", "version": "1.0"},
                "schemes": ["http"],
                "consumes": ["application/json"],
                "produces": ["application/json"],
                "securityDefinitions": {"Bearer": {"type": "apiKey", "name": "Authorization", "in": "header",
                    "description": "Send `Bearer <key>` when the service requires a key"}},
                "paths": {
                    "/": {"get": {"operationId": "ServiceHealthCheck", "description": "Liveness",
                        "responses": {"200": {"description": "Healthy", "schema": {"type": "string"}}}}},
                    "/score": {"post": {"operationId": "RunMLService", "description": "Score the model",
                        "security": [{"Bearer": []}],
                        "parameters": [{"name": "serviceInputPayload", "in": "body", "required": true,
                            "schema": {"$ref": "#/definitions/ServiceInput"}}],
                        "responses": {
                            "200": {"description": "Named outputs", "schema": {"$ref": "#/definitions/ServiceOutput"}},
                            "default": {"description": "Error", "schema": {"$ref": "#/definitions/ErrorResponse"}}}}}
                },
                "definitions": {"ServiceInput": input, "ServiceOutput": output, "ErrorResponse": error},
            })
        }
        "3" => {
            let (input, output) = io_schemas(&model);
            json!({
                "openapi": "3.0.1",
                "info": {"title": title, "description": "Scoring API generated by kiln from the model's metadata", "version": "1.0"},
                "paths": {
                    "/": {"get": {"operationId": "ServiceHealthCheck", "description": "Liveness",
                        "responses": {"200": {"description": "Healthy",
                            "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
                    "/score": {"post": {"operationId": "RunMLService", "description": "Score the model",
                        "security": [{"Bearer": []}],
                        "requestBody": {"required": true, "content": {"application/json":
                            {"schema": {"$ref": "#/components/schemas/ServiceInput"}}}},
                        "responses": {
                            "200": {"description": "Named outputs", "content": {"application/json":
                                {"schema": {"$ref": "#/components/schemas/ServiceOutput"}}}},
                            "default": {"description": "Error", "content": {"application/json":
                                {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}}}}
                },
                "components": {
                    "schemas": {"ServiceInput": input, "ServiceOutput": output, "ErrorResponse": error},
                    "securitySchemes": {"Bearer": {"type": "http", "scheme": "bearer"}},
                },
            })
        }
        other => {
            return Err(ApiError::BadRequest(format!(
                "unknown swagger version {other:?}; use version=2 or version=3"
            )));
        }
    };
    Ok(json(StatusCode::OK, &doc))
}
