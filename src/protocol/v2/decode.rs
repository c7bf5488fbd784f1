//! Decoding of V2 inference request bodies, straight into typed tensor buffers.
//!
//! `data` arrays are never materialised as `serde_json::Value`: a visitor flattens nested arrays
//! directly into a `Vec` of the tensor's element type, checking each element's JSON type and
//! range. When `datatype` comes after `data` in the object, `data` is kept as a borrowed raw slice
//! of the body and decoded once the datatype is known.

use std::fmt;

use bytes::Bytes;
use kiln_runtime_core::{DataType, Tensor, bf16, element_count, f16};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Parameters are small, free-form and rare; a generic map is fine for them.
pub type Parameters = serde_json::Map<String, serde_json::Value>;

/// One input of a request, before binary data (if any) is attached.
#[derive(Debug)]
pub struct RequestInput {
    /// Input name.
    pub name: String,
    /// Concrete shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub datatype: DataType,
    /// `parameters` of the input (`binary_data_size` among them).
    pub parameters: Option<Parameters>,
    /// The tensor, when the data came as JSON.
    pub tensor: Option<Tensor>,
}

impl RequestInput {
    /// `parameters.binary_data_size`, when the data follows the JSON header as raw bytes.
    pub fn binary_data_size(&self) -> Result<Option<usize>, String> {
        binary_size(&self.name, self.parameters.as_ref())
    }
}

pub(crate) fn binary_size(name: &str, parameters: Option<&Parameters>) -> Result<Option<usize>, String> {
    match parameters.and_then(|p| p.get("binary_data_size")) {
        None => Ok(None),
        Some(v) => v.as_u64().and_then(|n| usize::try_from(n).ok()).map(Some).ok_or_else(|| {
            format!("input \"{name}\": binary_data_size must be a non-negative integer, got {v}")
        }),
    }
}

/// One requested output.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestOutput {
    /// Output name.
    pub name: String,
    /// `binary_data` and friends.
    #[serde(default)]
    pub parameters: Option<Parameters>,
}

impl RequestOutput {
    /// `parameters.binary_data`: return this output as raw bytes after the JSON header.
    pub fn binary_data(&self) -> Option<bool> {
        self.parameters.as_ref().and_then(|p| p.get("binary_data")).and_then(serde_json::Value::as_bool)
    }
}

/// A decoded V2 inference request header (the whole body for JSON-only requests).
#[derive(Debug, Default)]
pub struct InferRequest {
    /// Request id, echoed in the response.
    pub id: Option<String>,
    /// Request-level parameters (`binary_data_output`, ...).
    pub parameters: Option<Parameters>,
    /// Inputs in request order.
    pub inputs: Vec<RequestInput>,
    /// Requested outputs; `None` means all.
    pub outputs: Option<Vec<RequestOutput>>,
}

impl InferRequest {
    /// `parameters.binary_data_output`: every output as raw bytes unless it says otherwise.
    pub fn binary_data_output(&self) -> bool {
        self.parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_output"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    }
}

/// Decodes a JSON request header. `body_len` bounds buffer pre-allocation, so a request that
/// claims an absurd shape cannot make the server allocate more than its body could fill.
pub fn decode_request(json: &[u8]) -> Result<InferRequest, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let req = RequestSeed { body_len: json.len() }.deserialize(&mut de)?;
    de.end()?;
    Ok(req)
}

struct RequestSeed {
    body_len: usize,
}

impl<'de> DeserializeSeed<'de> for RequestSeed {
    type Value = InferRequest;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<InferRequest, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed {
    type Value = InferRequest;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a V2 inference request object {\"inputs\": [...]}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InferRequest, A::Error> {
        let mut req = InferRequest::default();
        let mut saw_inputs = false;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "id" => req.id = map.next_value()?,
                "parameters" => req.parameters = map.next_value()?,
                "inputs" => {
                    req.inputs = map.next_value_seed(InputsSeed { body_len: self.body_len })?;
                    saw_inputs = true;
                }
                "outputs" => req.outputs = map.next_value()?,
                other => {
                    return Err(de::Error::custom(format!(
                        "unknown field \"{other}\" in the request; expected id, parameters, inputs, outputs"
                    )));
                }
            }
        }
        if !saw_inputs {
            return Err(de::Error::custom("the request has no \"inputs\""));
        }
        Ok(req)
    }
}

