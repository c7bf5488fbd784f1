//! Decoding a V2 `data` array into a typed buffer.
//!
//! The array arrives as a slice of the request body that serde_json has already validated as
//! JSON. Numbers and booleans are read by a dedicated scanner straight into a `Vec` of the
//! tensor's element type (floats through `fast-float2`, integers by hand with overflow checks);
//! nesting is flattened row-major. No `serde_json::Value`, no intermediate `f64` per element.
//! BYTES elements are JSON strings, so they go through serde_json to get escapes right.

use std::fmt;

use bytes::Bytes;
use kiln_runtime_core::{DataType, Tensor, bf16, element_count, f16};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};

/// An element type the scanner can read from one JSON token.
trait Scalar: Sized {
    const NAME: &'static str;
    /// Parses the JSON number at the start of `s` (already validated as JSON); returns the value
    /// and the bytes consumed, or `None` when it is not a valid value of this type.
    fn number(s: &[u8]) -> Option<(Self, usize)>;
    /// Converts `true` / `false`.
    fn boolean(_v: bool) -> Option<Self> {
        None
    }
    /// Converts a JSON integer serde_json has parsed (single-pass decoding).
    fn from_i128(_v: i128) -> Option<Self> {
        None
    }
    /// Converts a JSON number with a fraction or exponent serde_json has parsed.
    fn from_f64(_v: f64) -> Option<Self> {
        None
    }
    /// Converts `NaN`, `Infinity` or `-Infinity` (quoted by [`quote_non_finite`]).
    fn non_finite(word: &str) -> Option<Self> {
        Self::from_f64(non_finite_f64(word)?)
    }
}

