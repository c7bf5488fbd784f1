//! Encoding of V2 inference responses: typed slices written straight to JSON.

use kiln_runtime_core::{DataType, Element, Tensor, TensorData, bf16, cast_slice, f16};
use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};

/// One output of a response. `data` is `None` when the output travels as binary data.
#[derive(Debug)]
pub struct ResponseOutput<'a> {
    /// Output name.
    pub name: &'a str,
    /// The tensor.
    pub tensor: &'a Tensor,
    /// Size of the binary chunk, when the output is sent after the JSON header.
    pub binary_data_size: Option<usize>,
}

/// A V2 inference response.
#[derive(Debug)]
pub struct InferResponse<'a> {
    /// Model name.
    pub model_name: &'a str,
    /// Model version, when known.
    pub model_version: Option<&'a str>,
    /// The request's id, echoed.
    pub id: Option<&'a str>,
    /// Outputs, in the order requested (or model order).
    pub outputs: Vec<ResponseOutput<'a>>,
}

impl Serialize for InferResponse<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("InferResponse", 4)?;
        st.serialize_field("model_name", self.model_name)?;
        if let Some(v) = self.model_version {
            st.serialize_field("model_version", v)?;
        }
        if let Some(id) = self.id {
            st.serialize_field("id", id)?;
        }
        st.serialize_field("outputs", &self.outputs)?;
        st.end()
    }
}

struct BinaryParams(usize);

impl Serialize for BinaryParams {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Parameters", 1)?;
        st.serialize_field("binary_data_size", &self.0)?;
        st.end()
    }
}

impl Serialize for ResponseOutput<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("ResponseOutput", 5)?;
        st.serialize_field("name", self.name)?;
        st.serialize_field("datatype", &self.tensor.datatype())?;
        st.serialize_field("shape", self.tensor.shape())?;
        match self.binary_data_size {
            Some(n) => st.serialize_field("parameters", &BinaryParams(n))?,
            None => st.serialize_field("data", &JsonData(self.tensor))?,
        }
        st.end()
    }
}

/// A tensor's elements as a flat JSON array.
pub struct JsonData<'a>(pub &'a Tensor);

fn seq<S: Serializer, T, U: Serialize>(s: S, values: &[T], map: impl Fn(&T) -> U) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(values.len()))?;
    for v in values {
        seq.serialize_element(&map(v))?;
    }
    seq.end()
}

fn typed<S: Serializer, T: Element + Serialize>(s: S, bytes: &[u8]) -> Result<S::Ok, S::Error> {
    match cast_slice::<T>(bytes) {
        Some(values) => values.serialize(s),
        None => bytemuck::pod_collect_to_vec::<u8, T>(bytes).serialize(s),
    }
}

fn halfs<S: Serializer, T: Element>(s: S, bytes: &[u8], to_f32: fn(T) -> f32) -> Result<S::Ok, S::Error> {
    let values: Vec<T> = bytemuck::pod_collect_to_vec(bytes);
    seq(s, &values, |&v| to_f32(v))
}

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes = match self.0.data() {
            TensorData::Raw(b) => &b[..],
            // JSON strings must be text; bytes that are not UTF-8 need the binary extension.
            TensorData::Strings(strings) => {
                return seq(s, strings, |b| String::from_utf8_lossy(b).into_owned());
            }
        };
        match self.0.datatype() {
            DataType::Bool => seq(s, bytes, |&b| b != 0),
            DataType::Uint8 => seq(s, bytes, |&b| b),
            DataType::Uint16 => typed::<S, u16>(s, bytes),
            DataType::Uint32 => typed::<S, u32>(s, bytes),
            DataType::Uint64 => typed::<S, u64>(s, bytes),
            DataType::Int8 => typed::<S, i8>(s, bytes),
            DataType::Int16 => typed::<S, i16>(s, bytes),
            DataType::Int32 => typed::<S, i32>(s, bytes),
            DataType::Int64 => typed::<S, i64>(s, bytes),
            DataType::Fp16 => halfs::<S, f16>(s, bytes, f16::to_f32),
            DataType::Bf16 => halfs::<S, bf16>(s, bytes, bf16::to_f32),
            DataType::Fp32 => typed::<S, f32>(s, bytes),
            DataType::Fp64 => typed::<S, f64>(s, bytes),
            DataType::Bytes => seq(s, bytes, |&b| b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn outputs_serialize_typed() {
        let probs = Tensor::from_vec(vec![1, 2], vec![0.25f32, 0.75]).unwrap();
        let label = Tensor::from_strings(vec![1], vec![Bytes::from("cat")]).unwrap();
        let flags = Tensor::from_bools(vec![2], &[true, false]).unwrap();
        let half = Tensor::from_vec(vec![1], vec![f16::from_f32(0.5)]).unwrap();
        let r = InferResponse {
            model_name: "m",
            model_version: Some("1"),
            id: Some("abc"),
            outputs: vec![
                ResponseOutput { name: "p", tensor: &probs, binary_data_size: None },
                ResponseOutput { name: "l", tensor: &label, binary_data_size: None },
                ResponseOutput { name: "f", tensor: &flags, binary_data_size: None },
                ResponseOutput { name: "h", tensor: &half, binary_data_size: None },
                ResponseOutput { name: "b", tensor: &probs, binary_data_size: Some(8) },
            ],
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"model_name":"m","model_version":"1","id":"abc","outputs":[{"name":"p","datatype":"FP32","shape":[1,2],"data":[0.25,0.75]},{"name":"l","datatype":"BYTES","shape":[1],"data":["cat"]},{"name":"f","datatype":"BOOL","shape":[2],"data":[true,false]},{"name":"h","datatype":"FP16","shape":[1],"data":[0.5]},{"name":"b","datatype":"FP32","shape":[1,2],"parameters":{"binary_data_size":8}}]}"#
        );
    }
}