struct InputsSeed {
    body_len: usize,
}

impl<'de> DeserializeSeed<'de> for InputsSeed {
    type Value = Vec<RequestInput>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for InputsSeed {
    type Value = Vec<RequestInput>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of input tensors")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(input) =
            seq.next_element_seed(InputSeed { body_len: self.body_len, index: out.len() })?
        {
            out.push(input);
        }
        Ok(out)
    }
}

struct InputSeed {
    body_len: usize,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for InputSeed {
    type Value = RequestInput;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

/// Shape as written: checked for negative values and overflow before anything is allocated.
fn parse_shape(name: &str, dims: Vec<i64>) -> Result<Vec<usize>, String> {
    let shape = dims
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| format!("input \"{name}\": shape {dims:?} has a negative dimension"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    element_count(&shape).map_err(|e| format!("input \"{name}\": {e}"))?;
    Ok(shape)
}

impl<'de> Visitor<'de> for InputSeed {
    type Value = RequestInput;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an input tensor object {\"name\", \"shape\", \"datatype\", \"data\"}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestInput, A::Error> {
        let mut name: Option<String> = None;
        let mut shape: Option<Vec<usize>> = None;
        let mut datatype: Option<DataType> = None;
        let mut parameters = None;
        let mut tensor_data: Option<TypedBuf> = None;
        let mut raw: Option<&'de RawValue> = None;
        let label = |name: &Option<String>| name.clone().unwrap_or_else(|| format!("#{}", self.index));
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "name" => name = Some(map.next_value()?),
                "shape" => {
                    let dims: Vec<i64> = map.next_value()?;
                    shape = Some(parse_shape(&label(&name), dims).map_err(de::Error::custom)?);
                }
                "datatype" => {
                    let s: std::borrow::Cow<'de, str> = map.next_value()?;
                    datatype = Some(
                        s.parse::<DataType>()
                            .map_err(|e| de::Error::custom(format!("input \"{}\": {e}", label(&name))))?,
                    );
                }
                "parameters" => parameters = map.next_value()?,
                "data" => match datatype {
                    Some(dt) => {
                        let limit = data_limit(shape.as_deref());
                        tensor_data = Some(map.next_value_seed(DataSeed {
                            datatype: dt,
                            limit,
                            capacity: capacity(limit, self.body_len),
                            name: label(&name),
                        })?);
                    }
                    // Borrowed only: a RawValue is a slice of the body, so this copies nothing.
                    None => raw = Some(map.next_value()?),
                },
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    return Err(de::Error::custom(format!(
                        "input \"{}\": unknown field \"{}\"; expected name, shape, datatype, parameters, data",
                        label(&name),
                        key
                    )));
                }
            }
        }
        let name = name.ok_or_else(|| de::Error::custom(format!("input #{} has no \"name\"", self.index)))?;
        let shape = shape.ok_or_else(|| de::Error::custom(format!("input \"{name}\" has no \"shape\"")))?;
        let datatype =
            datatype.ok_or_else(|| de::Error::custom(format!("input \"{name}\" has no \"datatype\"")))?;
        if let Some(raw) = raw {
            let limit = data_limit(Some(&shape));
            let seed =
                DataSeed { datatype, limit, capacity: capacity(limit, self.body_len), name: name.clone() };
            let mut de = serde_json::Deserializer::from_str(raw.get());
            tensor_data = Some(seed.deserialize(&mut de).map_err(de::Error::custom)?);
        }
        let tensor = match tensor_data {
            Some(buf) => Some(
                buf.into_tensor(shape.clone())
                    .map_err(|e| de::Error::custom(format!("input \"{name}\": {e}")))?,
            ),
            None => None,
        };
        let input = RequestInput { name, shape, datatype, parameters, tensor };
        if input.tensor.is_none() {
            match input.binary_data_size().map_err(de::Error::custom)? {
                Some(_) => {}
                None => {
                    return Err(de::Error::custom(format!(
                        "input \"{}\" has neither \"data\" nor parameters.binary_data_size",
                        input.name
                    )));
                }
            }
        }
        Ok(input)
    }
}

/// Most elements a `data` array may hold: the shape's count when known.
fn data_limit(shape: Option<&[usize]>) -> usize {
    shape.and_then(|s| element_count(s).ok()).unwrap_or(usize::MAX)
}

