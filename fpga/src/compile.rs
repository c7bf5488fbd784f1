//! The compiler/partitioner: from an ONNX model (fp32 with calibration data, or already quantized
//! in QDQ or QLinear form) to an accelerator image.
//!
//! 1. Claims the supported subgraph: `Conv` (2-D, group 1, with a following `BatchNormalization`
//!    folded into fp32 weights), `Gemm` (alpha = beta = 1, transA = 0) and `MatMul` with constant
//!    weights (and a following `Add` of a constant bias), each with a following `Relu`, or `Clip`
//!    whose range contains 0 (Relu6), fused; and `QLinearConv`/`QLinearMatMul`.
//! 2. Reads the quantization an already-quantized model states: weights stored as integers behind
//!    `DequantizeLinear` (or as a QLinear operator's operands) keep their integers and per-channel
//!    scales; a `DequantizeLinear` feeding a layer and a `QuantizeLinear` taking its output give
//!    its activation scales and zero points, and are claimed with it (the accelerator's own
//!    quantization gives the same integers). uint8 activations map onto int8 by shifting the zero
//!    point by -128, which changes no value.
//! 3. Runs the model in tract on the calibration data to record the input and output ranges of
//!    every layer whose quantization the model does not state (and, with calibration data, each
//!    layer's reference output).
//! 4. Quantizes per the numerics contract: int8 asymmetric activations, int8 symmetric
//!    per-channel weights, int32 bias, per-channel multiplier and shift. A layer whose numbers do
//!    not fit (K beyond the buffers, scale ≥ 1, bias out of range) stays on the CPU, with the
//!    reason in the report.
//! 5. Writes the host graph: the model with each claimed subgraph replaced by one
//!    `kiln.fpga:KilnAccel` node, for tract to run around the accelerator; a QLinear layer whose
//!    neighbours exchange integer tensors gets a `DequantizeLinear` before it and a
//!    `QuantizeLinear` after it, which round-trip those integers exactly.
//! 6. With calibration data, measures each layer's SQNR through the bit-exact emulator against
//!    the source model's own output of that layer, and checks that tract can run the host graph.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kiln_runtime_core::onnx::OnnxInfo;
use kiln_runtime_core::{DataType, NamedTensor, TensorData};
use prost::Message;
use sha2::{Digest as _, Sha256};
use tract_onnx::pb::{AttributeProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};
use tract_onnx::prelude::{InferenceFact, InferenceModelExt, IntoTValue, TVec, Tensor, tvec};
use tract_onnx::tract_core::model::IntoRunnable;

use crate::emulated::EmulatedDevice;
use crate::image::{AccelLayer, AcceleratorImage, LayerOp, PartitionReport, new_header};
use crate::numerics::{MAX_K, quantize_multiplier};
use crate::runtime::AccelRuntime;

/// Why a model cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The model file is not usable.
    #[error("{0}")]
    Model(String),
    /// The calibration data does not fit the model.
    #[error("calibration data: {0}")]
    Calibration(String),
    /// Nothing in the model can run on the accelerator.
    #[error(
        "no operator of this model can run on the accelerator (supported: Conv, Gemm, MatMul with constant weights, \
         with Relu or Clip fused){0}. CPU-only plan: serve it with --backend tract or --backend ort"
    )]
    NoSubgraph(String),
}

/// A node's name, or its first output's when the file leaves nodes unnamed.
fn label(node: &NodeProto) -> String {
    if node.name.is_empty() {
        format!("{} -> {}", node.op_type, node.output.first().map(String::as_str).unwrap_or("?"))
    } else {
        node.name.clone()
    }
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_ints(node: &NodeProto, name: &str, default: &[i64]) -> Vec<i64> {
    attr(node, name).map(|a| a.ints.clone()).filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_vec())
}

fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map(|a| a.i).unwrap_or(default)
}

fn attr_f(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).map(|a| a.f).unwrap_or(default)
}

/// An fp32 initializer's values and shape; `None` for other types or external data.
fn floats(t: &TensorProto) -> Option<(Vec<usize>, Vec<f32>)> {
    if t.data_type != 1 {
        return None;
    }
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    let data = if !t.raw_data.is_empty() {
        t.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>()
    } else {
        t.float_data.clone()
    };
    (data.len() == n).then_some((shape, data))
}

/// A claimed subgraph before quantization.
#[derive(Debug)]
struct Candidate {
    nodes: Vec<String>,
    node_indices: Vec<usize>,
    input: String,
    output: String,
    op: LayerOp,
    cin: usize,
    /// K × cout, row-major.
    weights: Vec<f32>,
    /// Per output channel, when the model states them (QDQ/QLinear); else chosen from the weights.
    weight_scales: Option<Vec<f32>>,
    bias: Bias,
    k: usize,
    cout: usize,
    relu: bool,
    /// A fused Clip's bounds.
    clip: Option<(f32, f32)>,
    used_initializers: Vec<String>,
    /// Input and output quantization the model states; `None` is taken from calibration.
    in_q: Option<Stated>,
    out_q: Option<Stated>,
    /// Where the source model holds the layer's input and output when only as integer tensors
    /// (QLinear operators): the tensor and how to dequantize it. `None`: `input`/`output` exist.
    probe_in: Option<(String, Stated)>,
    probe_out: Option<(String, Stated)>,
    /// Nodes the host graph runs around the layer when its neighbours exchange integer tensors:
    /// a DequantizeLinear before it, a QuantizeLinear after it.
    pre: Option<NodeProto>,
    post: Option<NodeProto>,
}

impl Candidate {
    fn new(g: &Graph<'_>, i: usize, op: LayerOp, cin: usize, w: Weights, bias: Bias) -> Self {
        let n = &g.nodes[i];
        Candidate {
            nodes: vec![label(n)],
            node_indices: std::iter::once(i).chain(w.dequantize_node).collect(),
            input: n.input[0].clone(),
            output: n.output[0].clone(),
            op,
            cin,
            k: w.k,
            cout: w.cout,
            weights: w.values,
            weight_scales: w.scales,
            bias,
            relu: false,
            clip: None,
            used_initializers: w.initializers,
            in_q: None,
            out_q: None,
            probe_in: None,
            probe_out: None,
            pre: None,
            post: None,
        }
    }

    /// Whether calibration must supply a range (an activation the model does not quantize).
    fn needs_calibration(&self) -> bool {
        self.in_q.is_none() || self.out_q.is_none()
    }

    /// The source model's tensor holding the layer's input (or output) and how to read it as f32.
    fn probe(&self, output: bool) -> (String, Option<Stated>) {
        match (output, &self.probe_in, &self.probe_out) {
            (false, Some((t, q)), _) | (true, _, Some((t, q))) => (t.clone(), Some(*q)),
            (false, None, _) => (self.input.clone(), None),
            (true, _, None) => (self.output.clone(), None),
        }
    }
}

/// Activation quantization a QDQ/QLinear model states, in the accelerator's int8 domain: a uint8
/// tensor's zero point is shifted by -128, which maps its values onto int8 one to one.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stated {
    scale: f32,
    zp: i8,
    /// The model's tensor is uint8.
    unsigned: bool,
}

impl Stated {
    /// The real value of one of the model's integer values (read as f32).
    fn dequantize(self, raw: f32) -> f32 {
        let offset = if self.unsigned { 128.0 } else { 0.0 };
        (raw - offset - f32::from(self.zp)) * self.scale
    }

