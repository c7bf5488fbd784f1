//! KServe V1 (TF-Serving style) routes: `GET /v1/models/{m}`, `POST /v1/models/{m}:predict`.
//!
//! `instances` is row-oriented: a list of rows for a single-input model, or a list of
//! `{input: value}` objects. `inputs` is column-oriented: a nested array for a single-input model,
//! or `{input: nested array}`. Answers are `{"predictions": ...}` and `{"outputs": ...}`.

use std::time::Instant;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use kiln_runtime_core::{NamedTensor, Tensor};
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq};
use serde_json::{Value, json};

use super::error::ApiError;
use super::http::{AppState, Resp, Served, check_content, json, read_body};
use super::nested::{NamedJson, NestedJson, tensor_from_json};
use super::repository::LoadedModel;
use super::stats::RequestTimes;
use super::v2::order_inputs;

/// `GET /v1/models/{m}`.
pub fn model_status(state: &AppState, name: &str) -> Result<Resp, ApiError> {
    let model = state.repo.get(name, None)?;
    Ok(json(StatusCode::OK, &json!({"name": model.name, "ready": true, "version": model.version})))
}

/// Builds the model's inputs from a V1 body.
pub fn inputs_from_v1(model: &LoadedModel, body: &Value) -> Result<(Vec<NamedTensor>, bool), ApiError> {
    let specs = &model.metadata.inputs;
    let obj =
        body.as_object().ok_or_else(|| ApiError::BadRequest("the body must be a JSON object".into()))?;
    let (data, rows) = match (obj.get("instances"), obj.get("inputs")) {
        (Some(i), None) => (i, true),
        (None, Some(i)) => (i, false),
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest("give either \"instances\" or \"inputs\", not both".into()));
        }
        (None, None) => {
            return Err(ApiError::BadRequest(
                "the body needs \"instances\" (rows) or \"inputs\" (columns)".into(),
            ));
        }
    };
    let single = specs.len() == 1;
    let inputs = if rows {
        let instances =
            data.as_array().ok_or_else(|| ApiError::BadRequest("\"instances\" must be a list".into()))?;
        if single && !instances.first().is_some_and(Value::is_object) {
            vec![NamedTensor::new(specs[0].name.clone(), tensor_from_json(data, &specs[0])?)]
        } else {
            specs
                .iter()
                .map(|spec| {
                    let column: Vec<Value> = instances
                        .iter()
                        .enumerate()
                        .map(|(i, inst)| {
                            inst.get(&spec.name).cloned().ok_or_else(|| {
                                ApiError::BadRequest(format!("instance {i} has no input \"{}\"", spec.name))
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    Ok(NamedTensor::new(spec.name.clone(), tensor_from_json(&Value::Array(column), spec)?))
                })
                .collect::<Result<Vec<_>, ApiError>>()?
        }
    } else if let (true, false) = (single, data.is_object()) {
        vec![NamedTensor::new(specs[0].name.clone(), tensor_from_json(data, &specs[0])?)]
    } else {
        let map = data
            .as_object()
            .ok_or_else(|| ApiError::BadRequest("\"inputs\" must map input names to arrays".into()))?;
        if let Some(unknown) = map.keys().find(|k| !specs.iter().any(|s| &s.name == *k)) {
            let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(ApiError::BadRequest(format!(
                "unknown input \"{unknown}\"; the model's inputs are: {}",
                names.join(", ")
            )));
        }
        specs
            .iter()
            .map(|spec| {
                let v = map
                    .get(&spec.name)
                    .ok_or_else(|| ApiError::BadRequest(format!("missing input \"{}\"", spec.name)))?;
                Ok(NamedTensor::new(spec.name.clone(), tensor_from_json(v, spec)?))
            })
            .collect::<Result<Vec<_>, ApiError>>()?
    };
    Ok((inputs, rows))
}

/// `{"predictions": [...]}`: one entry per row; per-row objects when there are several outputs.
struct Predictions<'a>(&'a [NamedTensor]);

impl Serialize for Predictions<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        if let [only] = self.0 {
            map.serialize_entry("predictions", &NestedJson(&only.tensor))?;
        } else {
            let rows = self.0.first().and_then(|o| o.tensor.shape().first().copied()).unwrap_or(0);
            let split: Vec<Vec<Tensor>> = self
                .0
                .iter()
                .map(|o| o.tensor.split(&vec![1; rows]).map_err(serde::ser::Error::custom))
                .collect::<Result<_, _>>()?;
            map.serialize_entry("predictions", &Rows { names: self.0, split: &split, rows })?;
        }
        map.end()
    }
}

struct Rows<'a> {
    names: &'a [NamedTensor],
    split: &'a [Vec<Tensor>],
    rows: usize,
}

impl Serialize for Rows<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.rows))?;
        for r in 0..self.rows {
            let row: Vec<(&str, Tensor)> = self
                .names
                .iter()
                .zip(self.split)
                .map(|(n, parts)| {
                    let t = parts[r].clone();
                    let shape = t.shape()[1..].to_vec();
                    (n.name.as_str(), t.reshape(shape).expect("same element count"))
                })
                .collect();
            let refs: Vec<(&str, &Tensor)> = row.iter().map(|(n, t)| (*n, t)).collect();
            seq.serialize_element(&NamedJson(&refs))?;
        }
        seq.end()
    }
}

/// `{"outputs": nested}` for one output, `{"outputs": {name: nested}}` for several.
struct Columns<'a>(&'a [NamedTensor]);

impl Serialize for Columns<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        if let [only] = self.0 {
            map.serialize_entry("outputs", &NestedJson(&only.tensor))?;
        } else {
            let named: Vec<(&str, &Tensor)> = self.0.iter().map(|o| (o.name.as_str(), &o.tensor)).collect();
            map.serialize_entry("outputs", &NamedJson(&named))?;
        }
        map.end()
    }
}

/// `POST /v1/models/{m}:predict`.
pub async fn predict(
    state: &AppState,
    req: Request<Incoming>,
    name: &str,
    served: &mut Served,
) -> Result<Resp, ApiError> {
    let model = state.repo.get(name, None)?;
    served.version.clone_from(&model.version);
    let _permit = state.admission.admit()?;
    check_content(req.headers(), false)?;
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let body = read_body(body, &parts.headers, state.config.max_body_bytes).await?;
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    let (inputs, rows) = inputs_from_v1(&model, &value)?;
    let inputs = order_inputs(&model.metadata, inputs)?;
    let done = match model.infer(inputs, state.config.request_timeout).await {
        Ok(d) => d,
        Err(e) => {
            model.stats.fail.record(started.elapsed());
            return Err(e);
        }
    };
    model.stats.record_success(RequestTimes {
        total: started.elapsed(),
        queue: done.queue,
        infer: done.compute,
        ..Default::default()
    });
    if rows {
        Ok(json(StatusCode::OK, &Predictions(&done.outputs)))
    } else {
        Ok(json(StatusCode::OK, &Columns(&done.outputs)))
    }
}
