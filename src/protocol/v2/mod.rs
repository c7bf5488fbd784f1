//! The KServe Open Inference Protocol (V2) REST message formats.

mod data;
mod decode;
mod encode;

pub use decode::{InferRequest, Parameters, RequestInput, RequestOutput, decode_request};
pub use encode::{InferResponse, JsonData, ResponseOutput};