    /// Whether a fused activation is already applied by the output's saturation: a Relu (or a
    /// Clip from 0) by the accelerator's ReLU clamp at the zero point, a Clip's bounds only when
    /// they lie at or beyond the representable range.
    fn applies(self, relu: bool, clip: Option<(f32, f32)>) -> bool {
        match clip {
            None => true,
            Some((lo, hi)) => {
                let steps = |x: f32| x / self.scale + f32::from(self.zp);
                steps(hi) >= 126.5 && (relu || steps(lo) <= -127.5)
            }
        }
    }
}

/// A layer's bias: real values (fp32 models), or integers with per-channel scales (QDQ/QLinear).
#[derive(Debug)]
enum Bias {
    Real(Vec<f32>),
    Stated { q: Vec<i64>, scale: Vec<f32> },
}

impl Bias {
    fn real(&self, c: usize) -> f64 {
        match self {
            Bias::Real(b) => f64::from(b[c]),
            Bias::Stated { q, scale } => q[c] as f64 * f64::from(scale[c]),
        }
    }

    /// Channel `c`'s bias in accumulator units (input scale × weight scale), rounded half to even.
    /// A stated bias whose scale is that product (as QDQ and QLinear models store it) is taken
    /// as it is.
    fn in_accumulator_units(&self, c: usize, unit: f64) -> f64 {
        match self {
            Bias::Stated { q, scale } if (f64::from(scale[c]) / unit - 1.0).abs() < 1e-6 => q[c] as f64,
            _ => (self.real(c) / unit).round_ties_even(),
        }
    }
}

/// A Conv/Gemm/MatMul's constant weights as fp32 (dequantized when the model stores them
/// quantized; those values quantize back to exactly the stored integers with `scales`).
struct Weights {
    shape: Vec<usize>,
    values: Vec<f32>,
    /// One per output channel, when stored quantized.
    scales: Option<Vec<f32>>,
    /// The DequantizeLinear producing them, when nothing else uses its output.
    dequantize_node: Option<usize>,
    initializers: Vec<String>,
    k: usize,
    cout: usize,
}

/// A constant stored quantized: `(q - zp) * scale`, per tensor or along `axis`.
struct QuantConst {
    shape: Vec<usize>,
    q: Vec<i64>,
    scale: Vec<f32>,
    zp: Vec<i64>,
    axis: usize,
    initializers: Vec<String>,
}

impl QuantConst {
    /// The integers without their zero point and the scale of each index along `axis`, checked to
    /// be per tensor or per `axis` (the output channel).
    fn per_channel(&self, axis: usize) -> Result<(Vec<i64>, Vec<f32>), String> {
        let channels = *self.shape.get(axis).ok_or("quantized constant of too low a rank")?;
        for (what, len) in [("scale", self.scale.len()), ("zero point", self.zp.len())] {
            if len != 1 && (len != channels || self.axis != axis) {
                return Err(format!(
                    "the {what} is neither per tensor nor per output channel (axis {axis}, {channels} channels)"
                ));
            }
        }
        let inner: usize = self.shape[axis + 1..].iter().product();
        let at = |v: &[i64], c: usize| if v.len() == 1 { v[0] } else { v[c] };
        let ints =
            self.q.iter().enumerate().map(|(i, &q)| q - at(&self.zp, (i / inner) % channels)).collect();
        let scales = (0..channels).map(|c| if self.scale.len() == 1 { self.scale[0] } else { self.scale[c] });
        let scales: Vec<f32> = scales.collect();
        if scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err("a quantization scale is not a positive number".into());
        }
        Ok((ints, scales))
    }
}

struct Graph<'a> {
    nodes: &'a [NodeProto],
    inits: HashMap<&'a str, &'a TensorProto>,
    consumers: HashMap<&'a str, Vec<usize>>,
    producers: HashMap<&'a str, usize>,
    outputs: HashSet<&'a str>,
}

/// An integer initializer's shape and values (int8, uint8, int32 or int64).
fn ints(t: &TensorProto) -> Option<(Vec<usize>, Vec<i64>)> {
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    let raw = &t.raw_data;
    let from_i32 = || t.int32_data.iter().map(|&v| i64::from(v)).collect::<Vec<_>>();
    let data: Vec<i64> = match (t.data_type, raw.is_empty()) {
        (2, false) => raw.iter().map(|&b| i64::from(b)).collect(),
        (3, false) => raw.iter().map(|&b| i64::from(b as i8)).collect(),
        (6, false) => {
            raw.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()
        }
        (7, false) => {
            raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
        }
        (2 | 3 | 6, true) => from_i32(),
        (7, true) => t.int64_data.clone(),
        _ => return None,
    };
    (data.len() == n).then_some((shape, data))
}

