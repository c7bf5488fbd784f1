//! A description of an ONNX model read straight from its protobuf: opsets, operators, inputs and
//! outputs. Engine-independent, so `inspect`, the registry and every backend's `supports()` share
//! it. Only the fields needed are declared; prost skips the rest (weights included) without
//! copying them.

use std::collections::BTreeMap;

use prost::Message;
use serde::Serialize;

use crate::{DataType, TensorSpec};

/// The ONNX default operator domain.
pub const DEFAULT_DOMAIN: &str = "ai.onnx";

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(int64, tag = "1")]
    ir_version: i64,
    #[prost(string, tag = "2")]
    producer_name: String,
    #[prost(string, tag = "3")]
    producer_version: String,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    opset_import: Vec<OperatorSetIdProto>,
}

#[derive(Clone, PartialEq, Message)]
struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    domain: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorNameOnly>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfoProto>,
}

/// An initializer, of which only the name matters here (ONNX lets initializers shadow inputs).
#[derive(Clone, PartialEq, Message)]
struct TensorNameOnly {
    #[prost(string, tag = "8")]
    name: String,
}

#[derive(Clone, PartialEq, Message)]
struct NodeProto {
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(string, tag = "7")]
    domain: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct AttributeProto {
    #[prost(message, optional, tag = "6")]
    g: Option<GraphProto>,
    #[prost(message, repeated, tag = "11")]
    graphs: Vec<GraphProto>,
}

#[derive(Clone, PartialEq, Message)]
struct ValueInfoProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeProto {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorTypeProto>,
    #[prost(message, optional, tag = "4")]
    sequence_type: Option<SkipProto>,
    #[prost(message, optional, tag = "5")]
    map_type: Option<SkipProto>,
}

#[derive(Clone, PartialEq, Message)]
struct SkipProto {}

#[derive(Clone, PartialEq, Message)]
struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    elem_type: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
struct Dimension {
    #[prost(int64, optional, tag = "1")]
    dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    dim_param: Option<String>,
}

/// The type of a graph input or output as declared in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ValueDecl {
    /// Name in the graph.
    pub name: String,
    /// Declared element type: a protocol datatype, or the ONNX name of one the protocol lacks
    /// (`COMPLEX64`, `seq`, `map`, ...).
    pub datatype: String,
    /// Declared dimensions (`-1` where dynamic or undeclared); `None` when no shape is declared.
    pub shape: Option<Vec<i64>>,
    /// Names of symbolic dimensions, `""` where the dimension is fixed or anonymous.
    pub dim_names: Vec<String>,
}

impl ValueDecl {
    /// The declaration as a protocol [`TensorSpec`], when its type and rank are known.
    pub fn to_spec(&self) -> Option<TensorSpec> {
        Some(TensorSpec {
            name: self.name.clone(),
            datatype: self.datatype.parse().ok()?,
            shape: self.shape.clone()?,
        })
    }
}

/// What an ONNX file declares: enough to show it, check it and pick a backend for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OnnxInfo {
    /// ONNX IR version.
    pub ir_version: i64,
    /// Tool that wrote the file.
    pub producer: String,
    /// Graph name.
    pub graph_name: String,
    /// Operator set per domain (`ai.onnx` for the default domain).
    pub opsets: BTreeMap<String, i64>,
    /// Graph inputs that are not initializers.
    pub inputs: Vec<ValueDecl>,
    /// Graph outputs.
    pub outputs: Vec<ValueDecl>,
    /// Operators used, as `OpType` (default domain) or `domain:OpType`, with their counts,
    /// subgraphs of control-flow operators included.
    pub operators: BTreeMap<String, usize>,
}

/// Maps an ONNX `TensorProto.DataType` code to the protocol datatype or ONNX's name for it.
fn elem_type_name(code: i32) -> String {
    let name = match code {
        1 => DataType::Fp32.as_str(),
        2 => DataType::Uint8.as_str(),
        3 => DataType::Int8.as_str(),
        4 => DataType::Uint16.as_str(),
        5 => DataType::Int16.as_str(),
        6 => DataType::Int32.as_str(),
        7 => DataType::Int64.as_str(),
        8 => DataType::Bytes.as_str(),
        9 => DataType::Bool.as_str(),
        10 => DataType::Fp16.as_str(),
        11 => DataType::Fp64.as_str(),
        12 => DataType::Uint32.as_str(),
        13 => DataType::Uint64.as_str(),
        14 => "COMPLEX64",
        15 => "COMPLEX128",
        16 => DataType::Bf16.as_str(),
        0 => "UNDEFINED",
        _ => return format!("ONNX_TYPE_{code}"),
    };
    name.to_string()
}

