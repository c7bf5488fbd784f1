//! Kiln's ONNX Runtime backend, through `ort` with the library loaded at run time.
//!
//! The shared library is looked for, in order, at: the path given by the caller (`--ort-lib`),
//! `ORT_DYLIB_PATH`, next to the executable, the active or project-local Python virtual
//! environment, and the `onnxruntime` package of the `python3` on `PATH`. One ONNX Runtime
//! environment exists per process; it is created on first use and shared by every session.
#![forbid(unsafe_code)]

mod discover;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use kiln_runtime_core::onnx::{DEFAULT_DOMAIN, OnnxInfo};
use kiln_runtime_core::{
    Backend, Bytes, DataType, Error, LoadOptions, ModelFile, ModelMetadata, NamedTensor, Session, Support,
    Tensor, TensorSpec,
};
use ort::environment::Environment;
use ort::session::SessionInputValue;
use ort::value::{DynValue, PrimitiveTensorElementType, TensorElementType, ValueType};

pub use discover::{LibrarySearch, install_hint};

const NAME: &str = "ort";

/// Operator domains ONNX Runtime's CPU build implements; other domains need custom-op libraries.
const KNOWN_DOMAINS: [&str; 4] = [DEFAULT_DOMAIN, "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"];

/// The process-wide environment: the library path it came from, or why it could not be made.
static ENVIRONMENT: OnceLock<Result<(Environment, PathBuf), String>> = OnceLock::new();

/// The ONNX Runtime backend.
#[derive(Debug, Clone, Default)]
pub struct OrtBackend {
    lib_path: Option<PathBuf>,
}

impl OrtBackend {
    /// A backend that loads the library from `lib_path` when given, else searches for it.
    pub fn new(lib_path: Option<PathBuf>) -> Self {
        OrtBackend { lib_path }
    }

    /// The environment, created on first call; later calls return the same result.
    fn environment(&self) -> Result<&'static Environment, Error> {
        let result = ENVIRONMENT.get_or_init(|| {
            let path = LibrarySearch::new(self.lib_path.clone()).find()?;
            let builder = ort::init_from(&path).map_err(|e| format!("{e}. {}", install_hint()))?;
            let env = builder.with_name("kiln").build().map_err(|e| e.to_string())?;
            tracing::info!(library = %path.display(), "ONNX Runtime loaded");
            Ok((env, path))
        });
        match result {
            Ok((env, path)) => {
                if let Some(wanted) = &self.lib_path
                    && wanted != path
                {
                    tracing::warn!(
                        wanted = %wanted.display(),
                        loaded = %path.display(),
                        "ONNX Runtime was already loaded from another path in this process; using it"
                    );
                }
                Ok(env)
            }
            Err(reason) => Err(Error::Unavailable { backend: NAME, reason: reason.clone() }),
        }
    }

    /// The path of the loaded library, once [`Backend::check`] has succeeded.
    pub fn loaded_library() -> Option<PathBuf> {
        ENVIRONMENT.get().and_then(|r| r.as_ref().ok()).map(|(_, p)| p.clone())
    }
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self) -> Result<(), Error> {
        self.environment().map(|_| ())
    }

    fn supports(&self, model: &ModelFile) -> Result<Support, Error> {
        let info = OnnxInfo::parse(model.bytes()).map_err(|e| invalid_model(model, e))?;
        let mut unsupported = BTreeSet::new();
        for op in info.operators.keys() {
            if let Some((domain, _)) = op.split_once(':')
                && !KNOWN_DOMAINS.contains(&domain)
            {
                unsupported.insert(op.clone());
            }
        }
        for value in info.inputs.iter().chain(&info.outputs) {
            if value.datatype.parse::<DataType>().is_err() {
                unsupported.insert(format!(
                    "{} values (\"{}\"; Kiln serves tensors only)",
                    value.datatype, value.name
                ));
            }
        }
        Ok(Support { unsupported_ops: unsupported.into_iter().collect() })
    }

    fn load(&self, model: &ModelFile, options: &LoadOptions) -> Result<Box<dyn Session>, Error> {
        let env = self.environment()?;
        self.supports(model)?.into_result(NAME)?;
        let fail = |e: ort::Error| invalid_model(model, e);
        let mut builder = ort::session::Session::builder(env).map_err(fail)?;
        if let Some(n) = options.intra_op_threads {
            builder = builder.with_intra_threads(n).map_err(|e| invalid_model(model, e))?;
        }
        if let Some(n) = options.inter_op_threads {
            builder = builder.with_inter_threads(n).map_err(|e| invalid_model(model, e))?;
            builder = builder.with_parallel_execution(n > 1).map_err(|e| invalid_model(model, e))?;
        }
        // From memory rather than the path: the bytes were already read and checked once, and the
        // session then cannot see a file replaced underneath it.
        let session = builder.commit_from_memory(model.bytes()).map_err(fail)?;
        let inputs =
            session.inputs().iter().map(|o| spec(o.name(), o.dtype())).collect::<Result<Vec<_>, _>>()?;
        let outputs =
            session.outputs().iter().map(|o| spec(o.name(), o.dtype())).collect::<Result<Vec<_>, _>>()?;
        let metadata = ModelMetadata { inputs, outputs };
        let max_batch_size = if metadata.batchable() { options.max_batch_size } else { 0 };
        Ok(Box::new(OrtSession { session: Mutex::new(session), metadata, max_batch_size }))
    }
}

