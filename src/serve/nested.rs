//! Nested JSON arrays <-> tensors, for the V1 and Azure `/score` protocols, which carry no
//! datatype or shape: the model's input spec gives the datatype and the nesting gives the shape.

use kiln_runtime_core::{Bytes, DataType, Element, Tensor, TensorData, TensorSpec, bf16, cast_slice, f16};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::Value;

use super::error::ApiError;

/// Shape of a rectangular nested array (scalars have shape `[]`).
fn infer_shape(v: &Value) -> Vec<usize> {
    let mut shape = Vec::new();
    let mut cur = v;
    while let Value::Array(items) = cur {
        shape.push(items.len());
        match items.first() {
            Some(first) => cur = first,
            None => break,
        }
    }
    shape
}

fn flatten<'a>(v: &'a Value, shape: &[usize], out: &mut Vec<&'a Value>, name: &str) -> Result<(), ApiError> {
    match (v, shape.split_first()) {
        (Value::Array(items), Some((&n, rest))) if items.len() == n => {
            for item in items {
                flatten(item, rest, out, name)?;
            }
            Ok(())
        }
        (Value::Array(_), _) | (_, Some(_)) => Err(ApiError::BadRequest(format!(
            "input \"{name}\": nested arrays are ragged; every row must have the same length (shape {shape:?})"
        ))),
        (scalar, None) => {
            out.push(scalar);
            Ok(())
        }
    }
}

fn scalars<T>(
    values: &[&Value],
    name: &str,
    datatype: DataType,
    conv: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>, ApiError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            conv(v).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "input \"{name}\": element {i} is {v}, which is not a valid {datatype} value"
                ))
            })
        })
        .collect()
}

fn int<T: TryFrom<i64> + TryFrom<u64>>(v: &Value) -> Option<T> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .and_then(|x| T::try_from(x).ok())
            .or_else(|| n.as_u64().and_then(|x| T::try_from(x).ok())),
        _ => None,
    }
}

/// Builds the tensor for `spec` from a nested JSON array (or a scalar for rank-0 inputs).
pub fn tensor_from_json(v: &Value, spec: &TensorSpec) -> Result<Tensor, ApiError> {
    let name = spec.name.as_str();
    let shape = infer_shape(v);
    let mut flat = Vec::new();
    flatten(v, &shape, &mut flat, name)?;
    let dt = spec.datatype;
    let bad = |e: kiln_runtime_core::Error| ApiError::BadRequest(format!("input \"{name}\": {e}"));
    let float = |v: &Value| v.as_f64();
    let t = match dt {
        DataType::Bool => {
            Tensor::from_bools(shape, &scalars(&flat, name, dt, Value::as_bool)?).map_err(bad)?
        }
        DataType::Uint8 => Tensor::from_vec(shape, scalars(&flat, name, dt, int::<u8>)?).map_err(bad)?,
        DataType::Uint16 => Tensor::from_vec(shape, scalars(&flat, name, dt, int::<u16>)?).map_err(bad)?,
        DataType::Uint32 => Tensor::from_vec(shape, scalars(&flat, name, dt, int::<u32>)?).map_err(bad)?,
        DataType::Uint64 => Tensor::from_vec(shape, scalars(&flat, name, dt, int::<u64>)?).map_err(bad)?,
        DataType::Int8 => Tensor::from_vec(shape, scalars(&flat, name, dt, int::<i8>)?).map_err(bad)?,
        DataType::Int16 => Tensor::from_vec(shape, scalars(&flat, name, dt, int::<i16>)?).map_err(bad)?,
        DataType::Int32 => Tensor::from_vec(shape, scalars(&flat, name, dt, int::<i32>)?).map_err(bad)?,
        DataType::Int64 => Tensor::from_vec(shape, scalars(&flat, name, dt, int::<i64>)?).map_err(bad)?,
        DataType::Fp16 => Tensor::from_vec(shape, scalars(&flat, name, dt, |v| float(v).map(f16::from_f64))?)
            .map_err(bad)?,
        DataType::Bf16 => {
            Tensor::from_vec(shape, scalars(&flat, name, dt, |v| float(v).map(bf16::from_f64))?)
                .map_err(bad)?
        }
        DataType::Fp32 => {
            Tensor::from_vec(shape, scalars(&flat, name, dt, |v| float(v).map(|x| x as f32))?).map_err(bad)?
        }
        DataType::Fp64 => Tensor::from_vec(shape, scalars(&flat, name, dt, float)?).map_err(bad)?,
        DataType::Bytes => Tensor::from_strings(
            shape,
            scalars(&flat, name, dt, |v| v.as_str().map(|s| Bytes::copy_from_slice(s.as_bytes())))?,
        )
        .map_err(bad)?,
    };
    Ok(t)
}

/// A tensor serialised as nested arrays following its shape.
pub struct NestedJson<'a>(pub &'a Tensor);

struct Nest<'a, T> {
    data: &'a [T],
    shape: &'a [usize],
}