impl<'a> Graph<'a> {
    fn new(proto: &'a ModelProto) -> Result<Self, CompileError> {
        let g = proto.graph.as_ref().ok_or_else(|| CompileError::Model("the model has no graph".into()))?;
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut producers = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for input in &n.input {
                consumers.entry(input.as_str()).or_default().push(i);
            }
            for output in &n.output {
                producers.insert(output.as_str(), i);
            }
        }
        Ok(Graph {
            nodes: &g.node,
            inits: g.initializer.iter().map(|t| (t.name.as_str(), t)).collect(),
            consumers,
            producers,
            outputs: g.output.iter().map(|o| o.name.as_str()).collect(),
        })
    }

    /// The single node consuming `tensor` if it is `op_type` (and `tensor` is not a graph output).
    fn only_consumer(&self, tensor: &str, op_type: &str) -> Option<usize> {
        if self.outputs.contains(tensor) {
            return None;
        }
        match self.consumers.get(tensor).map(Vec::as_slice) {
            Some([i]) if self.nodes[*i].op_type == op_type && self.nodes[*i].domain.is_empty() => Some(*i),
            _ => None,
        }
    }

    /// The node producing `tensor` if it is a standard `op_type`.
    fn producer(&self, tensor: &str, op_type: &str) -> Option<usize> {
        self.producers
            .get(tensor)
            .copied()
            .filter(|&i| self.nodes[i].op_type == op_type && self.nodes[i].domain.is_empty())
    }

    fn init(&self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        self.inits.get(name).and_then(|t| floats(t))
    }

    /// The activation quantization stated by a node's scale and zero-point operands.
    fn stated(&self, node: &NodeProto, scale_ix: usize, zp_ix: usize) -> Result<Stated, String> {
        let scale_name = node.input.get(scale_ix).ok_or("no scale")?;
        let scale = match self.init(scale_name) {
            Some((_, v)) if v.len() == 1 && v[0].is_finite() && v[0] > 0.0 => v[0],
            _ => return Err(format!("activation scale {scale_name:?} is not a constant positive scalar")),
        };
        let zp_name = node.input.get(zp_ix).filter(|s| !s.is_empty()).ok_or("no activation zero point")?;
        let t = self
            .inits
            .get(zp_name.as_str())
            .ok_or_else(|| format!("zero point {zp_name:?} is not a constant"))?;
        match (t.data_type, ints(t)) {
            (2, Some((_, v))) if v.len() == 1 => Ok(Stated { scale, zp: (v[0] - 128) as i8, unsigned: true }),
            (3, Some((_, v))) if v.len() == 1 => Ok(Stated { scale, zp: v[0] as i8, unsigned: false }),
            _ => Err(format!("activation zero point {zp_name:?} is not an int8 or uint8 scalar")),
        }
    }

    /// Operands `q, scale, zero point` naming initializers: a quantized constant.
    fn quant_const(&self, q: &str, scale: &str, zp: Option<&str>, axis: i64) -> Result<QuantConst, String> {
        let not_const = |name: &str| format!("{name:?} is not a constant integer tensor");
        let (shape, values) = self.inits.get(q).and_then(|t| ints(t)).ok_or_else(|| not_const(q))?;
        let (_, scales) =
            self.init(scale).ok_or_else(|| format!("scale {scale:?} is not a constant fp32 tensor"))?;
        let zps = match zp.filter(|z| !z.is_empty()) {
            Some(z) => self.inits.get(z).and_then(|t| ints(t)).ok_or_else(|| not_const(z))?.1,
            None => vec![0],
        };
        let rank = shape.len() as i64;
        let axis = if axis < 0 { axis + rank } else { axis };
        let mut initializers = vec![q.to_string(), scale.to_string()];
        initializers.extend(zp.filter(|z| !z.is_empty()).map(str::to_string));
        Ok(QuantConst { shape, q: values, scale: scales, zp: zps, axis: axis.max(0) as usize, initializers })
    }

    /// A DequantizeLinear of initializers producing `name`, and whether this node alone reads it.
    fn dequantized(&self, name: &str) -> Option<(usize, Result<QuantConst, String>)> {
        let i = self.producer(name, "DequantizeLinear")?;
        let n = &self.nodes[i];
        if !self.inits.contains_key(n.input[0].as_str()) {
            return None;
        }
        let q = n.input.get(1).ok_or("DequantizeLinear without a scale".to_string()).and_then(|scale| {
            self.quant_const(&n.input[0], scale, n.input.get(2).map(String::as_str), attr_i(n, "axis", 1))
        });
        Some((i, q))
    }

    /// A Conv/Gemm/MatMul's constant weights, fp32 or stored quantized (behind DequantizeLinear or
    /// as a QLinear operator's operands); `out_axis` is the output-channel axis of their shape.
    fn weights(&self, node: &NodeProto, out_axis: usize) -> Result<Weights, String> {
        let quantized = if node.op_type.starts_with("QLinear") {
            let [q, scale, zp] = [3, 4, 5].map(|i| node.input.get(i).map(String::as_str).unwrap_or_default());
            Some((None, self.quant_const(q, scale, Some(zp), out_axis as i64)))
        } else {
            let name = node.input.get(1).ok_or("no weights")?;
            if let Some((shape, values)) = self.init(name) {
                return Ok(Weights {
                    shape,
                    values,
                    scales: None,
                    dequantize_node: None,
                    initializers: vec![name.clone()],
                    k: 0,
                    cout: 0,
                });
            }
            self.dequantized(name)
                .map(|(i, q)| (Some(i).filter(|_| self.consumers[name.as_str()].len() == 1), q))
        };
        let (dequantize_node, q) = quantized.ok_or("weights are not a constant tensor")?;
        let q = q?;
        let (ints, scales) = q.per_channel(out_axis).map_err(|e| format!("weights: {e}"))?;
        if ints.iter().any(|v| !(-127..=127).contains(v)) {
            return Err(
                "quantized weights reach beyond [-127, 127]: the accelerator's weights are symmetric int8"
                    .into(),
            );
        }
        let channels = scales.len();
        let inner: usize = q.shape[out_axis + 1..].iter().product();
        let values =
            ints.iter().enumerate().map(|(i, &v)| v as f32 * scales[(i / inner) % channels]).collect();
        Ok(Weights {
            shape: q.shape,
            values,
            scales: Some(scales),
            dequantize_node,
            initializers: q.initializers,
            k: 0,
            cout: 0,
        })
    }

    /// A bias operand: fp32, stored quantized behind DequantizeLinear, or a QLinearConv's int32
    /// bias (whose scale is input scale × weight scale).
    /// Returns the bias and the DequantizeLinear it claims; adds the initializers it uses to `used`.
    fn bias(
        &self,
        node: &NodeProto,
        ix: usize,
        cout: usize,
        used: &mut Vec<String>,
    ) -> Result<(Bias, Option<usize>), String> {
        let Some(name) = node.input.get(ix).filter(|b| !b.is_empty()) else {
            return Ok((Bias::Real(vec![0.0; cout]), None));
        };
        let mut dequantize_node = None;
        let bias = if let Some((_, v)) = self.init(name) {
            Bias::Real(v)
        } else if node.op_type == "QLinearConv" {
            let (_, q) = self
                .inits
                .get(name.as_str())
                .and_then(|t| ints(t))
                .ok_or("bias is not a constant int32 tensor")?;
            let scale = |ix: usize| {
                self.init(&node.input[ix]).map(|(_, v)| v).filter(|v| v.len() == 1 || v.len() == cout)
            };
            let (xs, ws) = scale(1).zip(scale(4)).ok_or("input or weight scale does not fit the bias")?;
            let scale = (0..cout).map(|c| xs[0] * if ws.len() == 1 { ws[0] } else { ws[c] });
            Bias::Stated { q, scale: scale.collect() }
        } else {
            let (i, q) = self.dequantized(name).ok_or("bias is not a constant tensor")?;
            let q = q?;
            let (q_ints, scale) = q.per_channel(0).map_err(|e| format!("bias: {e}"))?;
            if self.consumers[name.as_str()].len() == 1 {
                dequantize_node = Some(i);
                used.extend(q.initializers);
            }
            Bias::Stated { q: q_ints, scale }
        };
        let len = match &bias {
            Bias::Real(v) => v.len(),
            Bias::Stated { q, scale } => q.len().min(scale.len()),
        };
        if len != cout {
            return Err("bias does not have one value per output channel".into());
        }
        used.push(name.clone());
        Ok((bias, dequantize_node))
    }
}

/// A constant scalar operand of a node (`Clip`'s min and max inputs); `None` when absent.
fn scalar_input(g: &Graph<'_>, node: &NodeProto, ix: usize) -> Result<Option<f32>, String> {
    match node.input.get(ix).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(name) => match g.init(name) {
            Some((_, v)) if v.len() == 1 => Ok(Some(v[0])),
            _ => Err(format!("{name:?} is not a constant fp32 scalar")),
        },
    }
}

/// `Clip`'s bounds: inputs 1 and 2 from opset 11, attributes before.
fn clip_bounds(g: &Graph<'_>, node: &NodeProto) -> Result<(f32, f32), String> {
    let from_attrs = (attr_f(node, "min", f32::NEG_INFINITY), attr_f(node, "max", f32::INFINITY));
    let lo = scalar_input(g, node, 1)?.unwrap_or(from_attrs.0);
    let hi = scalar_input(g, node, 2)?.unwrap_or(from_attrs.1);
    Ok((lo, hi))
}