fn invalid_model(model: &ModelFile, e: impl std::fmt::Display) -> Error {
    Error::InvalidModel { path: model.path().to_path_buf(), reason: e.to_string() }
}

fn datatype(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Bfloat16 => DataType::Bf16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

fn spec(name: &str, ty: &ValueType) -> Result<TensorSpec, Error> {
    let unsupported = || Error::Unsupported { backend: NAME, ops: vec![format!("{ty} value \"{name}\"")] };
    match ty {
        ValueType::Tensor { ty: elem, shape, .. } => Ok(TensorSpec {
            name: name.to_string(),
            datatype: datatype(*elem).ok_or_else(unsupported)?,
            shape: shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect(),
        }),
        _ => Err(unsupported()),
    }
}

/// A loaded ONNX Runtime session. `ort` requires `&mut` to run, so calls are serialised here;
/// concurrency comes from running several sessions (the server's instance pool).
pub struct OrtSession {
    session: Mutex<ort::session::Session>,
    metadata: ModelMetadata,
    max_batch_size: usize,
}

fn shape_i64(t: &Tensor) -> Vec<i64> {
    t.shape().iter().map(|&d| d as i64).collect()
}

fn typed_value<T: kiln_runtime_core::Element + PrimitiveTensorElementType + std::fmt::Debug>(
    t: &Tensor,
) -> Result<DynValue, Error> {
    let values = t.to_vec::<T>()?;
    ort::value::Tensor::from_array((shape_i64(t), values))
        .map(|v| v.into_dyn())
        .map_err(|e| Error::Inference(e.to_string()))
}

fn to_ort(t: &Tensor) -> Result<DynValue, Error> {
    match t.datatype() {
        DataType::Bool => {
            let values = t.to_bools()?;
            ort::value::Tensor::from_array((shape_i64(t), values))
                .map(|v| v.into_dyn())
                .map_err(|e| Error::Inference(e.to_string()))
        }
        DataType::Uint8 => typed_value::<u8>(t),
        DataType::Uint16 => typed_value::<u16>(t),
        DataType::Uint32 => typed_value::<u32>(t),
        DataType::Uint64 => typed_value::<u64>(t),
        DataType::Int8 => typed_value::<i8>(t),
        DataType::Int16 => typed_value::<i16>(t),
        DataType::Int32 => typed_value::<i32>(t),
        DataType::Int64 => typed_value::<i64>(t),
        DataType::Fp16 => typed_value::<kiln_runtime_core::f16>(t),
        DataType::Bf16 => typed_value::<kiln_runtime_core::bf16>(t),
        DataType::Fp32 => typed_value::<f32>(t),
        DataType::Fp64 => typed_value::<f64>(t),
        DataType::Bytes => {
            let strings = t
                .strings()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    String::from_utf8(s.to_vec()).map_err(|_| {
                        Error::invalid_input(format!(
                            "BYTES element {i} is not UTF-8, which ONNX Runtime requires"
                        ))
                    })
                })
                .collect::<Result<Vec<String>, _>>()?;
            ort::value::Tensor::from_string_array((shape_i64(t), &strings[..]))
                .map(|v| v.into_dyn())
                .map_err(|e| Error::Inference(e.to_string()))
        }
    }
}

