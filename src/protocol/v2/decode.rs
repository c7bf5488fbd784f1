//! Decoding of V2 inference request headers into typed tensors.
//!
//! `data` arrays are never materialised as `serde_json::Value`. When `datatype` and `shape` come
//! before `data` (the usual order), a visitor flattens nested arrays directly into a `Vec` of the
//! tensor's element type in the same pass, checking each element's JSON type and range
//! ([`super::data::DataSeed`]). Otherwise — and for FP64, which needs correctly rounded parsing —
//! `data` is kept as a borrowed raw slice of the body and scanned once the datatype is known.

use std::fmt;

use kiln_runtime_core::{DataType, Tensor, element_count};

use super::data::{self, decode_data};
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

/// Decodes a JSON request header (the whole body of a JSON-only request).
pub fn decode_request(json: &[u8]) -> Result<InferRequest, serde_json::Error> {
    match parse(json) {
        // Bare NaN / Infinity (Python's json, Triton's clients): quote them and read again.
        Err(e) if e.is_syntax() => match data::quote_non_finite(json) {
            Some(quoted) => parse(&quoted),
            None => Err(e),
        },
        other => other,
    }
}

fn parse(json: &[u8]) -> Result<InferRequest, serde_json::Error> {
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
            seq.next_element_seed(InputSeed { index: out.len(), body_len: self.body_len })?
        {
            out.push(input);
        }
        Ok(out)
    }
}

struct InputSeed {
    index: usize,
    body_len: usize,
}

