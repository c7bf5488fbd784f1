//! The binary tensor data extension: tensors as raw bytes after the JSON header.
//!
//! `Inference-Header-Content-Length` gives the JSON header's size; the raw data of each input
//! with `parameters.binary_data_size` follows in input order. Fixed-size inputs are sliced out of
//! the body without copying. BYTES elements are each a 4-byte little-endian length and the bytes.

use bytes::{BufMut, Bytes, BytesMut};
use kiln_runtime_core::{DataType, Tensor, TensorData};

use super::error::ApiError;
use crate::protocol::v2::InferRequest;

/// The header naming the JSON part's length.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Splits a body into JSON header and binary rest.
pub fn split_body(body: Bytes, header_len: Option<usize>) -> Result<(Bytes, Bytes), ApiError> {
    match header_len {
        None => Ok((body, Bytes::new())),
        Some(n) if n > body.len() => Err(ApiError::BadRequest(format!(
            "Inference-Header-Content-Length is {n} but the body has only {} bytes",
            body.len()
        ))),
        Some(n) => {
            let rest = body.slice(n..);
            Ok((body.slice(..n), rest))
        }
    }
}

/// Builds a tensor from binary data: raw elements, or length-prefixed BYTES elements.
pub fn tensor_from_binary(
    name: &str,
    datatype: DataType,
    shape: Vec<usize>,
    raw: Bytes,
) -> Result<Tensor, ApiError> {
    let bad = |e: String| ApiError::BadRequest(format!("input \"{name}\": {e}"));
    if datatype != DataType::Bytes {
        return Tensor::from_raw(datatype, shape, raw).map_err(|e| bad(e.to_string()));
    }
    let mut strings = Vec::new();
    let mut at = 0usize;
    while at < raw.len() {
        let len_bytes: [u8; 4] = raw
            .get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| bad(format!("BYTES element {} has a truncated length prefix", strings.len())))?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        let start = at + 4;
        let end = start.checked_add(len).filter(|&e| e <= raw.len()).ok_or_else(|| {
            bad(format!("BYTES element {} claims {len} bytes past the end of its data", strings.len()))
        })?;
        strings.push(raw.slice(start..end));
        at = end;
    }
    Tensor::from_strings(shape, strings).map_err(|e| bad(e.to_string()))
}

/// Attaches the binary data after the JSON header to the inputs that declared it.
pub fn attach(request: &mut InferRequest, rest: Bytes) -> Result<(), ApiError> {
    let mut at = 0usize;
    for input in &mut request.inputs {
        let size = input.binary_data_size().map_err(ApiError::BadRequest)?;
        match (size, input.tensor.is_some()) {
            (Some(_), true) => {
                return Err(ApiError::BadRequest(format!(
                    "input \"{}\" has both \"data\" and binary_data_size",
                    input.name
                )));
            }
            (None, _) => continue,
            (Some(size), false) => {
                let end = at.checked_add(size).filter(|&e| e <= rest.len()).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "binary data of input \"{}\" ({size} bytes at offset {at}) runs past the end of the body ({} binary bytes)",
                        input.name,
                        rest.len()
                    ))
                })?;
                input.tensor = Some(tensor_from_binary(
                    &input.name,
                    input.datatype,
                    input.shape.clone(),
                    rest.slice(at..end),
                )?);
                at = end;
            }
        }
    }
    if at != rest.len() {
        return Err(ApiError::BadRequest(format!(
            "{} bytes after the JSON header are not claimed by any input's binary_data_size",
            rest.len() - at
        )));
    }
    Ok(())
}

/// The binary form of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> Bytes {
    match t.data() {
        TensorData::Raw(b) => b.clone(),
        TensorData::Strings(s) => {
            let mut out = BytesMut::with_capacity(s.iter().map(|x| x.len() + 4).sum());
            for x in s {
                out.put_u32_le(x.len() as u32);
                out.put_slice(x);
            }
            out.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_elements_round_trip() {
        let t =
            Tensor::from_strings(vec![2], vec![Bytes::from("ab"), Bytes::from_static(&[0xff, 0])]).unwrap();
        let raw = tensor_bytes(&t);
        assert_eq!(&raw[..], &[2, 0, 0, 0, b'a', b'b', 2, 0, 0, 0, 0xff, 0]);
        assert_eq!(tensor_from_binary("x", DataType::Bytes, vec![2], raw).unwrap(), t);
    }

    #[test]
    fn lying_lengths_are_rejected() {
        let e = tensor_from_binary("x", DataType::Bytes, vec![1], Bytes::from_static(&[9, 0, 0, 0, 1]))
            .unwrap_err();
        assert!(e.message().contains("past the end"), "{e:?}");
        let e = tensor_from_binary("x", DataType::Bytes, vec![1], Bytes::from_static(&[9, 0])).unwrap_err();
        assert!(e.message().contains("truncated length prefix"), "{e:?}");
        assert!(split_body(Bytes::from_static(b"{}"), Some(3)).is_err());
    }
}