fn decl(v: &ValueInfoProto) -> ValueDecl {
    let (datatype, shape, dim_names) = match &v.r#type {
        Some(TypeProto { tensor_type: Some(t), .. }) => {
            let (shape, names) = match &t.shape {
                Some(s) => (
                    Some(s.dim.iter().map(|d| d.dim_value.filter(|&v| v > 0).unwrap_or(-1)).collect()),
                    s.dim.iter().map(|d| d.dim_param.clone().unwrap_or_default()).collect(),
                ),
                None => (None, vec![]),
            };
            (elem_type_name(t.elem_type), shape, names)
        }
        Some(TypeProto { sequence_type: Some(_), .. }) => ("seq".to_string(), None, vec![]),
        Some(TypeProto { map_type: Some(_), .. }) => ("map".to_string(), None, vec![]),
        _ => ("UNDEFINED".to_string(), None, vec![]),
    };
    ValueDecl { name: v.name.clone(), datatype, shape, dim_names }
}

fn count_ops(graph: &GraphProto, ops: &mut BTreeMap<String, usize>) {
    for node in &graph.node {
        let key = if node.domain.is_empty() || node.domain == DEFAULT_DOMAIN {
            node.op_type.clone()
        } else {
            format!("{}:{}", node.domain, node.op_type)
        };
        *ops.entry(key).or_default() += 1;
        for attr in &node.attribute {
            for g in attr.g.iter().chain(&attr.graphs) {
                count_ops(g, ops);
            }
        }
    }
}

/// Why a file is not an ONNX model.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The bytes are not a protobuf `ModelProto`.
    #[error("not an ONNX model (protobuf decoding failed: {0}); is the file truncated or of another format?")]
    Decode(#[from] prost::DecodeError),
    /// The protobuf decoded but lacks what every ONNX model has.
    #[error("not an ONNX model: {0}")]
    Incomplete(&'static str),
}

impl OnnxInfo {
    /// Reads the description from the bytes of an `.onnx` file.
    pub fn parse(bytes: &[u8]) -> Result<Self, OnnxError> {
        let model = ModelProto::decode(bytes)?;
        if model.ir_version <= 0 {
            return Err(OnnxError::Incomplete("no IR version"));
        }
        let graph = model.graph.ok_or(OnnxError::Incomplete("no graph"))?;
        if graph.node.is_empty() && graph.output.is_empty() {
            return Err(OnnxError::Incomplete("the graph has no nodes and no outputs"));
        }
        let opsets = model
            .opset_import
            .iter()
            .map(|o| {
                let domain = if o.domain.is_empty() { DEFAULT_DOMAIN } else { o.domain.as_str() };
                (domain.to_string(), o.version)
            })
            .collect();
        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let mut operators = BTreeMap::new();
        count_ops(&graph, &mut operators);
        let producer = if model.producer_version.is_empty() {
            model.producer_name
        } else {
            format!("{} {}", model.producer_name, model.producer_version)
        };
        Ok(OnnxInfo {
            ir_version: model.ir_version,
            producer,
            graph_name: graph.name.clone(),
            opsets,
            inputs: graph
                .input
                .iter()
                .filter(|i| !initializers.contains(i.name.as_str()))
                .map(decl)
                .collect(),
            outputs: graph.output.iter().map(decl).collect(),
            operators,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused() {
        assert!(OnnxInfo::parse(b"definitely not protobuf \xff\xff\xff").is_err());
        assert!(OnnxInfo::parse(b"").is_err());
    }

    #[test]
    fn parses_a_hand_encoded_model() {
        let dim = |v: i64| Dimension { dim_value: Some(v), dim_param: None };
        let sym = Dimension { dim_value: None, dim_param: Some("N".into()) };
        let value = |name: &str, dims: Vec<Dimension>| ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TensorTypeProto {
                    elem_type: 1,
                    shape: Some(TensorShapeProto { dim: dims }),
                }),
                sequence_type: None,
                map_type: None,
            }),
        };
        let model = ModelProto {
            ir_version: 8,
            producer_name: "test".into(),
            producer_version: String::new(),
            graph: Some(GraphProto {
                node: vec![
                    NodeProto { op_type: "Relu".into(), domain: String::new(), attribute: vec![] },
                    NodeProto { op_type: "Scaler".into(), domain: "ai.onnx.ml".into(), attribute: vec![] },
                ],
                name: "g".into(),
                initializer: vec![],
                input: vec![value("x", vec![sym.clone(), dim(4)])],
                output: vec![value("y", vec![sym, dim(4)])],
            }),
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        };
        let info = OnnxInfo::parse(&model.encode_to_vec()).unwrap();
        assert_eq!(info.opsets.get("ai.onnx"), Some(&17));
        assert_eq!(info.inputs[0].shape, Some(vec![-1, 4]));
        assert_eq!(info.inputs[0].dim_names, vec!["N".to_string(), String::new()]);
        assert_eq!(info.inputs[0].to_spec().unwrap().datatype, DataType::Fp32);
        assert_eq!(info.operators.keys().collect::<Vec<_>>(), vec!["Relu", "ai.onnx.ml:Scaler"]);
    }
}
