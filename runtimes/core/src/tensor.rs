//! Kiln's own tensor: a datatype, a shape and bytes, independent of any engine's tensor type.
//!
//! Fixed-size elements are kept packed little-endian in a [`Bytes`], so the HTTP layer can hand the
//! body of a binary-extension request to a backend without copying, and split batch outputs
//! without copying either.

use bytes::Bytes;

use crate::{DataType, Error};

#[cfg(target_endian = "big")]
compile_error!("kiln tensors store elements little-endian in host order; big-endian hosts are not supported");

/// A Rust type whose values are the elements of a fixed-size datatype.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// The protocol datatype of this element type.
    const DATATYPE: DataType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(impl Element for $t { const DATATYPE: DataType = DataType::$d; })*
    };
}
element!(
    u8 => Uint8, u16 => Uint16, u32 => Uint32, u64 => Uint64,
    i8 => Int8, i16 => Int16, i32 => Int32, i64 => Int64,
    half::f16 => Fp16, half::bf16 => Bf16, f32 => Fp32, f64 => Fp64,
);

/// The elements of a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// Fixed-size elements, packed little-endian without padding. BOOL is one byte, 0 or 1.
    Raw(Bytes),
    /// One byte string per element of a BYTES tensor.
    Strings(Vec<Bytes>),
}

/// A typed, shaped tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    datatype: DataType,
    shape: Vec<usize>,
    data: TensorData,
}

/// A tensor with the name of the model input or output it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Input or output name, as in the model.
    pub name: String,
    /// The value.
    pub tensor: Tensor,
}

impl NamedTensor {
    /// Pairs a name with a tensor.
    pub fn new(name: impl Into<String>, tensor: Tensor) -> Self {
        NamedTensor { name: name.into(), tensor }
    }
}

/// The number of elements of `shape`, or an error when the product overflows `usize`.
pub fn element_count(shape: &[usize]) -> Result<usize, Error> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| {
        Error::invalid_input(format!("shape {shape:?} has more elements than this machine can address"))
    })
}

/// Views packed little-endian bytes as elements, when they are suitably aligned.
pub fn cast_slice<T: Element>(bytes: &[u8]) -> Option<&[T]> {
    bytemuck::try_cast_slice(bytes).ok()
}

/// A `Vec` of plain-old-data viewed as bytes, so it can back a [`Bytes`] without a copy.
struct PodVec<T>(Vec<T>);

impl<T: bytemuck::Pod> AsRef<[u8]> for PodVec<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl Tensor {
    /// A fixed-size tensor from packed little-endian bytes; checks the length against the shape.
    pub fn from_raw(datatype: DataType, shape: Vec<usize>, bytes: Bytes) -> Result<Self, Error> {
        let Some(size) = datatype.element_size() else {
            return Err(Error::invalid_input("BYTES tensors are built from strings, not raw bytes"));
        };
        let count = element_count(&shape)?;
        let expected = count
            .checked_mul(size)
            .ok_or_else(|| Error::invalid_input(format!("shape {shape:?} of {datatype} is too large")))?;
        if bytes.len() != expected {
            return Err(Error::invalid_input(format!(
                "{datatype} tensor of shape {shape:?} needs {expected} bytes ({count} elements), got {}",
                bytes.len()
            )));
        }
        if datatype == DataType::Bool
            && let Some(i) = bytes.iter().position(|&b| b > 1)
        {
            return Err(Error::invalid_input(format!(
                "BOOL element {i} is byte {}, expected 0 or 1",
                bytes[i]
            )));
        }
        Ok(Tensor { datatype, shape, data: TensorData::Raw(bytes) })
    }

    /// A BYTES tensor, one byte string per element.
    pub fn from_strings(shape: Vec<usize>, strings: Vec<Bytes>) -> Result<Self, Error> {
        let count = element_count(&shape)?;
        if strings.len() != count {
            return Err(Error::invalid_input(format!(
                "BYTES tensor of shape {shape:?} needs {count} elements, got {}",
                strings.len()
            )));
        }
        Ok(Tensor { datatype: DataType::Bytes, shape, data: TensorData::Strings(strings) })
    }

