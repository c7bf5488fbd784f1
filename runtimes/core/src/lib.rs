//! Kiln's scoring seam.
//!
//! A [`Backend`] loads a model file into a [`Session`]; a session scores batches of
//! [`NamedTensor`]s. The types here are Kiln's own, so the HTTP layer decodes requests straight
//! into them and no engine type leaks upward. This crate depends on no inference engine.
#![forbid(unsafe_code)]

mod backend;
mod datatype;
mod error;
mod metadata;
pub mod onnx;
mod tensor;

pub use backend::{Backend, DEFAULT_MAX_BATCH_SIZE, LoadOptions, ModelFile, Session, Support, read_shared};
pub use bytes::Bytes;
pub use datatype::DataType;
pub use error::Error;
pub use half::{bf16, f16};
pub use metadata::{ModelMetadata, TensorSpec, format_shape};
pub use tensor::{Element, NamedTensor, Tensor, TensorData, cast_slice, element_count};