/// Extends a candidate with a fused activation, if its output's only consumer is a `Relu`, or a
/// `Clip` whose range contains 0 (Relu6 and friends). The output quantization covers the clipped
/// range, so the requantizer's saturation (and, for a lower bound of 0, its ReLU clamp) applies the
/// clip; a `Clip` that excludes 0 would need a bound the accelerator has not got and stays on the
/// CPU.
fn fuse_activation(g: &Graph<'_>, c: &mut Candidate, report: &mut PartitionReport) {
    let (i, clip) = if let Some(i) = g.only_consumer(&c.output, "Relu") {
        (i, None)
    } else if let Some(i) = g.only_consumer(&c.output, "Clip") {
        match clip_bounds(g, &g.nodes[i]) {
            Ok((lo, hi)) if lo <= 0.0 && hi >= 0.0 && lo < hi => (i, Some((lo, hi))),
            Ok((lo, hi)) => {
                report.kept_on_cpu.push(format!(
                    "{}: Clip to [{lo}, {hi}] does not contain 0, so it is not fused",
                    label(&g.nodes[i])
                ));
                return;
            }
            Err(why) => {
                report.kept_on_cpu.push(format!("{}: {why}, so it is not fused", label(&g.nodes[i])));
                return;
            }
        }
    } else {
        return;
    };
    c.relu = clip.is_none_or(|(lo, _)| lo == 0.0);
    c.clip = clip;
    c.nodes.push(label(&g.nodes[i]));
    c.node_indices.push(i);
    c.used_initializers.extend(g.nodes[i].input[1..].iter().filter(|s| !s.is_empty()).cloned());
    c.output = g.nodes[i].output[0].clone();
}

/// The output range to quantize for: the calibrated range, widened to a fused Clip's finite bounds
/// (as TFLite does for Relu6) unless a bound is far outside what calibration saw, where it would
/// only cost resolution.
fn output_range(c: &Candidate, (olo, ohi): (f32, f32)) -> (f32, f32) {
    let lo = if c.relu { 0.0 } else { olo };
    match c.clip {
        None => (lo, ohi),
        Some((clo, chi)) => {
            let span = (ohi - olo).max(f32::EPSILON);
            let lo = if !c.relu && clo.is_finite() && olo - clo <= span { clo } else { lo };
            let hi = if chi.is_finite() && chi - ohi <= span { chi } else { ohi };
            (lo, hi)
        }
    }
}

/// The Conv (or QLinearConv) at node `i`, with a following BatchNormalization folded into fp32
/// weights.
fn conv_candidate(g: &Graph<'_>, i: usize) -> Result<Candidate, String> {
    let n = &g.nodes[i];
    if attr_i(n, "group", 1) != 1 {
        return Err("grouped convolution".into());
    }
    if attr(n, "auto_pad").is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET") {
        return Err("auto_pad".into());
    }
    let qlinear = n.op_type == "QLinearConv";
    let mut w = g.weights(n, 0)?;
    if w.shape.len() != 4 {
        return Err("only 2-D convolution".into());
    }
    let (cout, cin, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
    let mut used = w.initializers.clone();
    let (mut bias, bias_node) = g.bias(n, if qlinear { 8 } else { 2 }, cout, &mut used)?;
    let strides = attr_ints(n, "strides", &[1, 1]);
    let pads = attr_ints(n, "pads", &[0, 0, 0, 0]);
    let dil = attr_ints(n, "dilations", &[1, 1]);
    if strides.len() != 2 || pads.len() != 4 || dil.len() != 2 {
        return Err("only 2-D convolution".into());
    }
    let k = cin * kh * kw;
    let mut folded = None;
    // Fold a following BatchNormalization into fp32 weights and bias (quantized weights keep
    // their stated values, so a BatchNormalization after them stays on the CPU).
    if let (Some(bi), Bias::Real(b), None) =
        (g.only_consumer(&n.output[0], "BatchNormalization"), &mut bias, &w.scales)
    {
        let bn = &g.nodes[bi];
        let get = |k: usize| bn.input.get(k).and_then(|name| g.init(name)).map(|(_, v)| v);
        if let (Some(gamma), Some(beta), Some(mean), Some(var)) = (get(1), get(2), get(3), get(4))
            && [&gamma, &beta, &mean, &var].iter().all(|v| v.len() == cout)
        {
            let eps = attr_f(bn, "epsilon", 1e-5);
            for c in 0..cout {
                let scale = gamma[c] / (var[c] + eps).sqrt();
                for x in &mut w.values[c * k..(c + 1) * k] {
                    *x *= scale;
                }
                b[c] = (b[c] - mean[c]) * scale + beta[c];
            }
            folded = Some(bi);
        }
    }
    // [cout, cin·kh·kw] -> [K, cout]: the order (ci, ky, kx) matches the host's im2col.
    w.values = transpose(&w.values, cout, k);
    (w.k, w.cout) = (k, cout);
    let op = LayerOp::Conv {
        kernel: [kh, kw],
        strides: [strides[0] as usize, strides[1] as usize],
        pads: [pads[0] as usize, pads[1] as usize, pads[2] as usize, pads[3] as usize],
        dilations: [dil[0] as usize, dil[1] as usize],
    };
    let mut c = Candidate::new(g, i, op, cin, w, bias);
    c.used_initializers = used;
    c.node_indices.extend(bias_node);
    if let Some(bi) = folded {
        let bn = &g.nodes[bi];
        c.nodes.push(label(bn));
        c.node_indices.push(bi);
        c.output = bn.output[0].clone();
        c.used_initializers.extend(bn.input[1..].iter().cloned());
    }
    Ok(c)
}

/// `[rows, cols]` row-major to `[cols, rows]`.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// The Gemm, MatMul (with a following Add of a constant bias) or QLinearMatMul at node `i`.
fn gemm_candidate(g: &Graph<'_>, i: usize) -> Result<Candidate, String> {
    let n = &g.nodes[i];
    let trans_b = n.op_type == "Gemm" && attr_i(n, "transB", 0) == 1;
    if n.op_type == "Gemm"
        && (attr_f(n, "alpha", 1.0) != 1.0 || attr_f(n, "beta", 1.0) != 1.0 || attr_i(n, "transA", 0) != 0)
    {
        return Err("Gemm with alpha/beta ≠ 1 or transA".into());
    }
    let mut w = g.weights(n, if trans_b { 0 } else { 1 })?;
    if w.shape.len() != 2 {
        return Err("weights are not a matrix".into());
    }
    let (k, cout) = if trans_b { (w.shape[1], w.shape[0]) } else { (w.shape[0], w.shape[1]) };
    if trans_b {
        w.values = transpose(&w.values, cout, k);
    }
    (w.k, w.cout) = (k, cout);
    let mut used = w.initializers.clone();
    let (bias, bias_node) = if n.op_type == "Gemm" {
        g.bias(n, 2, cout, &mut used)?
    } else {
        (Bias::Real(vec![0.0; cout]), None)
    };
    let mut c = Candidate::new(g, i, LayerOp::Gemm, k, w, bias);
    c.node_indices.extend(bias_node);
    if n.op_type == "MatMul"
        && let Some(ai) = g.only_consumer(&c.output, "Add")
    {
        let add = &g.nodes[ai];
        let other = add.input.iter().find(|x| **x != c.output).cloned().unwrap_or_default();
        if let Ok((bias, bias_node)) =
            g.bias(add, add.input.iter().position(|x| *x == other).unwrap_or(1), cout, &mut used)
        {
            c.bias = bias;
            c.node_indices.extend(bias_node);
            c.nodes.push(label(add));
            c.node_indices.push(ai);
            c.output = add.output[0].clone();
        }
    }
    c.used_initializers = used;
    Ok(c)
}