fn non_finite_f64(word: &str) -> Option<f64> {
    match word {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

/// Words Python's `json` module and Triton's clients write for non-finite floats. They are not
/// JSON, but Triton's parser accepts them, and perf_analyzer's random FP32 data contains them.
const NON_FINITE: [&[u8]; 3] = [b"NaN", b"Infinity", b"-Infinity"];

/// Quotes bare `NaN`, `Infinity` and `-Infinity` outside strings so serde_json can read the
/// body; float data decodes the quoted words back (other datatypes reject them as strings).
/// `None` when there is nothing to quote. Only called after a plain parse failed, so valid JSON
/// never pays for this pass.
pub fn quote_non_finite(json: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(json.len() + 64);
    let (mut in_string, mut escaped, mut changed) = (false, false, false);
    let mut i = 0;
    'bytes: while i < json.len() {
        let c = json[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
        } else if c == b'"' {
            in_string = true;
        } else {
            for word in NON_FINITE {
                if json[i..].starts_with(word) {
                    out.push(b'"');
                    out.extend_from_slice(word);
                    out.push(b'"');
                    i += word.len();
                    changed = true;
                    continue 'bytes;
                }
            }
        }
        out.push(c);
        i += 1;
    }
    changed.then_some(out)
}

/// Parses an integer at the start of `s`: optional `-`, digits. A fraction or exponent makes it
/// not an integer.
fn integer(s: &[u8]) -> Option<(i128, usize)> {
    let neg = s.first() == Some(&b'-');
    let mut i = usize::from(neg);
    let mut v: i128 = 0;
    while let Some(&c) = s.get(i) {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(i128::from(c - b'0'))?;
        i += 1;
    }
    if i == usize::from(neg) || matches!(s.get(i), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    Some((if neg { -v } else { v }, i))
}

macro_rules! int_scalar {
    ($($t:ty => $name:literal),*) => {$(
        impl Scalar for $t {
            const NAME: &'static str = $name;
            fn number(s: &[u8]) -> Option<(Self, usize)> {
                integer(s).and_then(|(v, n)| <$t>::try_from(v).ok().map(|v| (v, n)))
            }
            fn from_i128(v: i128) -> Option<Self> {
                <$t>::try_from(v).ok()
            }
        }
    )*};
}
int_scalar!(u8 => "UINT8", u16 => "UINT16", u32 => "UINT32", u64 => "UINT64",
    i8 => "INT8", i16 => "INT16", i32 => "INT32", i64 => "INT64");

impl Scalar for f32 {
    const NAME: &'static str = "FP32";
    fn number(s: &[u8]) -> Option<(Self, usize)> {
        fast_float2::parse_partial(s).ok()
    }
    fn from_i128(v: i128) -> Option<Self> {
        Some(v as f32)
    }
    fn from_f64(v: f64) -> Option<Self> {
        Some(v as f32)
    }
}

impl Scalar for f64 {
    const NAME: &'static str = "FP64";
    fn number(s: &[u8]) -> Option<(Self, usize)> {
        fast_float2::parse_partial(s).ok()
    }
    fn from_i128(v: i128) -> Option<Self> {
        Some(v as f64)
    }
    fn from_f64(v: f64) -> Option<Self> {
        Some(v)
    }
}

impl Scalar for f16 {
    const NAME: &'static str = "FP16";
    fn number(s: &[u8]) -> Option<(Self, usize)> {
        f64::number(s).map(|(v, n)| (f16::from_f64(v), n))
    }
    fn from_i128(v: i128) -> Option<Self> {
        Some(f16::from_f64(v as f64))
    }
    fn from_f64(v: f64) -> Option<Self> {
        Some(f16::from_f64(v))
    }
}

impl Scalar for bf16 {
    const NAME: &'static str = "BF16";
    fn number(s: &[u8]) -> Option<(Self, usize)> {
        f64::number(s).map(|(v, n)| (bf16::from_f64(v), n))
    }
    fn from_i128(v: i128) -> Option<Self> {
        Some(bf16::from_f64(v as f64))
    }
    fn from_f64(v: f64) -> Option<Self> {
        Some(bf16::from_f64(v))
    }
}

/// BOOL elements, stored as 0/1 bytes.
struct Flag(u8);

impl Scalar for Flag {
    const NAME: &'static str = "BOOL";
    fn number(_: &[u8]) -> Option<(Self, usize)> {
        None
    }
    fn boolean(v: bool) -> Option<Self> {
        Some(Flag(u8::from(v)))
    }
}

/// What one element is, for error messages.
fn describe(token: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(token).trim().chars().take(40).collect();
    match token.first() {
        Some(b'"') => format!("the string {text}"),
        Some(b'{') => "an object".into(),
        _ => text,
    }
}

/// Reads every scalar of a (possibly nested) JSON array into `out`.
fn scan<T: Scalar>(raw: &[u8], out: &mut Vec<T>, limit: usize, name: &str) -> Result<(), String> {
    let mut i = 0usize;
    if raw.iter().find(|c| !c.is_ascii_whitespace()) != Some(&b'[') {
        return Err(format!("input \"{name}\": \"data\" must be an array"));
    }
    while i < raw.len() {
        let c = raw[i];
        if matches!(c, b'[' | b']' | b',') || c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let value = match c {
            b't' | b'f' => {
                let v = c == b't';
                i += if v { 4 } else { 5 };
                T::boolean(v)
            }
            b'-' | b'0'..=b'9' => T::number(&raw[start..]).map(|(v, n)| {
                i += n;
                v
            }),
            b'"' => NON_FINITE.iter().find_map(|w| {
                raw[start + 1..].strip_prefix(*w)?.strip_prefix(b"\"")?;
                i += w.len() + 2;
                T::non_finite(std::str::from_utf8(w).ok()?)
            }),
            _ => None,
        };
        let index = out.len();
        match value {
            Some(_) if index >= limit => {
                return Err(format!(
                    "input \"{name}\": data has more elements than its shape allows ({limit})"
                ));
            }
            Some(v) => out.push(v),
            None => {
                // Strings, objects and null end the decoding: the token's extent only matters
                // for the message.
                let end = raw[start..]
                    .iter()
                    .position(|&c| matches!(c, b',' | b']'))
                    .map_or(raw.len(), |p| start + p);
                return Err(format!(
                    "input \"{name}\": data element {index} is {}, which is not a valid {} value",
                    describe(&raw[start..end]),
                    T::NAME
                ));
            }
        }
    }
    Ok(())
}

/// Flattens a nested JSON array of strings (BYTES).
struct Strings<'a> {
    out: &'a mut Vec<Bytes>,
    limit: usize,
    name: &'a str,
}

impl<'de> DeserializeSeed<'de> for Strings<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strings<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Strings { out: &mut *self.out, limit: self.limit, name: self.name })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if self.out.len() >= self.limit {
            return Err(E::custom(format!(
                "input \"{}\": data has more elements than its shape allows ({})",
                self.name, self.limit
            )));
        }
        self.out.push(Bytes::copy_from_slice(v.as_bytes()));
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        Err(self.wrong(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        Err(self.wrong(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        Err(self.wrong(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        Err(self.wrong(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(self.wrong("null"))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.wrong("an object"))
    }
}

impl Strings<'_> {
    fn wrong<E: de::Error>(&self, found: impl fmt::Display) -> E {
        E::custom(format!(
            "input \"{}\": data element {} is {found}, which is not a valid BYTES value (a string)",
            self.name,
            self.out.len()
        ))
    }
}

/// True when [`DataSeed`] decodes `datatype` as exactly as [`decode_data`] does. FP64 is left
/// to the two-pass path: serde_json's own float parsing may be one f64 ulp off (it is exact only
/// with its `float_roundtrip` feature, which slows every parse), while `fast-float2` rounds
/// correctly. For FP32 and narrower an f64 within one ulp rounds to the same value.
pub fn single_pass(datatype: DataType) -> bool {
    datatype != DataType::Fp64
}

/// Decodes `data` in place, in the same pass serde_json reads the request: used when `datatype`
/// and `shape` come before `data` (the usual key order), so the array is read once instead of
/// validated as a `RawValue` first and scanned again. Same checks and messages as
/// [`decode_data`]: element types, counts, and no allocation beyond what the body can hold.
pub struct DataSeed<'a> {
    /// The declared datatype.
    pub datatype: DataType,
    /// The declared shape.
    pub shape: &'a [usize],
    /// The input's name, for messages.
    pub name: &'a str,
    /// Length of the whole request body, to bound pre-allocation.
    pub body_len: usize,
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_> {
    type Value = Tensor;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Tensor, D::Error> {
        tensor_of(
            InPlace { d, name: self.name, de: std::marker::PhantomData },
            self.datatype,
            self.shape,
            self.body_len / 2 + 1,
            self.name,
        )
    }
}

/// How one decoding path reads the elements of `data`; [`tensor_of`] does the rest, once for
/// both paths, so their checks and messages cannot drift apart.
trait Fill {
    type Error;
    fn error(message: String) -> Self::Error;
    /// Reads numbers or booleans into `out`, refusing more than `limit`.
    fn numbers<T: Scalar>(self, out: &mut Vec<T>, limit: usize) -> Result<(), Self::Error>;
    /// Reads BYTES elements into `out`, refusing more than `limit`.
    fn strings(self, out: &mut Vec<Bytes>, limit: usize) -> Result<(), Self::Error>;
}

/// One pass: straight from the request's deserializer.
struct InPlace<'a, 'de, D> {
    d: D,
    name: &'a str,
    de: std::marker::PhantomData<&'de ()>,
}

impl<'de, D: Deserializer<'de>> Fill for InPlace<'_, 'de, D> {
    type Error = D::Error;
    fn error(message: String) -> D::Error {
        de::Error::custom(message)
    }
    fn numbers<T: Scalar>(self, out: &mut Vec<T>, limit: usize) -> Result<(), D::Error> {
        self.d.deserialize_any(Elements { out, limit, name: self.name, top: true })
    }
    fn strings(self, out: &mut Vec<Bytes>, limit: usize) -> Result<(), D::Error> {
        Strings { out, limit, name: self.name }.deserialize(self.d)
    }
}

/// Two passes: from a slice serde_json has already validated.
struct Scanned<'a> {
    raw: &'a str,
    name: &'a str,
}

impl Fill for Scanned<'_> {
    type Error = String;
    fn error(message: String) -> String {
        message
    }
    fn numbers<T: Scalar>(self, out: &mut Vec<T>, limit: usize) -> Result<(), String> {
        scan(self.raw.as_bytes(), out, limit, self.name)
    }
    fn strings(self, out: &mut Vec<Bytes>, limit: usize) -> Result<(), String> {
        let mut de = serde_json::Deserializer::from_str(self.raw);
        Strings { out, limit, name: self.name }.deserialize(&mut de).map_err(|e| e.to_string())
    }
}

/// A tensor of `datatype` and `shape` from what `fill` reads. Buffers are pre-allocated for at
/// most `capacity_bound` elements (what the body could hold: each element takes ≥ 2 bytes of
/// JSON), so a request claiming an absurd shape cannot make the server allocate more than its
/// body; the count is checked against the shape afterwards.
fn tensor_of<F: Fill>(
    fill: F,
    datatype: DataType,
    shape: &[usize],
    capacity_bound: usize,
    name: &str,
) -> Result<Tensor, F::Error> {
    let needed = element_count(shape).map_err(|e| F::error(format!("input \"{name}\": {e}")))?;
    let capacity = needed.min(capacity_bound);
    let fail = |e: kiln_runtime_core::Error| F::error(format!("input \"{name}\": {e}"));
    let count = |n: usize| {
        if n == needed {
            Ok(())
        } else {
            Err(F::error(format!(
                "input \"{name}\": data has {n} elements, but shape {shape:?} needs {needed}"
            )))
        }
    };
    macro_rules! typed {
        ($t:ty) => {{
            let mut out: Vec<$t> = Vec::with_capacity(capacity);
            fill.numbers(&mut out, needed)?;
            count(out.len())?;
            Tensor::from_vec(shape.to_vec(), out).map_err(fail)
        }};
    }
    match datatype {
        DataType::Bool => {
            let mut out: Vec<Flag> = Vec::with_capacity(capacity);
            fill.numbers(&mut out, needed)?;
            count(out.len())?;
            let bytes: Vec<u8> = out.into_iter().map(|f| f.0).collect();
            Tensor::from_raw(DataType::Bool, shape.to_vec(), Bytes::from(bytes)).map_err(fail)
        }
        DataType::Uint8 => typed!(u8),
        DataType::Uint16 => typed!(u16),
        DataType::Uint32 => typed!(u32),
        DataType::Uint64 => typed!(u64),
        DataType::Int8 => typed!(i8),
        DataType::Int16 => typed!(i16),
        DataType::Int32 => typed!(i32),
        DataType::Int64 => typed!(i64),
        DataType::Fp16 => typed!(f16),
        DataType::Bf16 => typed!(bf16),
        DataType::Fp32 => typed!(f32),
        DataType::Fp64 => typed!(f64),
        DataType::Bytes => {
            let mut out = Vec::with_capacity(capacity);
            fill.strings(&mut out, needed)?;
            count(out.len())?;
            Tensor::from_strings(shape.to_vec(), out).map_err(fail)
        }
    }
}

/// Flattens a (possibly nested) JSON array of scalars into `out`, row-major.
struct Elements<'a, T> {
    out: &'a mut Vec<T>,
    limit: usize,
    name: &'a str,
    /// The outermost value, which must be an array.
    top: bool,
}

impl<T: Scalar> Elements<'_, T> {
    fn push<E: de::Error>(self, value: Option<T>, found: impl FnOnce() -> String) -> Result<(), E> {
        if self.top {
            return Err(E::custom(format!("input \"{}\": \"data\" must be an array", self.name)));
        }
        let index = self.out.len();
        match value {
            Some(_) if index >= self.limit => Err(E::custom(format!(
                "input \"{}\": data has more elements than its shape allows ({})",
                self.name, self.limit
            ))),
            Some(v) => {
                self.out.push(v);
                Ok(())
            }
            None => Err(E::custom(format!(
                "input \"{}\": data element {index} is {}, which is not a valid {} value",
                self.name,
                found(),
                T::NAME
            ))),
        }
    }
}