/// Pre-allocation: never more than the body could hold (each JSON element takes ≥ 2 bytes).
fn capacity(limit: usize, body_len: usize) -> usize {
    limit.min(body_len / 2 + 1)
}

/// The decoded elements of one input, in the input's own element type.
enum TypedBuf {
    Bool(Vec<u8>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<Bytes>),
}

impl TypedBuf {
    fn len(&self) -> usize {
        match self {
            TypedBuf::Bool(v) | TypedBuf::U8(v) => v.len(),
            TypedBuf::U16(v) => v.len(),
            TypedBuf::U32(v) => v.len(),
            TypedBuf::U64(v) => v.len(),
            TypedBuf::I8(v) => v.len(),
            TypedBuf::I16(v) => v.len(),
            TypedBuf::I32(v) => v.len(),
            TypedBuf::I64(v) => v.len(),
            TypedBuf::F16(v) => v.len(),
            TypedBuf::Bf16(v) => v.len(),
            TypedBuf::F32(v) => v.len(),
            TypedBuf::F64(v) => v.len(),
            TypedBuf::Bytes(v) => v.len(),
        }
    }

    fn into_tensor(self, shape: Vec<usize>) -> Result<Tensor, kiln_runtime_core::Error> {
        let needed = element_count(&shape)?;
        if self.len() != needed {
            return Err(kiln_runtime_core::Error::invalid_input(format!(
                "data has {} elements, but shape {shape:?} needs {needed}",
                self.len()
            )));
        }
        match self {
            TypedBuf::Bool(v) => Tensor::from_raw(DataType::Bool, shape, Bytes::from(v)),
            TypedBuf::U8(v) => Tensor::from_vec(shape, v),
            TypedBuf::U16(v) => Tensor::from_vec(shape, v),
            TypedBuf::U32(v) => Tensor::from_vec(shape, v),
            TypedBuf::U64(v) => Tensor::from_vec(shape, v),
            TypedBuf::I8(v) => Tensor::from_vec(shape, v),
            TypedBuf::I16(v) => Tensor::from_vec(shape, v),
            TypedBuf::I32(v) => Tensor::from_vec(shape, v),
            TypedBuf::I64(v) => Tensor::from_vec(shape, v),
            TypedBuf::F16(v) => Tensor::from_vec(shape, v),
            TypedBuf::Bf16(v) => Tensor::from_vec(shape, v),
            TypedBuf::F32(v) => Tensor::from_vec(shape, v),
            TypedBuf::F64(v) => Tensor::from_vec(shape, v),
            TypedBuf::Bytes(v) => Tensor::from_strings(shape, v),
        }
    }
}

struct DataSeed {
    datatype: DataType,
    limit: usize,
    capacity: usize,
    name: String,
}

impl<'de> DeserializeSeed<'de> for DataSeed {
    type Value = TypedBuf;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<TypedBuf, D::Error> {
        fn run<'de, T: FromJson, D: Deserializer<'de>>(s: &DataSeed, d: D) -> Result<Vec<T>, D::Error> {
            let mut out = Vec::with_capacity(s.capacity);
            Flat { out: &mut out, limit: s.limit, name: &s.name }.deserialize(d)?;
            Ok(out)
        }
        Ok(match self.datatype {
            DataType::Bool => {
                TypedBuf::Bool(run::<JsonBool, D>(&self, d)?.into_iter().map(|b| b.0).collect())
            }
            DataType::Uint8 => TypedBuf::U8(run(&self, d)?),
            DataType::Uint16 => TypedBuf::U16(run(&self, d)?),
            DataType::Uint32 => TypedBuf::U32(run(&self, d)?),
            DataType::Uint64 => TypedBuf::U64(run(&self, d)?),
            DataType::Int8 => TypedBuf::I8(run(&self, d)?),
            DataType::Int16 => TypedBuf::I16(run(&self, d)?),
            DataType::Int32 => TypedBuf::I32(run(&self, d)?),
            DataType::Int64 => TypedBuf::I64(run(&self, d)?),
            DataType::Fp16 => TypedBuf::F16(run(&self, d)?),
            DataType::Bf16 => TypedBuf::Bf16(run(&self, d)?),
            DataType::Fp32 => TypedBuf::F32(run(&self, d)?),
            DataType::Fp64 => TypedBuf::F64(run(&self, d)?),
            DataType::Bytes => TypedBuf::Bytes(run(&self, d)?),
        })
    }
}

