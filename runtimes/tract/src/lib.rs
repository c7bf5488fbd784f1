//! Kiln's pure-Rust backend on tract.
//!
//! The model is parsed, typed and optimised once at load, with a dynamic batch axis kept symbolic;
//! the resulting plan is shared by every thread that calls [`Session::infer`]. Each call borrows a
//! run state from a small pool, so steady-state scoring does not re-plan or re-allocate the state.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use kiln_runtime_core::onnx::OnnxInfo;
use kiln_runtime_core::{
    Backend, Bytes, DataType, Error, LoadOptions, ModelFile, ModelMetadata, NamedTensor, Session, Support,
    Tensor, TensorSpec,
};
use tract_onnx::prelude::IntoArcTensor;
use tract_onnx::prelude::{
    Datum, DatumType, Framework, InferenceFact, InferenceModelExt, TDim, TValue, TVec, TypedModel,
    TypedRunnableModel, TypedSimpleState, tract_ndarray, tvec,
};
use tract_onnx::tract_core::model::IntoRunnable;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};
use tract_onnx::tract_hir::infer::ShapeFactoid;

/// Operators whose tract kernels are wrong for some element types (see [`known_wrong`]).
const TYPE_SENSITIVE: &[&str] = &["ReduceSum"];

/// The tract backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct TractBackend;

const NAME: &str = "tract";

impl TractBackend {
    /// A new backend value; tract needs no set-up.
    pub fn new() -> Self {
        TractBackend
    }
}

fn invalid_model(model: &ModelFile, e: impl std::fmt::Display) -> Error {
    Error::InvalidModel { path: model.path().to_path_buf(), reason: e.to_string() }
}

/// Formats a tract error chain on one line.
fn chain(e: &tract_onnx::prelude::TractError) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self) -> Result<(), Error> {
        Ok(())
    }

    fn supports(&self, model: &ModelFile) -> Result<Support, Error> {
        supports_with(model, &tract_onnx::onnx())
    }

    fn load(&self, model: &ModelFile, options: &LoadOptions) -> Result<Box<dyn Session>, Error> {
        Ok(Box::new(TractSession::load(model, options)?))
    }
}