/// Reads the quantization a QDQ model states around a Conv/Gemm/MatMul: a DequantizeLinear
/// producing its input, a QuantizeLinear taking its output (after any fused activation). The
/// QuantizeLinear→DequantizeLinear pairs are claimed when nothing else reads them, so the
/// accelerator's own quantization replaces them (which gives the same integers).
fn qdq_activations(g: &Graph<'_>, c: &mut Candidate, claimed: &HashSet<usize>) {
    let free = |i: usize, tensor: &str| {
        !claimed.contains(&i)
            && !g.outputs.contains(tensor)
            && g.consumers.get(tensor).is_some_and(|v| v.len() == 1)
    };
    if let Some(dq) = g.producer(&c.input, "DequantizeLinear")
        && !g.inits.contains_key(g.nodes[dq].input[0].as_str())
        && let Ok(stated) = g.stated(&g.nodes[dq], 1, 2)
    {
        c.in_q = Some(stated);
        let q_in = &g.nodes[dq].input[0];
        if let Some(q) = g.producer(q_in, "QuantizeLinear")
            && g.stated(&g.nodes[q], 1, 2) == Ok(stated)
            && free(dq, &c.input)
            && free(q, q_in)
        {
            c.nodes.extend([label(&g.nodes[q]), label(&g.nodes[dq])]);
            c.node_indices.extend([q, dq]);
            c.input = g.nodes[q].input[0].clone();
        }
    }
    if let Some(q) = g.only_consumer(&c.output, "QuantizeLinear")
        && let Ok(stated) = g.stated(&g.nodes[q], 1, 2)
        && stated.applies(c.relu, c.clip)
    {
        c.out_q = Some(stated);
        let q_out = &g.nodes[q].output[0];
        if let Some(dq) = g.only_consumer(q_out, "DequantizeLinear")
            && g.stated(&g.nodes[dq], 1, 2) == Ok(stated)
            && free(q, &c.output)
        {
            c.nodes.extend([label(&g.nodes[q]), label(&g.nodes[dq])]);
            c.node_indices.extend([q, dq]);
            c.output = g.nodes[dq].output[0].clone();
        }
    }
}

/// Connects a QLinearConv/QLinearMatMul, whose input and output are integer tensors, to the
/// accelerator's float boundary: a QuantizeLinear feeding it (or a DequantizeLinear reading it)
/// with the same parameters is claimed; otherwise the host graph gets a DequantizeLinear before
/// the layer (or a QuantizeLinear after it), which round-trips exactly.
fn qlinear_activations(g: &Graph<'_>, c: &mut Candidate, claimed: &HashSet<usize>) -> Result<(), String> {
    let n = &g.nodes[c.node_indices[0]];
    let (x, y) = (n.input[0].clone(), n.output[0].clone());
    let in_q = g.stated(n, 1, 2)?;
    let out_q = g.stated(n, 6, 7)?;
    (c.in_q, c.out_q) = (Some(in_q), Some(out_q));
    let sole =
        |tensor: &str| !g.outputs.contains(tensor) && g.consumers.get(tensor).is_some_and(|v| v.len() == 1);
    match g.producer(&x, "QuantizeLinear") {
        Some(q) if !claimed.contains(&q) && sole(&x) && g.stated(&g.nodes[q], 1, 2) == Ok(in_q) => {
            c.nodes.push(label(&g.nodes[q]));
            c.node_indices.push(q);
            c.input = g.nodes[q].input[0].clone();
        }
        _ => {
            c.input = format!("{x}__kiln_dequantized");
            c.pre = Some(boundary(n, "DequantizeLinear", [&x, &n.input[1], &n.input[2]], &c.input));
            c.probe_in = Some((x, in_q));
        }
    }
    match g.only_consumer(&y, "DequantizeLinear") {
        Some(dq) if g.stated(&g.nodes[dq], 1, 2) == Ok(out_q) => {
            c.nodes.push(label(&g.nodes[dq]));
            c.node_indices.push(dq);
            c.output = g.nodes[dq].output[0].clone();
        }
        _ => {
            c.output = format!("{y}__kiln_float");
            c.post = Some(boundary(n, "QuantizeLinear", [&c.output, &n.input[6], &n.input[7]], &y));
            c.probe_out = Some((y, out_q));
        }
    }
    Ok(())
}

/// A QuantizeLinear/DequantizeLinear the host graph runs beside QLinear layer `n`.
fn boundary(n: &NodeProto, op_type: &str, input: [&String; 3], output: &str) -> NodeProto {
    NodeProto {
        name: format!("{}__kiln_{op_type}", label(n)),
        op_type: op_type.into(),
        input: input.map(String::clone).to_vec(),
        output: vec![output.to_string()],
        ..Default::default()
    }
}

/// A stated weight scale, or a power-of-two multiple of it when the stated bias would overflow
/// the accumulator's ±2^30 (as a dead channel's does: weights that quantize to 0 on a tiny scale,
/// beside a real bias). The multiple is taken only when every integer weight of the channel
/// divides by it exactly, so no product changes.
fn stated_weight_scale(c: &Candidate, col: usize, stated: f32, in_scale: f32) -> f32 {
    let ints: Vec<i64> =
        (0..c.k).map(|kk| (c.weights[kk * c.cout + col] / stated).round_ties_even() as i64).collect();
    let fits = |sw: f32| {
        c.bias.in_accumulator_units(col, f64::from(in_scale) * f64::from(sw)).abs() < f64::from(1u32 << 30)
    };
    (0..32)
        .map(|j| (j, stated * (1u64 << j) as f32))
        .take_while(|&(j, _)| ints.iter().all(|w| w % (1i64 << j) == 0))
        .find(|&(_, sw)| fits(sw))
        .map_or(stated, |(_, sw)| sw)
}

/// Asymmetric int8 parameters covering `[lo, hi]` (always including 0).
fn activation_params(lo: f32, hi: f32) -> (f32, i8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = ((hi - lo) / 255.0).max(1e-8);
    let zp = (-128.0 - lo / scale).round().clamp(-128.0, 127.0) as i8;
    (scale, zp)
}

fn tensor_to_tract(t: &NamedTensor) -> Result<Tensor, CompileError> {
    if t.tensor.datatype() != DataType::Fp32 {
        return Err(CompileError::Calibration(format!(
            "input {:?} is {}, calibration data must be FP32",
            t.name,
            t.tensor.datatype()
        )));
    }
    let v = t.tensor.to_vec::<f32>().map_err(|e| CompileError::Calibration(e.to_string()))?;
    Tensor::from_shape(t.tensor.shape(), &v).map_err(|e| CompileError::Calibration(e.to_string()))
}

/// A tensor's shape and fp32 values.
type Values = (Vec<usize>, Vec<f32>);