impl<'de, T: Scalar> DeserializeSeed<'de> for Elements<'_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Scalar> Visitor<'de> for Elements<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of {} values", T::NAME)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (out, limit, name) = (self.out, self.limit, self.name);
        while seq.next_element_seed(Elements { out: &mut *out, limit, name, top: false })?.is_some() {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(T::boolean(v), || v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(T::from_i128(i128::from(v)), || v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(T::from_i128(i128::from(v)), || v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(T::from_f64(v), || v.to_string())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.push(T::non_finite(v), || describe(format!("{v:?}").as_bytes()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.push(None, || "null".into())
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.push(None, || "an object".into())
    }
}

/// Decodes `raw` (a JSON array, validated) into a tensor of `datatype` and `shape`. Buffers are
/// pre-allocated for at most what the body could hold (each element takes ≥ 2 bytes of JSON), so
/// a request claiming an absurd shape cannot make the server allocate more than its body.
pub fn decode_data(raw: &str, datatype: DataType, shape: Vec<usize>, name: &str) -> Result<Tensor, String> {
    tensor_of(Scanned { raw, name }, datatype, &shape, raw.len() / 2 + 1, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_exact_and_range_checked() {
        assert_eq!(integer(b"-9223372036854775808,"), Some((i64::MIN as i128, 20)));
        assert_eq!(u64::number(b"18446744073709551615]"), Some((u64::MAX, 20)));
        assert_eq!(u64::number(b"18446744073709551616"), None);
        assert_eq!(u8::number(b"-1"), None);
        assert_eq!(i32::number(b"1.0"), None);
        assert_eq!(i32::number(b"1e3"), None);
        assert_eq!(i32::number(b"-"), None);
    }

    #[test]
    fn floats_round_correctly() {
        for s in ["0.1", "-2.5e-3", "3.4028235e38", "1e-45", "0", "-0.0", "123456789"] {
            assert_eq!(f32::number(s.as_bytes()).map(|v| v.0), s.parse::<f32>().ok(), "{s}");
            assert_eq!(f64::number(s.as_bytes()), s.parse::<f64>().ok().map(|v| (v, s.len())), "{s}");
        }
    }

    #[test]
    fn nested_arrays_flatten_and_counts_are_checked() {
        let t = decode_data("[[1, 2], [3,4] ]", DataType::Int64, vec![2, 2], "x").unwrap();
        assert_eq!(t.to_vec::<i64>().unwrap(), vec![1, 2, 3, 4]);
        let e = decode_data("[1, 2, 3]", DataType::Int64, vec![2, 2], "x").unwrap_err();
        assert!(e.contains("data has 3 elements, but shape [2, 2] needs 4"), "{e}");
        let e = decode_data("[1, 2, 3, 4, 5]", DataType::Int64, vec![2, 2], "x").unwrap_err();
        assert!(e.contains("more elements than its shape allows (4)"), "{e}");
        let e = decode_data("[true, null]", DataType::Bool, vec![2], "x").unwrap_err();
        assert!(e.contains("data element 1 is null, which is not a valid BOOL value"), "{e}");
        let e = decode_data("[1, {\"a\": 1}]", DataType::Fp32, vec![2], "x").unwrap_err();
        assert!(e.contains("data element 1 is an object"), "{e}");
        let e = decode_data("[\"a\\\"b\", 3]", DataType::Bytes, vec![2], "x").unwrap_err();
        assert!(e.contains("data element 1 is 3, which is not a valid BYTES"), "{e}");
        let t = decode_data("[\"a\\\"b\", \"\\u00e9\"]", DataType::Bytes, vec![2], "x").unwrap();
        assert_eq!(t.strings().unwrap(), &[Bytes::from("a\"b"), Bytes::from("é")]);
        let e = decode_data("5", DataType::Fp32, vec![1], "x").unwrap_err();
        assert!(e.contains("must be an array"), "{e}");
    }
}