/// An element type that can be read from one JSON scalar.
trait FromJson: Sized {
    const NAME: &'static str;
    fn from_i64(v: i64) -> Option<Self>;
    fn from_u64(v: u64) -> Option<Self>;
    fn from_f64(_v: f64) -> Option<Self> {
        None
    }
    fn from_bool(_v: bool) -> Option<Self> {
        None
    }
    fn from_str(_v: &str) -> Option<Self> {
        None
    }
}

macro_rules! int_from_json {
    ($($t:ty => $name:literal),*) => {$(
        impl FromJson for $t {
            const NAME: &'static str = $name;
            fn from_i64(v: i64) -> Option<Self> { <$t>::try_from(v).ok() }
            fn from_u64(v: u64) -> Option<Self> { <$t>::try_from(v).ok() }
        }
    )*};
}
int_from_json!(u8 => "UINT8", u16 => "UINT16", u32 => "UINT32", u64 => "UINT64",
    i8 => "INT8", i16 => "INT16", i32 => "INT32", i64 => "INT64");

macro_rules! float_from_json {
    ($($t:ty => $name:literal, $conv:expr),*) => {$(
        impl FromJson for $t {
            const NAME: &'static str = $name;
            fn from_i64(v: i64) -> Option<Self> { Some($conv(v as f64)) }
            fn from_u64(v: u64) -> Option<Self> { Some($conv(v as f64)) }
            fn from_f64(v: f64) -> Option<Self> { Some($conv(v)) }
        }
    )*};
}
float_from_json!(
    f32 => "FP32", |v: f64| v as f32,
    f64 => "FP64", |v: f64| v,
    f16 => "FP16", f16::from_f64,
    bf16 => "BF16", bf16::from_f64
);

struct JsonBool(u8);

impl FromJson for JsonBool {
    const NAME: &'static str = "BOOL";
    fn from_i64(_: i64) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_bool(v: bool) -> Option<Self> {
        Some(JsonBool(u8::from(v)))
    }
}

impl FromJson for Bytes {
    const NAME: &'static str = "BYTES";
    fn from_i64(_: i64) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_str(v: &str) -> Option<Self> {
        Some(Bytes::copy_from_slice(v.as_bytes()))
    }
}

/// Flattens a (possibly nested) JSON array of scalars into `out`.
struct Flat<'a, T> {
    out: &'a mut Vec<T>,
    limit: usize,
    name: &'a str,
}

impl<'de, T: FromJson> DeserializeSeed<'de> for Flat<'_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<T: FromJson> Flat<'_, T> {
    fn push<E: de::Error>(&mut self, v: Option<T>, found: impl fmt::Display) -> Result<(), E> {
        let index = self.out.len();
        match v {
            Some(v) if index < self.limit => {
                self.out.push(v);
                Ok(())
            }
            Some(_) => Err(E::custom(format!(
                "input \"{}\": data has more elements than its shape allows ({})",
                self.name, self.limit
            ))),
            None => Err(E::custom(format!(
                "input \"{}\": data element {index} is {found}, which is not a valid {} value",
                self.name,
                T::NAME
            ))),
        }
    }
}