impl<'de> DeserializeSeed<'de> for InputSeed {
    type Value = RequestInput;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

/// Shape as written: checked for negative values and overflow before anything is allocated.
fn parse_shape(dims: &[i64]) -> Result<Vec<usize>, String> {
    let shape = dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("shape {dims:?} has a negative dimension")))
        .collect::<Result<Vec<_>, _>>()?;
    element_count(&shape).map_err(|e| e.to_string())?;
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
        let mut raw: Option<&'de RawValue> = None;
        let mut tensor: Option<Tensor> = None;
        let mut seen: Vec<std::borrow::Cow<'de, str>> = Vec::with_capacity(4);
        let index = self.index;
        let label = |name: &Option<String>| name.clone().unwrap_or_else(|| format!("#{index}"));
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            // A repeated key could re-declare the datatype of data already decoded.
            if seen.contains(&key) {
                return Err(de::Error::custom(format!(
                    "input \"{}\": duplicate field \"{key}\"",
                    label(&name)
                )));
            }
            seen.push(key.clone());
            match key.as_ref() {
                "name" => name = Some(map.next_value()?),
                "shape" => {
                    let dims: Vec<i64> = map.next_value()?;
                    shape = Some(
                        parse_shape(&dims)
                            .map_err(|e| de::Error::custom(format!("input \"{}\": {e}", label(&name))))?,
                    );
                }
                "datatype" => {
                    let s: std::borrow::Cow<'de, str> = map.next_value()?;
                    datatype = Some(
                        s.parse::<DataType>()
                            .map_err(|e| de::Error::custom(format!("input \"{}\": {e}", label(&name))))?,
                    );
                }
                "parameters" => parameters = map.next_value()?,
                // Borrowed: a RawValue is a validated slice of the body; nothing is copied here.
                // It is decoded below, once datatype and shape are known whatever the key order.
                // With datatype and shape already read (the usual order) the numbers are
                // decoded in this same pass, straight into the tensor's buffer.
                "data" => match (datatype, &shape, &name) {
                    (Some(dt), Some(sh), Some(n)) if data::single_pass(dt) => {
                        tensor = Some(map.next_value_seed(data::DataSeed {
                            datatype: dt,
                            shape: sh,
                            name: n,
                            body_len: self.body_len,
                        })?);
                    }
                    _ => raw = Some(map.next_value()?),
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
        let tensor = match (tensor, raw) {
            (Some(t), _) => Some(t),
            (None, Some(raw)) => {
                Some(decode_data(raw.get(), datatype, shape.clone(), &name).map_err(de::Error::custom)?)
            }
            (None, None) => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn as_f64(t: &Tensor) -> Vec<f64> {
        match t.datatype() {
            DataType::Fp16 => {
                t.to_vec::<kiln_runtime_core::f16>().unwrap().into_iter().map(f64::from).collect()
            }
            DataType::Bf16 => {
                t.to_vec::<kiln_runtime_core::bf16>().unwrap().into_iter().map(f64::from).collect()
            }
            DataType::Fp32 => t.to_vec::<f32>().unwrap().into_iter().map(f64::from).collect(),
            _ => t.to_vec::<f64>().unwrap(),
        }
    }

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

    /// Both decoding paths (data after datatype: one pass; data first: raw slice, then a scan)
    /// must give the same tensors and the same errors.
    #[test]
    fn one_pass_and_two_pass_decoding_agree() {
        let cases = [
            ("BOOL", "[true,false,true]", 3),
            ("UINT8", "[[0,255],[7,8]]", 4),
            ("INT8", "[-128,127]", 2),
            ("UINT64", "[0,18446744073709551615]", 2),
            ("INT64", "[-9223372036854775808,9223372036854775807]", 2),
            ("FP16", "[0.5,-2,65504]", 3),
            ("BF16", "[0.5,-2,3e38]", 3),
            ("FP32", "[[0.1,-2.5e-3],[3.4028235e38,1e-45]]", 4),
            ("FP32", "[16777217,-7,0]", 3),
            ("FP64", "[0.1,2.2250738585072014e-308]", 2),
            ("BYTES", r#"["a\"b","\u00e9"]"#, 2),
            // Errors: wrong element type, out of range, too many, too few, not an array.
            ("UINT8", "[1,256]", 2),
            ("INT32", "[1,1.5]", 2),
            ("FP32", r#"[1,"a"]"#, 2),
            ("FP32", "[1,null]", 2),
            ("FP32", r#"[1,{"a":1}]"#, 2),
            ("BOOL", "[true,1]", 2),
            ("FP32", "[1,2,3]", 2),
            ("FP32", "[1]", 2),
            ("FP32", "5", 1),
            ("BYTES", r#"["a",3]"#, 2),
        ];
        for (dt, data, n) in cases {
            let last =
                format!(r#"{{"inputs":[{{"name":"x","shape":[{n}],"datatype":"{dt}","data":{data}}}]}}"#);
            let first =
                format!(r#"{{"inputs":[{{"data":{data},"name":"x","shape":[{n}],"datatype":"{dt}"}}]}}"#);
            match (decode(&last), decode(&first)) {
                (Ok(a), Ok(b)) => assert_eq!(a.inputs[0].tensor, b.inputs[0].tensor, "{dt} {data}"),
                (Err(a), Err(b)) => {
                    // Same message; only serde_json's position suffix differs.
                    let strip = |e: &str| e.split(" at line ").next().unwrap_or_default().to_string();
                    assert_eq!(strip(&a), strip(&b), "{dt} {data}");
                }
                (a, b) => panic!("{dt} {data}: one pass {a:?}, two passes {b:?}"),
            }
        }
    }

    #[test]
    fn one_pass_fp32_rounds_like_a_correct_parser() {
        // Seeded decimal strings of every magnitude, printed the way clients print them.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut texts = Vec::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bits = (x as u32) & 0x7f7f_ffff; // finite f32s, either sign
            let v = f32::from_bits(bits | ((x >> 40) as u32 & 0x8000_0000));
            texts.push(match x % 3 {
                0 => format!("{v}"),
                1 => format!("{v:e}"),
                _ => format!("{}", v as f64 * 1.000_000_1),
            });
        }
        let body = format!(
            r#"{{"inputs":[{{"name":"x","shape":[{}],"datatype":"FP32","data":[{}]}}]}}"#,
            texts.len(),
            texts.join(",")
        );
        let got = decode(&body).unwrap().inputs.remove(0).tensor.unwrap().to_vec::<f32>().unwrap();
        for (t, g) in texts.iter().zip(got) {
            assert_eq!(g.to_bits(), t.parse::<f32>().unwrap().to_bits(), "{t}");
        }
    }

    #[test]
    fn non_finite_floats_as_python_and_triton_write_them() {
        for order in ["datatype_first", "data_first"] {
            for dt in ["FP16", "BF16", "FP32", "FP64"] {
                let data = "[NaN, Infinity,-Infinity, 1.5]";
                let body = if order == "data_first" {
                    format!(
                        r#"{{"id":"NaN Infinity","inputs":[{{"data":{data},"name":"x","shape":[4],"datatype":"{dt}"}}]}}"#
                    )
                } else {
                    format!(
                        r#"{{"id":"NaN Infinity","inputs":[{{"name":"x","shape":[4],"datatype":"{dt}","data":{data}}}]}}"#
                    )
                };
                let r = decode(&body).unwrap_or_else(|e| panic!("{dt} {order}: {e}"));
                assert_eq!(r.id.as_deref(), Some("NaN Infinity"), "strings are left alone");
                let v = as_f64(r.inputs[0].tensor.as_ref().unwrap());
                assert!(
                    v[0].is_nan() && v[1] == f64::INFINITY && v[2] == f64::NEG_INFINITY && v[3] == 1.5,
                    "{dt} {order}: {v:?}"
                );
            }
            // Not a float type: refused, by name.
            let e = decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT32","data":[NaN]}]}"#)
                .unwrap_err();
            assert!(
                e.contains("data element 0 is the string \"NaN\", which is not a valid INT32 value"),
                "{e}"
            );
        }
        // Invalid JSON otherwise stays invalid.
        assert!(decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[Nan]}]}"#).is_err());
    }

    #[test]
    fn repeated_fields_are_refused() {
        let e =
            decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],"datatype":"INT8"}]}"#)
                .unwrap_err();
        assert!(e.contains("duplicate field \"datatype\""), "{e}");
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