fn typed_output<T: kiln_runtime_core::Element + PrimitiveTensorElementType>(
    v: &DynValue,
) -> Result<Tensor, ort::Error> {
    let (shape, data) = v.try_extract_tensor::<T>()?;
    let shape = shape.iter().map(|&d| d as usize).collect();
    Tensor::from_vec(shape, data.to_vec()).map_err(|e| ort::Error::new(e.to_string()))
}

fn from_ort(name: &str, v: &DynValue) -> Result<Tensor, Error> {
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(Error::Inference(format!("output \"{name}\" is a {}, not a tensor", v.dtype())));
    };
    let result = match ty {
        TensorElementType::Bool => v.try_extract_tensor::<bool>().and_then(|(shape, data)| {
            Tensor::from_bools(shape.iter().map(|&d| d as usize).collect(), data)
                .map_err(|e| ort::Error::new(e.to_string()))
        }),
        TensorElementType::Uint8 => typed_output::<u8>(v),
        TensorElementType::Uint16 => typed_output::<u16>(v),
        TensorElementType::Uint32 => typed_output::<u32>(v),
        TensorElementType::Uint64 => typed_output::<u64>(v),
        TensorElementType::Int8 => typed_output::<i8>(v),
        TensorElementType::Int16 => typed_output::<i16>(v),
        TensorElementType::Int32 => typed_output::<i32>(v),
        TensorElementType::Int64 => typed_output::<i64>(v),
        TensorElementType::Float16 => typed_output::<kiln_runtime_core::f16>(v),
        TensorElementType::Bfloat16 => typed_output::<kiln_runtime_core::bf16>(v),
        TensorElementType::Float32 => typed_output::<f32>(v),
        TensorElementType::Float64 => typed_output::<f64>(v),
        TensorElementType::String => v.try_extract_strings().and_then(|(shape, data)| {
            Tensor::from_strings(
                shape.iter().map(|&d| d as usize).collect(),
                data.into_iter().map(Bytes::from).collect(),
            )
            .map_err(|e| ort::Error::new(e.to_string()))
        }),
        other => return Err(Error::Inference(format!("output \"{name}\" has element type {other}"))),
    };
    result.map_err(|e| Error::Inference(format!("output \"{name}\": {e}")))
}

impl Session for OrtSession {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    fn infer(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, Error> {
        self.metadata.validate_inputs(&inputs)?;
        let values = inputs
            .iter()
            .map(|i| Ok((i.name.as_str(), SessionInputValue::from(to_ort(&i.tensor)?))))
            .collect::<Result<Vec<_>, Error>>()?;
        let mut session =
            self.session.lock().map_err(|_| Error::Inference("session lock poisoned".into()))?;
        let outputs = session.run(values).map_err(|e| Error::Inference(e.to_string()))?;
        self.metadata
            .outputs
            .iter()
            .map(|spec| {
                let value = outputs.get(&spec.name).ok_or_else(|| {
                    Error::Inference(format!("ONNX Runtime returned no output \"{}\"", spec.name))
                })?;
                Ok(NamedTensor::new(spec.name.clone(), from_ort(&spec.name, value)?))
            })
            .collect()
    }
}