impl<'de, T: FromJson> Visitor<'de> for Flat<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of {} values", T::NAME)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Flat { out: &mut *self.out, limit: self.limit, name: self.name })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<(), E> {
        self.push(T::from_bool(v), v)
    }
    fn visit_i64<E: de::Error>(mut self, v: i64) -> Result<(), E> {
        self.push(T::from_i64(v), v)
    }
    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<(), E> {
        self.push(T::from_u64(v), v)
    }
    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<(), E> {
        self.push(T::from_f64(v), v)
    }
    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<(), E> {
        self.push(T::from_str(v), format_args!("the string {v:?}"))
    }
    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.push(None, "null")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, _map: A) -> Result<(), A::Error> {
        self.push(None, "an object")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Result<InferRequest, String> {
        decode_request(s.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn flat_and_nested_data_decode_the_same() {
        let flat = decode(r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2.5,3,4]}]}"#)
            .unwrap();
        let nested =
            decode(r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[3,4]]}]}"#)
                .unwrap();
        let a = flat.inputs[0].tensor.as_ref().unwrap();
        let b = nested.inputs[0].tensor.as_ref().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_vec::<f32>().unwrap(), vec![1.0, 2.5, 3.0, 4.0]);
    }

    #[test]
    fn data_before_datatype_is_decoded_too() {
        let r = decode(r#"{"id":"7","inputs":[{"data":[1,-2],"name":"x","shape":[2],"datatype":"INT64"}]}"#)
            .unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(r.inputs[0].tensor.as_ref().unwrap().to_vec::<i64>().unwrap(), vec![1, -2]);
    }

    #[test]
    fn every_datatype_decodes() {
        for (dt, data) in [
            ("BOOL", "[true,false]"),
            ("UINT8", "[0,255]"),
            ("UINT16", "[0,65535]"),
            ("UINT32", "[0,4294967295]"),
            ("UINT64", "[0,18446744073709551615]"),
            ("INT8", "[-128,127]"),
            ("INT16", "[-32768,32767]"),
            ("INT32", "[-2147483648,2147483647]"),
            ("INT64", "[-9223372036854775808,9223372036854775807]"),
            ("FP16", "[0.5,-2]"),
            ("BF16", "[0.5,-2]"),
            ("FP32", "[0.5,-2]"),
            ("FP64", "[0.5,-2]"),
            ("BYTES", r#"["a","é"]"#),
        ] {
            let body =
                format!(r#"{{"inputs":[{{"name":"x","shape":[2],"datatype":"{dt}","data":{data}}}]}}"#);
            let r = decode(&body).unwrap_or_else(|e| panic!("{dt}: {e}"));
            assert_eq!(r.inputs[0].tensor.as_ref().unwrap().datatype().as_str(), dt);
        }
    }

    #[test]
    fn bad_values_are_named_precisely() {
        let e =
            decode(r#"{"inputs":[{"name":"x","shape":[2],"datatype":"UINT8","data":[1,256]}]}"#).unwrap_err();
        assert!(e.contains("data element 1 is 256, which is not a valid UINT8 value"), "{e}");
        let e =
            decode(r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,"a"]}]}"#).unwrap_err();
        assert!(e.contains("data element 1 is the string \"a\""), "{e}");
        let e =
            decode(r#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT32","data":[1,1.5]}]}"#).unwrap_err();
        assert!(e.contains("1.5, which is not a valid INT32"), "{e}");
        let e =
            decode(r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP33","data":[1,1]}]}"#).unwrap_err();
        assert!(e.contains("unknown datatype \"FP33\""), "{e}");
        let e =
            decode(r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,1]}]}"#).unwrap_err();
        assert!(e.contains("data has 2 elements, but shape [3] needs 3"), "{e}");
        let e =
            decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1,1]}]}"#).unwrap_err();
        assert!(e.contains("more elements than its shape allows"), "{e}");
        let e = decode(r#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}]}"#).unwrap_err();
        assert!(e.contains("negative dimension"), "{e}");
        let e = decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#).unwrap_err();
        assert!(e.contains("neither \"data\" nor parameters.binary_data_size"), "{e}");
        let e = decode(r#"{"input":[]}"#).unwrap_err();
        assert!(e.contains("unknown field \"input\""), "{e}");
        assert!(decode(r#"{"inputs":[]} trailing"#).is_err());
    }

    #[test]
    fn absurd_shape_does_not_allocate() {
        let e = decode(
            r#"{"inputs":[{"name":"x","shape":[4294967296,4294967296,4294967296],"datatype":"FP32","data":[1]}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("more elements than this machine can address"), "{e}");
        // Large but addressable: capacity is bounded by the body, then the count check fails.
        let e = decode(r#"{"inputs":[{"name":"x","shape":[1000000000000],"datatype":"FP32","data":[1]}]}"#)
            .unwrap_err();
        assert!(e.contains("needs"), "{e}");
    }

    #[test]
    fn binary_inputs_carry_their_size() {
        let r = decode(
            r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}],
                "outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#,
        )
        .unwrap();
        assert_eq!(r.inputs[0].binary_data_size().unwrap(), Some(8));
        assert_eq!(r.outputs.as_ref().unwrap()[0].binary_data(), Some(true));
    }
}