    /// A fixed-size tensor from typed values, without copying them.
    pub fn from_vec<T: Element>(shape: Vec<usize>, values: Vec<T>) -> Result<Self, Error> {
        Self::from_raw(T::DATATYPE, shape, Bytes::from_owner(PodVec(values)))
    }

    /// A BOOL tensor.
    pub fn from_bools(shape: Vec<usize>, values: &[bool]) -> Result<Self, Error> {
        let bytes: Vec<u8> = values.iter().map(|&b| u8::from(b)).collect();
        Self::from_raw(DataType::Bool, shape, Bytes::from(bytes))
    }

    /// The element type.
    pub fn datatype(&self) -> DataType {
        self.datatype
    }

    /// The shape; every dimension is concrete.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// Takes the elements out.
    pub fn into_data(self) -> TensorData {
        self.data
    }

    /// Number of elements (the product of the shape).
    pub fn len(&self) -> usize {
        match &self.data {
            TensorData::Raw(b) => b.len() / self.datatype.element_size().unwrap_or(1),
            TensorData::Strings(s) => s.len(),
        }
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The packed bytes of a fixed-size tensor; `None` for BYTES.
    pub fn raw_bytes(&self) -> Option<&Bytes> {
        match &self.data {
            TensorData::Raw(b) => Some(b),
            TensorData::Strings(_) => None,
        }
    }

    /// The byte strings of a BYTES tensor; `None` for fixed-size types.
    pub fn strings(&self) -> Option<&[Bytes]> {
        match &self.data {
            TensorData::Raw(_) => None,
            TensorData::Strings(s) => Some(s),
        }
    }

    /// The elements as a typed vector (copied, so the source alignment does not matter).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, Error> {
        match &self.data {
            TensorData::Raw(b) if T::DATATYPE == self.datatype => Ok(bytemuck::pod_collect_to_vec(b)),
            _ => Err(Error::invalid_input(format!("tensor is {}, not {}", self.datatype, T::DATATYPE))),
        }
    }

    /// The elements of a BOOL tensor.
    pub fn to_bools(&self) -> Result<Vec<bool>, Error> {
        match &self.data {
            TensorData::Raw(b) if self.datatype == DataType::Bool => Ok(b.iter().map(|&x| x != 0).collect()),
            _ => Err(Error::invalid_input(format!("tensor is {}, not BOOL", self.datatype))),
        }
    }