/// Runs the fp32 model on the calibration inputs; returns the requested tensors by name.
fn run_float(
    proto: &ModelProto,
    model_dir: Option<&str>,
    calibration: &[NamedTensor],
    wanted: &[String],
) -> Result<HashMap<String, Values>, CompileError> {
    let onnx = tract_onnx::onnx();
    // Intermediate shapes recorded with a symbolic batch (as quantizers write them) would not
    // unify with the calibration batch; tract infers them anyway.
    let mut proto = proto.clone();
    if let Some(g) = proto.graph.as_mut() {
        g.value_info.clear();
    }
    let mut model = onnx
        .parse(&proto, model_dir)
        .map_err(|e| CompileError::Model(format!("tract cannot read the model: {e}")))?
        .model;
    let info = OnnxInfo::parse(&proto.encode_to_vec()).map_err(|e| CompileError::Model(e.to_string()))?;
    let mut inputs: TVec<tract_onnx::prelude::TValue> = tvec![];
    for (ix, decl) in info.inputs.iter().enumerate() {
        let given = calibration
            .iter()
            .find(|t| t.name == decl.name)
            .ok_or_else(|| CompileError::Calibration(format!("no data for model input {:?}", decl.name)))?;
        if let Some(spec) = decl.to_spec()
            && !spec.accepts_shape(given.tensor.shape())
        {
            return Err(CompileError::Calibration(format!(
                "input {:?} has shape {:?}, the model expects {}",
                decl.name,
                given.tensor.shape(),
                kiln_runtime_core::format_shape(&spec.shape)
            )));
        }
        let t = tensor_to_tract(given)?;
        model
            .set_input_fact(ix, InferenceFact::dt_shape(f32::datum_type(), t.shape()))
            .map_err(|e| CompileError::Model(e.to_string()))?;
        inputs.push(t.into_tvalue());
    }
    if let Some(extra) = calibration.iter().find(|t| !info.inputs.iter().any(|d| d.name == t.name)) {
        return Err(CompileError::Calibration(format!("{:?} is not an input of the model", extra.name)));
    }
    let outlets = wanted
        .iter()
        .map(|name| {
            // Node outputs carry their ONNX names as labels; graph inputs are nodes of that name.
            model
                .find_outlet_label(name)
                .or_else(|| {
                    model.node_by_name(name).ok().map(|n| tract_onnx::prelude::OutletId::new(n.id, 0))
                })
                .ok_or_else(|| CompileError::Model(format!("no tensor {name:?} in tract's graph")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    model.select_output_outlets(&outlets).map_err(|e| CompileError::Model(e.to_string()))?;
    let plan = model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| CompileError::Model(format!("tract cannot run the model: {e:#}")))?;
    let out = plan.run(inputs).map_err(|e| CompileError::Calibration(format!("running the model: {e}")))?;
    let mut result = HashMap::new();
    for (name, v) in wanted.iter().zip(out) {
        let t = v.cast_to::<f32>().map_err(|e| CompileError::Model(e.to_string()))?;
        let view = t.try_as_plain_ram().map_err(|e| CompileError::Model(e.to_string()))?;
        let data = view.as_slice::<f32>().map_err(|e| CompileError::Model(e.to_string()))?.to_vec();
        result.insert(name.clone(), (t.shape().to_vec(), data));
    }
    Ok(result)
}

use tract_onnx::prelude::Datum;

/// The SQNR recorded for a layer whose output equals the reference exactly (JSON has no infinity).
pub const EXACT_SQNR_DB: f64 = 999.0;

fn sqnr_db(reference: &[f32], approx: &[f32]) -> f64 {
    let signal: f64 = reference.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let noise: f64 = reference.iter().zip(approx).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum();
    if noise == 0.0 { f64::INFINITY } else { 10.0 * (signal / noise).log10() }
}

/// Synthetic inputs of batch 1 (zeros of each declared shape), for the tensor shapes of a model
/// compiled without calibration data.
fn shape_probe_inputs(model: &[u8]) -> Result<Vec<NamedTensor>, CompileError> {
    let info = OnnxInfo::parse(model).map_err(|e| CompileError::Model(e.to_string()))?;
    info.inputs
        .iter()
        .map(|decl| {
            let spec = decl.to_spec().filter(|s| s.datatype == DataType::Fp32).ok_or_else(|| {
                CompileError::Calibration(format!(
                    "input {:?} is not an FP32 tensor of known rank; give --calibration DATA",
                    decl.name
                ))
            })?;
            let shape: Vec<usize> = spec.shape.iter().map(|&d| if d < 0 { 1 } else { d as usize }).collect();
            let zeros = vec![0f32; shape.iter().product()];
            let t = kiln_runtime_core::Tensor::from_vec(shape, zeros)
                .map_err(|e| CompileError::Model(e.to_string()))?;
            Ok(NamedTensor::new(decl.name.clone(), t))
        })
        .collect()
}

/// Compiles `model` (the bytes of an ONNX file: fp32, or already quantized in QDQ or QLinear
/// form) with `calibration` inputs. Calibration may be empty when the model states every claimed
/// layer's quantization; the report then carries no SQNR.
pub fn compile(
    model: &[u8],
    model_dir: Option<&str>,
    calibration: &[NamedTensor],
) -> Result<AcceleratorImage, CompileError> {
    let proto =
        ModelProto::decode(model).map_err(|e| CompileError::Model(format!("not an ONNX model: {e}")))?;
    for t in calibration {
        if let TensorData::Strings(_) = t.tensor.data() {
            return Err(CompileError::Calibration(format!(
                "input {:?}: BYTES calibration data cannot be quantized",
                t.name
            )));
        }
    }
    let g = Graph::new(&proto)?;
    let mut report = PartitionReport::default();
    let mut candidates = Vec::new();
    let mut claimed: HashSet<usize> = HashSet::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if claimed.contains(&i) || !n.domain.is_empty() {
            continue;
        }
        let c = match n.op_type.as_str() {
            "Conv" | "QLinearConv" => conv_candidate(&g, i),
            "Gemm" | "MatMul" | "QLinearMatMul" => gemm_candidate(&g, i),
            _ => continue,
        };
        let c = c.and_then(|mut c| {
            if n.op_type.starts_with("QLinear") {
                qlinear_activations(&g, &mut c, &claimed)?;
            } else {
                fuse_activation(&g, &mut c, &mut report);
                qdq_activations(&g, &mut c, &claimed);
            }
            Ok(c)
        });
        match c {
            Ok(c) => {
                if c.k > MAX_K {
                    report.kept_on_cpu.push(format!(
                        "{}: K = {} exceeds the accelerator's {MAX_K}",
                        label(n),
                        c.k
                    ));
                    continue;
                }
                if c.node_indices.iter().any(|i| claimed.contains(i)) {
                    report.kept_on_cpu.push(format!("{}: overlaps a layer already claimed", label(n)));
                    continue;
                }
                claimed.extend(c.node_indices.iter().copied());
                candidates.push(c);
            }
            Err(why) => report.kept_on_cpu.push(format!("{}: {why}", label(n))),
        }
    }
    if candidates.is_empty() {
        let quantized: BTreeSet<String> =
            g.nodes
                .iter()
                .filter(|n| {
                    ["ConvInteger", "MatMulInteger", "QGemm", "DynamicQuantizeLinear"]
                        .contains(&n.op_type.as_str())
                })
                .map(|n| {
                    if n.domain.is_empty() {
                        n.op_type.clone()
                    } else {
                        format!("{}:{}", n.domain, n.op_type)
                    }
                })
                .collect();
        if !quantized.is_empty() {
            report.kept_on_cpu.push(format!(
                "{} are not read (QDQ, QLinearConv and QLinearMatMul are); compile the fp32 model with --calibration",
                quantized.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        let why = if report.kept_on_cpu.is_empty() {
            String::new()
        } else {
            format!(" ({})", report.kept_on_cpu.join("; "))
        };
        return Err(CompileError::NoSubgraph(why));
    }

    // Calibration: every candidate's input and output (the source model's tensors, dequantized
    // when they are integers), for the ranges a model does not state and for SQNR.
    let uncalibrated: Vec<String> =
        candidates.iter().filter(|c| c.needs_calibration()).map(|c| c.nodes.join(" + ")).collect();
    let measured = !calibration.is_empty();
    if !measured && !uncalibrated.is_empty() {
        return Err(CompileError::Calibration(format!(
            "none given, and the model does not quantize the input or output of {}; give --calibration DATA \
             (a V2 inputs JSON, as for `kiln predict --input`)",
            uncalibrated.join(", ")
        )));
    }
    let probes: Vec<[(String, Option<Stated>); 2]> =
        candidates.iter().map(|c| [c.probe(false), c.probe(true)]).collect();
    let wanted: Vec<String> = probes.iter().flat_map(|p| p.iter().map(|(t, _)| t.clone())).collect();
    let synthetic;
    let inputs = if measured {
        calibration
    } else {
        synthetic = shape_probe_inputs(model)?;
        &synthetic[..]
    };
    let mut values = run_float(&proto, model_dir, inputs, &wanted)?;
    for (t, q) in probes.iter().flatten() {
        if let (Some(q), Some((_, v))) = (q, values.get_mut(t)) {
            v.iter_mut().for_each(|x| *x = q.dequantize(*x));
        }
    }
    let range = |name: &str| {
        let (_, v) = &values[name];
        v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
    };

    let mut header = new_header(format!("{:x}", Sha256::digest(model)));
    let mut payload = Vec::new();
    let mut accepted = Vec::new();
    for (c, [(probe_in, _), (probe_out, _)]) in candidates.into_iter().zip(probes) {
        let (in_scale, in_zp) = match c.in_q {
            Some(q) => (q.scale, q.zp),
            None => {
                let (lo, hi) = range(&probe_in);
                activation_params(lo, hi)
            }
        };
        let (out_scale, out_zp) = match c.out_q {
            Some(q) => (q.scale, q.zp),
            None => {
                let (lo, hi) = output_range(&c, range(&probe_out));
                activation_params(lo, hi)
            }
        };
        let mut wq = vec![0u8; c.k * c.cout];
        let mut weight_scales = vec![0f32; c.cout];
        let mut bias = vec![0i32; c.cout];
        let mut requant = Vec::with_capacity(c.cout);
        let mut reject = None;
        for col in 0..c.cout {
            let sw = match &c.weight_scales {
                Some(stated) => stated_weight_scale(&c, col, stated[col], in_scale),
                None => {
                    let maxabs = (0..c.k).map(|kk| c.weights[kk * c.cout + col].abs()).fold(0f32, f32::max);
                    // A (nearly) dead channel has a tiny weight scale, and its bias would overflow
                    // the accumulator; a floor on the scale keeps the bias in range (those weights
                    // round to 0, as they are negligible anyway).
                    let floor = c.bias.real(col).abs() as f32 / (in_scale * (1u32 << 29) as f32);
                    if maxabs > 0.0 { (maxabs / 127.0).max(floor) } else { floor.max(1.0) }
                }
            };
            weight_scales[col] = sw;
            for kk in 0..c.k {
                wq[kk * c.cout + col] =
                    (c.weights[kk * c.cout + col] / sw).round_ties_even().clamp(-127.0, 127.0) as i8 as u8;
            }
            let b = c.bias.in_accumulator_units(col, f64::from(in_scale) * f64::from(sw));
            if b.abs() >= f64::from(1u32 << 30) {
                reject = Some(format!("bias of channel {col} does not fit the accumulator"));
                break;
            }
            bias[col] = b as i32;
            match quantize_multiplier(f64::from(in_scale) * f64::from(sw) / f64::from(out_scale)) {
                Some(rq) => requant.push(rq),
                None => {
                    reject = Some(format!(
                        "requantization scale of channel {col} is ≥ 1, which the accelerator cannot encode"
                    ));
                    break;
                }
            }
        }
        if let Some(why) = reject {
            report.kept_on_cpu.push(format!("{}: {why}", c.nodes.join(" + ")));
            continue;
        }
        let weights_offset = payload.len();
        payload.extend_from_slice(&wq);
        let rows_per_sample = match &c.op {
            LayerOp::Gemm => 1,
            LayerOp::Conv { .. } => {
                let (out_shape, _) = &values[&probe_out];
                out_shape.get(2).copied().unwrap_or(1) * out_shape.get(3).copied().unwrap_or(1)
            }
        };
        header.layers.push(AccelLayer {
            replaces: c.nodes.clone(),
            op: c.op.clone(),
            cin: c.cin,
            cout: c.cout,
            k: c.k,
            in_scale,
            in_zp,
            out_scale,
            out_zp,
            relu: c.relu,
            weights_offset,
            bias,
            requant,
            weight_scales,
            sqnr_db: None,
            macs_per_row: (c.k * c.cout) as u64,
        });
        report.accelerated_macs += (rows_per_sample * c.k * c.cout) as u64;
        accepted.push((c, probe_in, probe_out));
    }
    if accepted.is_empty() {
        return Err(CompileError::NoSubgraph(format!(" ({})", report.kept_on_cpu.join("; "))));
    }

    // Host graph: each claimed subgraph becomes one KilnAccel node, placed where its main operator
    // was (its input is computed before that), with any integer-boundary nodes around it.
    let mut host = proto.clone();
    let graph = host.graph.as_mut().ok_or_else(|| CompileError::Model("no graph".into()))?;
    let replaced: HashSet<usize> =
        accepted.iter().flat_map(|(c, ..)| c.node_indices.iter().copied()).collect();
    let at: HashMap<usize, usize> =
        accepted.iter().enumerate().map(|(li, (c, ..))| (c.node_indices[0], li)).collect();
    let mut nodes = Vec::with_capacity(graph.node.len());
    for (i, n) in graph.node.iter().enumerate() {
        if let Some(&li) = at.get(&i) {
            let (c, ..) = &accepted[li];
            nodes.extend(c.pre.clone());
            nodes.push(NodeProto {
                name: format!("kiln_accel_{li}"),
                op_type: crate::op::OP_TYPE.into(),
                domain: crate::op::DOMAIN.into(),
                input: vec![c.input.clone()],
                output: vec![c.output.clone()],
                attribute: vec![AttributeProto {
                    name: "layer".into(),
                    i: li as i64,
                    r#type: 2,
                    ..Default::default()
                }],
                ..Default::default()
            });
            nodes.extend(c.post.clone());
        } else if !replaced.contains(&i) {
            nodes.push(n.clone());
        }
    }
    for n in nodes.iter().filter(|n| n.domain != crate::op::DOMAIN) {
        *report.cpu_ops.entry(n.op_type.clone()).or_default() += 1;
    }
    report.accelerated_nodes = replaced.len();
    graph.node = nodes;
    // Weights that moved to the accelerator leave the host graph.
    let still_used: HashSet<String> = graph.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    let moved: HashSet<String> =
        accepted.iter().flat_map(|(c, ..)| c.used_initializers.iter().cloned()).collect();
    graph.initializer.retain(|t| !moved.contains(&t.name) || still_used.contains(&t.name));
    host.opset_import.push(OperatorSetIdProto { domain: crate::op::DOMAIN.into(), version: 1 });
    let host_bytes = host.encode_to_vec();
    header.host_graph = (payload.len(), host_bytes.len());
    payload.extend_from_slice(&host_bytes);
    header.report = report;

    // The bit-exact emulator runs each layer; with calibration data, its SQNR against the source
    // model's own output of that layer (fp32, or dequantized for a quantized model). The host
    // graph must load in tract, or the image would fail only when served.
    let draft = Arc::new(AcceleratorImage::new(header.clone(), payload.clone()));
    let runtime =
        AccelRuntime::new(Arc::new(EmulatedDevice::new(2)), Arc::clone(&draft), Duration::from_secs(60))
            .map_err(|e| CompileError::Model(e.to_string()))?;
    for (li, (_, probe_in, probe_out)) in accepted.iter().enumerate().filter(|_| measured) {
        let (shape, input) = &values[probe_in];
        let (_, reference) = &values[probe_out];
        let (approx, _) = runtime.run_layer(li, shape, input).map_err(CompileError::Model)?;
        header.layers[li].sqnr_db = Some(sqnr_db(reference, &approx).min(EXACT_SQNR_DB));
    }
    let mut onnx = tract_onnx::onnx();
    crate::op::register(&mut onnx.op_register);
    let host_path = std::path::Path::new(model_dir.unwrap_or(".")).join("host.onnx");
    let host_file = kiln_runtime_core::ModelFile::from_bytes(host_path, draft.host_graph().to_vec());
    crate::op::with_runtime(Arc::new(runtime), || {
        kiln_runtime_tract::TractSession::load_with(
            &host_file,
            &kiln_runtime_core::LoadOptions::default(),
            &onnx,
        )
    })
    .map_err(|e| {
        let hint = if g.nodes.iter().any(|n| !n.domain.is_empty()) {
            "; quantized forms read: QDQ, QLinearConv, QLinearMatMul"
        } else {
            ""
        };
        CompileError::Model(format!("the operators left on the CPU cannot run in tract: {e}{hint}"))
    })?;
    Ok(AcceleratorImage::new(header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_parameters_cover_the_range_and_zero() {
        let (s, zp) = activation_params(-1.0, 3.0);
        assert!((s - 4.0 / 255.0).abs() < 1e-6);
        assert_eq!(((0.0 / s).round() + f32::from(zp)) as i32, i32::from(zp));
        let (_, zp) = activation_params(0.0, 5.0);
        assert_eq!(zp, -128);
        let (s, _) = activation_params(0.0, 0.0);
        assert!(s > 0.0);
    }

    #[test]
    fn uint8_activations_map_onto_int8_without_changing_a_value() {
        let q = Stated { scale: 0.5, zp: -125, unsigned: true }; // 3 - 128
        // uint8 value 7 with zero point 3 is 2.0; read as f32 from the model's tensor.
        assert_eq!(q.dequantize(7.0), 2.0);
        let s = Stated { scale: 0.5, zp: 3, unsigned: false };
        assert_eq!(s.dequantize(7.0), 2.0);
    }

    #[test]
    fn a_stated_output_applies_a_clip_only_at_the_edge_of_its_range() {
        // 0.1 per step, zero point -28: the grid covers [-10, 15.5].
        let q = Stated { scale: 0.1, zp: -28, unsigned: false };
        assert!(q.applies(true, None));
        assert!(q.applies(false, Some((-20.0, 20.0))), "bounds beyond the range: saturation clips");
        assert!(q.applies(true, Some((0.0, 15.5))), "Relu and the top of the range");
        assert!(!q.applies(true, Some((0.0, 6.0))), "Relu6 inside the range needs its own bound");
        assert!(!q.applies(false, Some((-1.0, 20.0))), "a lower bound inside the range");
    }

    #[test]
    fn a_stated_bias_is_kept_when_its_scale_is_the_accumulators() {
        let unit = f64::from(0.02f32) * f64::from(0.003f32);
        let b = Bias::Stated { q: vec![1_000_000_007], scale: vec![0.02f32 * 0.003f32] };
        assert_eq!(b.in_accumulator_units(0, unit), 1_000_000_007.0, "not re-rounded through f32");
        let b = Bias::Stated { q: vec![1000], scale: vec![2.0 * 0.02f32 * 0.003f32] };
        assert_eq!(b.in_accumulator_units(0, unit), 2000.0, "another scale is converted");
        assert_eq!(Bias::Real(vec![0.3]).in_accumulator_units(0, 0.1), 3.0);
    }

    #[test]
    fn quantized_constants_are_read_per_tensor_or_per_output_channel() {
        let c = QuantConst {
            shape: vec![2, 3],
            q: vec![1, 2, 3, 4, 5, 6],
            scale: vec![0.5, 0.25, 2.0],
            zp: vec![0, 1, 0],
            axis: 1,
            initializers: vec![],
        };
        let (ints, scales) = c.per_channel(1).unwrap();
        assert_eq!(ints, [1, 1, 3, 4, 4, 6]);
        assert_eq!(scales, [0.5, 0.25, 2.0]);
        assert!(c.per_channel(0).unwrap_err().contains("neither per tensor nor per output channel"));
        let per_tensor = QuantConst { scale: vec![0.5], zp: vec![0], ..c };
        assert_eq!(per_tensor.per_channel(0).unwrap().1, [0.5, 0.5]);
        let zero = QuantConst { scale: vec![0.0], ..per_tensor };
        assert!(zero.per_channel(0).is_err());
    }

    #[test]
    fn a_dead_channels_scale_grows_by_powers_of_two_only_when_its_weights_divide() {
        let mut c = Candidate {
            nodes: vec![],
            node_indices: vec![0],
            input: String::new(),
            output: String::new(),
            op: LayerOp::Gemm,
            cin: 2,
            // K = 2, cout = 2: column 0 is dead (all zero), column 1 holds 4 and -8 steps.
            weights: vec![0.0, 4e-8, 0.0, -8e-8],
            weight_scales: Some(vec![1e-8, 1e-8]),
            bias: Bias::Real(vec![0.5, 0.5]),
            k: 2,
            cout: 2,
            relu: false,
            clip: None,
            used_initializers: vec![],
            in_q: None,
            out_q: None,
            probe_in: None,
            probe_out: None,
            pre: None,
            post: None,
        };
        // 0.5 / (0.01 × 1e-8) = 5e9 accumulator units: beyond ±2^30 at the stated scale.
        let dead = stated_weight_scale(&c, 0, 1e-8, 0.01);
        assert!(dead > 1e-8 && 0.5 / (0.01 * f64::from(dead)) < f64::from(1u32 << 30), "{dead}");
        // Weights 4 and -8 divide by 4, not by 8: the scale may grow 4x, which is not enough, so
        // it stays as stated (and the layer is refused for its bias).
        assert_eq!(stated_weight_scale(&c, 1, 1e-8, 0.01), 1e-8);
        c.bias = Bias::Real(vec![0.5, 0.001]);
        assert_eq!(stated_weight_scale(&c, 1, 1e-8, 0.01), 1e-8, "a bias that fits keeps the scale");
    }

    #[test]
    fn sqnr() {
        assert!(sqnr_db(&[1.0, 2.0], &[1.0, 2.0]).is_infinite());
        assert!((sqnr_db(&[1.0, 0.0], &[0.9, 0.0]) - 20.0).abs() < 1e-5);
    }
}