impl<T: Serialize> Serialize for Nest<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Some((&n, rest)) = self.shape.split_first() else {
            return match self.data.first() {
                Some(v) => v.serialize(s),
                None => s.serialize_unit(),
            };
        };
        let stride: usize = rest.iter().product();
        let mut seq = s.serialize_seq(Some(n))?;
        for i in 0..n {
            let chunk = self.data.get(i * stride..(i + 1) * stride).unwrap_or(&[]);
            seq.serialize_element(&Nest { data: chunk, shape: rest })?;
        }
        seq.end()
    }
}

fn nest<S: Serializer, T: Serialize>(s: S, data: &[T], shape: &[usize]) -> Result<S::Ok, S::Error> {
    Nest { data, shape }.serialize(s)
}

fn typed<S: Serializer, T: Element + Serialize>(
    s: S,
    bytes: &[u8],
    shape: &[usize],
) -> Result<S::Ok, S::Error> {
    match cast_slice::<T>(bytes) {
        Some(v) => nest(s, v, shape),
        None => nest(s, &bytemuck::pod_collect_to_vec::<u8, T>(bytes), shape),
    }
}

impl Serialize for NestedJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let shape = self.0.shape();
        let bytes = match self.0.data() {
            TensorData::Raw(b) => &b[..],
            TensorData::Strings(strings) => {
                let text: Vec<String> =
                    strings.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
                return nest(s, &text, shape);
            }
        };
        match self.0.datatype() {
            DataType::Bool => nest(s, &bytes.iter().map(|&b| b != 0).collect::<Vec<_>>(), shape),
            DataType::Uint8 => nest(s, bytes, shape),
            DataType::Uint16 => typed::<S, u16>(s, bytes, shape),
            DataType::Uint32 => typed::<S, u32>(s, bytes, shape),
            DataType::Uint64 => typed::<S, u64>(s, bytes, shape),
            DataType::Int8 => typed::<S, i8>(s, bytes, shape),
            DataType::Int16 => typed::<S, i16>(s, bytes, shape),
            DataType::Int32 => typed::<S, i32>(s, bytes, shape),
            DataType::Int64 => typed::<S, i64>(s, bytes, shape),
            DataType::Fp16 => {
                let v: Vec<f32> =
                    bytemuck::pod_collect_to_vec::<u8, f16>(bytes).into_iter().map(f16::to_f32).collect();
                nest(s, &v, shape)
            }
            DataType::Bf16 => {
                let v: Vec<f32> =
                    bytemuck::pod_collect_to_vec::<u8, bf16>(bytes).into_iter().map(bf16::to_f32).collect();
                nest(s, &v, shape)
            }
            DataType::Fp32 => typed::<S, f32>(s, bytes, shape),
            DataType::Fp64 => typed::<S, f64>(s, bytes, shape),
            DataType::Bytes => nest(s, bytes, shape),
        }
    }
}

/// Named tensors as a JSON object `{name: nested array}`.
pub struct NamedJson<'a>(pub &'a [(&'a str, &'a Tensor)]);

impl Serialize for NamedJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, t) in self.0 {
            map.serialize_entry(name, &NestedJson(t))?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dt: DataType, shape: Vec<i64>) -> TensorSpec {
        TensorSpec { name: "x".into(), datatype: dt, shape }
    }

    #[test]
    fn nested_rows_become_tensors_and_back() {
        let v: Value = serde_json::from_str("[[1, 2.5], [3, 4]]").unwrap();
        let t = tensor_from_json(&v, &spec(DataType::Fp32, vec![-1, 2])).unwrap();
        assert_eq!(t.shape(), &[2, 2]);
        assert_eq!(serde_json::to_string(&NestedJson(&t)).unwrap(), "[[1.0,2.5],[3.0,4.0]]");
        let s: Value = serde_json::from_str(r#"["a", "b"]"#).unwrap();
        let t = tensor_from_json(&s, &spec(DataType::Bytes, vec![-1])).unwrap();
        assert_eq!(serde_json::to_string(&NestedJson(&t)).unwrap(), r#"["a","b"]"#);
    }

    #[test]
    fn ragged_and_mistyped_data_is_refused() {
        let v: Value = serde_json::from_str("[[1, 2], [3]]").unwrap();
        let e = tensor_from_json(&v, &spec(DataType::Fp32, vec![-1, 2])).unwrap_err();
        assert!(e.message().contains("ragged"), "{e:?}");
        let v: Value = serde_json::from_str("[[1, 2], [3, \"x\"]]").unwrap();
        let e = tensor_from_json(&v, &spec(DataType::Fp32, vec![-1, 2])).unwrap_err();
        assert!(e.message().contains("element 3 is \"x\""), "{e:?}");
        let v: Value = serde_json::from_str("[300]").unwrap();
        assert!(tensor_from_json(&v, &spec(DataType::Uint8, vec![-1])).is_err());
    }
}