/// What `framework` (tract's ONNX front end, possibly with extra operators registered) lacks to
/// run `model`.
pub fn supports_with(model: &ModelFile, framework: &tract_onnx::Onnx) -> Result<Support, Error> {
    let info = OnnxInfo::parse(model.bytes()).map_err(|e| invalid_model(model, e))?;
    let registry = &framework.op_register;
    let mut unsupported = BTreeSet::new();
    for op in info.operators.keys() {
        // tract registers operators by type name, whatever their domain.
        let op_type = op.rsplit(':').next().unwrap_or(op);
        if !registry.0.contains_key(op_type) {
            unsupported.insert(op.clone());
        }
    }
    for value in info.inputs.iter().chain(&info.outputs) {
        if value.datatype.parse::<DataType>().ok().and_then(to_tract_type).is_none() {
            unsupported.insert(format!("{} tensors (\"{}\")", value.datatype, value.name));
        }
    }
    if unsupported.is_empty()
        && ["DequantizeLinear", "QuantizeLinear"].iter().all(|op| info.operators.contains_key(*op))
        && LUT_WRONG.iter().any(|op| info.operators.contains_key(*op))
    {
        let proto = framework
            .proto_model_for_read(&mut &model.bytes()[..])
            .map_err(|e| invalid_model(model, chain(&e)))?;
        unsupported.extend(quantized_chains_tract_tabulates(&proto));
    }
    // Operators tract has but computes wrongly for some types only show once the graph is
    // typed, which costs as much as loading: do it only when such an operator is present.
    if unsupported.is_empty() && info.operators.keys().any(|op| TYPE_SENSITIVE.contains(&op.as_str())) {
        match typed_model(model, &info, framework) {
            Ok((typed, _)) => unsupported.extend(known_wrong(&typed)),
            Err(Error::InvalidModel { reason, .. }) => {
                unsupported.insert(format!("graph tract cannot analyse ({reason})"));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Support { unsupported_ops: unsupported.into_iter().collect() })
}

fn to_tract_type(d: DataType) -> Option<DatumType> {
    Some(match d {
        DataType::Bool => DatumType::Bool,
        DataType::Uint8 => DatumType::U8,
        DataType::Uint16 => DatumType::U16,
        DataType::Uint32 => DatumType::U32,
        DataType::Uint64 => DatumType::U64,
        DataType::Int8 => DatumType::I8,
        DataType::Int16 => DatumType::I16,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Fp16 => DatumType::F16,
        DataType::Fp32 => DatumType::F32,
        DataType::Fp64 => DatumType::F64,
        DataType::Bytes => DatumType::String,
        DataType::Bf16 => return None,
    })
}

fn from_tract_type(d: DatumType) -> Option<DataType> {
    Some(match d {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::Uint8,
        DatumType::U16 => DataType::Uint16,
        DatumType::U32 => DataType::Uint32,
        DatumType::U64 => DataType::Uint64,
        DatumType::I8 => DataType::Int8,
        DatumType::I16 => DataType::Int16,
        DatumType::I32 => DataType::Int32,
        DatumType::I64 | DatumType::TDim => DataType::Int64,
        DatumType::F16 => DataType::Fp16,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        DatumType::String => DataType::Bytes,
        _ => return None,
    })
}

/// Parses the model and types it with each input pinned to its declared type; dynamic
/// dimensions stay symbolic (named after the ONNX dim_param, or fresh when anonymous).
fn typed_model(
    model: &ModelFile,
    info: &OnnxInfo,
    onnx: &tract_onnx::Onnx,
) -> Result<(TypedModel, Vec<TensorSpec>), Error> {
    let proto =
        onnx.proto_model_for_read(&mut &model.bytes()[..]).map_err(|e| invalid_model(model, chain(&e)))?;
    let dir = model.path().parent().and_then(|p| p.to_str());
    let parsed = onnx.parse(&proto, dir).map_err(|e| invalid_model(model, chain(&e)))?;
    if !parsed.unresolved_inputs.is_empty() {
        return Err(invalid_model(model, format!("unresolved graph inputs {:?}", parsed.unresolved_inputs)));
    }
    let mut inference = parsed.model;
    let mut specs = Vec::new();
    for (ix, decl) in info.inputs.iter().enumerate() {
        let spec = decl.to_spec().ok_or_else(|| {
            invalid_model(
                model,
                format!("input \"{}\" has no tensor type and shape ({})", decl.name, decl.datatype),
            )
        })?;
        let dt = to_tract_type(spec.datatype).ok_or_else(|| Error::Unsupported {
            backend: NAME,
            ops: vec![format!("{} inputs", spec.datatype)],
        })?;
        let dims: TVec<TDim> = spec
            .shape
            .iter()
            .zip(&decl.dim_names)
            .map(|(&d, name)| {
                if d >= 0 {
                    TDim::Val(d)
                } else if name.is_empty() {
                    inference.symbols.new_with_prefix("dim").into()
                } else {
                    inference.symbols.sym(name).into()
                }
            })
            .collect();
        let shape: ShapeFactoid = dims.into_iter().collect();
        inference
            .set_input_fact(ix, InferenceFact::dt_shape(dt, shape))
            .map_err(|e| invalid_model(model, chain(&e)))?;
        specs.push(spec);
    }
    let typed = inference.into_typed().map_err(|e| invalid_model(model, chain(&e)))?;
    Ok((typed, specs))
}

/// Operators that are not elementwise, which tract 0.23 nevertheless turns into a 256-entry lookup
/// table when they sit on a chain of single-consumer links from a `DequantizeLinear` of 8-bit
/// integers to a `QuantizeLinear` (its `DequantizeLinearF32::declutter`): the table is computed
/// by running the chain on one 256-element vector, so a Softmax normalises over all 256 codes.
/// Found on onnxruntime's QDQ models, where `DequantizeLinear → Softmax → QuantizeLinear` answers
/// 1.0 for every probability.
const LUT_WRONG: &[&str] = &["Softmax", "LogSoftmax"];

/// The [`LUT_WRONG`] operators of `proto` that tract would tabulate.
fn quantized_chains_tract_tabulates(proto: &tract_onnx::pb::ModelProto) -> Vec<String> {
    let Some(graph) = &proto.graph else { return Vec::new() };
    let nodes = &graph.node;
    let outputs: BTreeSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let producer = |tensor: &str| nodes.iter().find(|n| n.output.iter().any(|o| o == tensor));
    // The node consuming `tensor`, when it alone does (the chain tract follows).
    let single_consumer = |tensor: &str| {
        let mut readers = nodes.iter().filter(|n| n.input.iter().any(|i| i == tensor));
        match (readers.next(), readers.next()) {
            (Some(n), None) if !outputs.contains(tensor) => Some(n),
            _ => None,
        }
    };
    let mut found = Vec::new();
    for node in nodes.iter().filter(|n| n.domain.is_empty() && LUT_WRONG.contains(&n.op_type.as_str())) {
        // Back through single-input links to a DequantizeLinear, forward to a QuantizeLinear.
        let mut back = node;
        let from_dq = loop {
            let Some(p) = back.input.first().and_then(|i| producer(i)) else { break false };
            if !single_consumer(&p.output[0]).is_some_and(|c| std::ptr::eq(c, back)) {
                break false;
            }
            if p.op_type == "DequantizeLinear" {
                break true;
            }
            if p.input.iter().filter(|i| !i.is_empty()).count() != 1 {
                break false;
            }
            back = p;
        };
        let mut forward = node;
        let to_q = loop {
            match forward.output.first().and_then(|o| single_consumer(o)) {
                Some(c) if c.op_type == "QuantizeLinear" => break true,
                Some(c) if c.input.iter().filter(|i| !i.is_empty()).count() == 1 => forward = c,
                _ => break false,
            }
        };
        if from_dq && to_q {
            let name = if node.name.is_empty() {
                node.output.first().cloned().unwrap_or_default()
            } else {
                node.name.clone()
            };
            found.push(format!(
                "{} between DequantizeLinear and QuantizeLinear (\"{}\": tract 0.23 evaluates it as an \
                 elementwise lookup table, which is wrong for it)",
                node.op_type, name
            ));
        }
    }
    found
}

/// Kernels of tract 0.23 that give wrong answers for some element types, found by the
/// conformance suite against onnxruntime: integer `ReduceSum` accumulates in `i32`, so sums of
/// 64-bit (and large unsigned 32-bit) integers lose their high bits.
fn known_wrong(typed: &TypedModel) -> Vec<String> {
    let mut found = Vec::new();
    for node in typed.nodes() {
        let Some(reduce) = node.op_as::<Reduce>() else { continue };
        if reduce.reducer != Reducer::Sum {
            continue;
        }
        let Some(input) = node.inputs.first() else { continue };
        let Ok(fact) = typed.outlet_fact(*input) else { continue };
        if matches!(fact.datum_type, DatumType::I64 | DatumType::U64 | DatumType::U32) {
            found.push(format!(
                "ReduceSum over {:?} (\"{}\": tract 0.23 sums integers in 32 bits)",
                fact.datum_type, node.name
            ));
        }
    }
    found
}

/// A loaded, optimised model.
pub struct TractSession {
    plan: Arc<TypedRunnableModel>,
    metadata: ModelMetadata,
    max_batch_size: usize,
    states: Mutex<Vec<TypedSimpleState>>,
}

impl TractSession {
    /// Parses, types and optimises the model.
    pub fn load(model: &ModelFile, options: &LoadOptions) -> Result<Self, Error> {
        Self::load_with(model, options, &tract_onnx::onnx())
    }

    /// Like [`TractSession::load`], with a given ONNX front end (extra operators registered).
    pub fn load_with(
        model: &ModelFile,
        options: &LoadOptions,
        framework: &tract_onnx::Onnx,
    ) -> Result<Self, Error> {
        let info = OnnxInfo::parse(model.bytes()).map_err(|e| invalid_model(model, e))?;
        supports_with(model, framework)?.into_result(NAME)?;
        let (typed, inputs) = typed_model(model, &info, framework)?;
        let typed = typed.into_optimized().map_err(|e| invalid_model(model, chain(&e)))?;
        let mut outputs = Vec::new();
        for (ix, outlet) in
            typed.output_outlets().map_err(|e| invalid_model(model, chain(&e)))?.iter().enumerate()
        {
            let fact = typed.outlet_fact(*outlet).map_err(|e| invalid_model(model, chain(&e)))?;
            let name = info
                .outputs
                .get(ix)
                .map(|d| d.name.clone())
                .or_else(|| typed.outlet_label(*outlet).map(str::to_string))
                .unwrap_or_else(|| format!("output_{ix}"));
            let datatype = from_tract_type(fact.datum_type).ok_or_else(|| Error::Unsupported {
                backend: NAME,
                ops: vec![format!("{:?} output \"{name}\"", fact.datum_type)],
            })?;
            let declared = info.outputs.get(ix).and_then(|d| d.shape.clone());
            let shape =
                declared.unwrap_or_else(|| fact.shape.iter().map(|d| d.to_i64().unwrap_or(-1)).collect());
            outputs.push(TensorSpec { name, datatype, shape });
        }
        let plan = typed.into_runnable().map_err(|e| invalid_model(model, chain(&e)))?;
        let metadata = ModelMetadata { inputs, outputs };
        let max_batch_size = if metadata.batchable() { options.max_batch_size } else { 0 };
        Ok(TractSession { plan, metadata, max_batch_size, states: Mutex::new(Vec::new()) })
    }

    fn run(&self, inputs: TVec<TValue>) -> Result<TVec<TValue>, Error> {
        let pooled = self.states.lock().ok().and_then(|mut s| s.pop());
        let mut state = match pooled {
            Some(s) => s,
            None => self.plan.spawn().map_err(|e| Error::Inference(chain(&e)))?,
        };
        let result = state.run(inputs).map_err(|e| Error::Inference(chain(&e)));
        if let Ok(mut states) = self.states.lock() {
            states.push(state);
        }
        result
    }
}

fn typed<T: kiln_runtime_core::Element + Datum + Copy>(
    t: &Tensor,
) -> Result<tract_onnx::prelude::Tensor, tract_onnx::prelude::TractError> {
    let bytes = t.raw_bytes().map(|b| &b[..]).unwrap_or_default();
    match kiln_runtime_core::cast_slice::<T>(bytes) {
        Some(slice) => tract_onnx::prelude::Tensor::from_shape(t.shape(), slice),
        None => tract_onnx::prelude::Tensor::from_shape(t.shape(), &t.to_vec::<T>().unwrap_or_default()),
    }
}

fn to_tract(t: &Tensor) -> Result<TValue, Error> {
    let fail = |e: tract_onnx::prelude::TractError| Error::Inference(chain(&e));
    let tensor = match t.datatype() {
        DataType::Bool => {
            let bools = t.to_bools()?;
            tract_onnx::prelude::Tensor::from_shape(t.shape(), &bools).map_err(fail)?
        }
        DataType::Uint8 => typed::<u8>(t).map_err(fail)?,
        DataType::Uint16 => typed::<u16>(t).map_err(fail)?,
        DataType::Uint32 => typed::<u32>(t).map_err(fail)?,
        DataType::Uint64 => typed::<u64>(t).map_err(fail)?,
        DataType::Int8 => typed::<i8>(t).map_err(fail)?,
        DataType::Int16 => typed::<i16>(t).map_err(fail)?,
        DataType::Int32 => typed::<i32>(t).map_err(fail)?,
        DataType::Int64 => typed::<i64>(t).map_err(fail)?,
        DataType::Fp16 => typed::<kiln_runtime_core::f16>(t).map_err(fail)?,
        DataType::Fp32 => typed::<f32>(t).map_err(fail)?,
        DataType::Fp64 => typed::<f64>(t).map_err(fail)?,
        DataType::Bytes => {
            let strings = t
                .strings()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    String::from_utf8(s.to_vec()).map_err(|_| {
                        Error::invalid_input(format!("BYTES element {i} is not UTF-8, which tract requires"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            tract_ndarray::ArrayD::from_shape_vec(t.shape(), strings)
                .map_err(|e| Error::Inference(e.to_string()))?
                .into()
        }
        DataType::Bf16 => return Err(Error::invalid_input("tract has no BF16 tensors")),
    };
    Ok(tensor.into())
}

/// A tract tensor viewed as packed bytes, so outputs reach the caller without a copy.
struct OwnedTract(Arc<tract_onnx::prelude::Tensor>);

impl AsRef<[u8]> for OwnedTract {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

fn from_tract(value: TValue, spec: &TensorSpec) -> Result<Tensor, Error> {
    let fail = |e: tract_onnx::prelude::TractError| Error::Inference(chain(&e));
    let tensor = value.into_arc_tensor();
    let shape = tensor.shape().to_vec();
    match tensor.datum_type() {
        DatumType::Bool => {
            let bools = tensor.try_as_plain_ram().map_err(fail)?.as_slice::<bool>().map_err(fail)?;
            Tensor::from_bools(shape, bools)
        }
        DatumType::String => {
            let strings = tensor.try_as_plain_ram().map_err(fail)?.as_slice::<String>().map_err(fail)?;
            Tensor::from_strings(
                shape,
                strings.iter().map(|s| Bytes::copy_from_slice(s.as_bytes())).collect(),
            )
        }
        DatumType::TDim => {
            let as_i64 = tensor.cast_to::<i64>().map_err(fail)?;
            Tensor::from_vec(
                shape,
                as_i64.try_as_plain_ram().map_err(fail)?.as_slice::<i64>().map_err(fail)?.to_vec(),
            )
        }
        dt => {
            let datatype = from_tract_type(dt).ok_or_else(|| {
                Error::Inference(format!(
                    "output \"{}\" has type {dt:?}, which Kiln cannot return",
                    spec.name
                ))
            })?;
            Tensor::from_raw(datatype, shape, Bytes::from_owner(OwnedTract(tensor)))
        }
    }
}

impl Session for TractSession {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    fn infer(&self, mut inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, Error> {
        self.metadata.validate_inputs(&inputs)?;
        // tract takes inputs positionally, in graph order.
        let mut ordered: TVec<TValue> = tvec![];
        for spec in &self.metadata.inputs {
            let pos = inputs.iter().position(|i| i.name == spec.name).unwrap_or_default();
            ordered.push(to_tract(&inputs.swap_remove(pos).tensor)?);
        }
        let outputs = self.run(ordered)?;
        outputs
            .into_iter()
            .zip(&self.metadata.outputs)
            .map(|(value, spec)| Ok(NamedTensor::new(spec.name.clone(), from_tract(value, spec)?)))
            .collect()
    }
}