    /// Returns the same data under another shape with the same element count.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self, Error> {
        if element_count(&shape)? != element_count(&self.shape)? {
            return Err(Error::invalid_input(format!(
                "cannot reshape {:?} to {shape:?}: element counts differ",
                self.shape
            )));
        }
        Ok(Tensor { shape, ..self })
    }

    /// Joins tensors along axis 0. All parts must share datatype and trailing dimensions.
    pub fn concat(parts: &[Tensor]) -> Result<Tensor, Error> {
        let first = parts.first().ok_or_else(|| Error::invalid_input("nothing to concatenate"))?;
        if parts.len() == 1 {
            return Ok(first.clone());
        }
        let rank = first.shape.len();
        if rank == 0 {
            return Err(Error::invalid_input("scalars have no batch axis to concatenate along"));
        }
        let mut rows = 0usize;
        for p in parts {
            if p.datatype != first.datatype || p.shape.len() != rank || p.shape[1..] != first.shape[1..] {
                return Err(Error::invalid_input(format!(
                    "cannot batch {} {:?} with {} {:?}",
                    p.datatype, p.shape, first.datatype, first.shape
                )));
            }
            rows += p.shape[0];
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        let data = match &first.data {
            TensorData::Raw(_) => {
                let total = parts.iter().map(|p| p.raw_bytes().map_or(0, Bytes::len)).sum();
                let mut out = Vec::with_capacity(total);
                for p in parts {
                    out.extend_from_slice(p.raw_bytes().map_or(&[][..], |b| &b[..]));
                }
                TensorData::Raw(Bytes::from(out))
            }
            TensorData::Strings(_) => TensorData::Strings(
                parts.iter().flat_map(|p| p.strings().unwrap_or(&[]).iter().cloned()).collect(),
            ),
        };
        Ok(Tensor { datatype: first.datatype, shape, data })
    }

    /// Splits along axis 0 into pieces of `rows[i]` rows each; the rows must add up to `shape[0]`.
    /// Fixed-size pieces share the original buffer.
    pub fn split(&self, rows: &[usize]) -> Result<Vec<Tensor>, Error> {
        let Some(&total) = self.shape.first() else {
            return Err(Error::invalid_input("a scalar has no batch axis to split"));
        };
        if rows.iter().sum::<usize>() != total {
            return Err(Error::invalid_input(format!("cannot split {total} rows into pieces of {rows:?}")));
        }
        let row_elems = element_count(&self.shape[1..])?;
        let mut out = Vec::with_capacity(rows.len());
        let mut start = 0usize;
        for &r in rows {
            let mut shape = self.shape.clone();
            shape[0] = r;
            let data = match &self.data {
                TensorData::Raw(b) => {
                    let size = self.datatype.element_size().unwrap_or(1) * row_elems;
                    TensorData::Raw(b.slice(start * size..(start + r) * size))
                }
                TensorData::Strings(s) => {
                    TensorData::Strings(s[start * row_elems..(start + r) * row_elems].to_vec())
                }
            };
            out.push(Tensor { datatype: self.datatype, shape, data });
            start += r;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_length_must_match_shape() {
        assert!(Tensor::from_raw(DataType::Fp32, vec![2, 2], Bytes::from(vec![0u8; 16])).is_ok());
        let err = Tensor::from_raw(DataType::Fp32, vec![2, 2], Bytes::from(vec![0u8; 12]));
        assert!(err.unwrap_err().to_string().contains("needs 16 bytes"));
    }

    #[test]
    fn bool_bytes_are_checked() {
        let err = Tensor::from_raw(DataType::Bool, vec![2], Bytes::from(vec![1u8, 2]));
        assert!(err.unwrap_err().to_string().contains("expected 0 or 1"));
    }

    #[test]
    fn absurd_shape_is_an_error_not_an_allocation() {
        let err = element_count(&[usize::MAX, 2]).unwrap_err();
        assert!(err.is_invalid_input());
    }

    #[test]
    fn concat_then_split_round_trips() {
        let a = Tensor::from_vec(vec![1, 3], vec![1.0f32, 2.0, 3.0]).unwrap();
        let b = Tensor::from_vec(vec![2, 3], vec![4.0f32, 5.0, 6.0, 7.0, 8.0, 9.0]).unwrap();
        let joined = Tensor::concat(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(joined.shape(), &[3, 3]);
        assert_eq!(joined.to_vec::<f32>().unwrap(), (1..=9).map(|x| x as f32).collect::<Vec<_>>());
        let parts = joined.split(&[1, 2]).unwrap();
        assert_eq!(parts, vec![a, b]);
    }

    #[test]
    fn concat_rejects_mismatched_rows() {
        let a = Tensor::from_vec(vec![1, 3], vec![1.0f32; 3]).unwrap();
        let b = Tensor::from_vec(vec![1, 2], vec![1.0f32; 2]).unwrap();
        assert!(Tensor::concat(&[a, b]).is_err());
    }

    #[test]
    fn strings_split() {
        let t = Tensor::from_strings(vec![3], vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("c")])
            .unwrap();
        let parts = t.split(&[2, 1]).unwrap();
        assert_eq!(parts[1].strings().unwrap(), &[Bytes::from("c")]);
    }

    #[test]
    fn typed_values_round_trip_unaligned() {
        let mut raw = vec![0u8];
        raw.extend_from_slice(bytemuck::cast_slice(&[1.5f64, -2.25]));
        let unaligned = Bytes::from(raw).slice(1..);
        let t = Tensor::from_raw(DataType::Fp64, vec![2], unaligned).unwrap();
        assert_eq!(t.to_vec::<f64>().unwrap(), vec![1.5, -2.25]);
    }
}
