//! The compiler/partitioner: from an fp32 ONNX model and calibration data to an accelerator image.
//!
//! 1. Claims the supported subgraph: `Conv` (2-D, group 1, with a following `BatchNormalization`
//!    folded into its weights), `Gemm` (alpha = beta = 1, transA = 0) and `MatMul` with constant
//!    weights (and a following `Add` of a constant bias), each with a following `Relu`, or `Clip`
//!    whose range contains 0 (Relu6), fused.
//! 2. Runs the fp32 model in tract on the calibration data to record every claimed layer's input
//!    and output ranges.
//! 3. Quantizes per the numerics contract: int8 asymmetric activations, int8 symmetric
//!    per-channel weights, int32 bias, per-channel multiplier and shift. A layer whose numbers do
//!    not fit (K beyond the buffers, scale ≥ 1, bias out of range) stays on the CPU, with the
//!    reason in the report.
//! 4. Writes the host graph: the model with each claimed subgraph replaced by one
//!    `kiln.fpga:KilnAccel` node, for tract to run around the accelerator.
//! 5. Measures each layer's SQNR on the calibration data through the bit-exact emulator.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
    bias: Vec<f32>,
    k: usize,
    cout: usize,
    relu: bool,
    /// A fused Clip's bounds.
    clip: Option<(f32, f32)>,
    used_initializers: Vec<String>,
}

struct Graph<'a> {
    nodes: &'a [NodeProto],
    inits: HashMap<&'a str, &'a TensorProto>,
    consumers: HashMap<&'a str, Vec<usize>>,
    outputs: HashSet<&'a str>,
}

impl<'a> Graph<'a> {
    fn new(proto: &'a ModelProto) -> Result<Self, CompileError> {
        let g = proto.graph.as_ref().ok_or_else(|| CompileError::Model("the model has no graph".into()))?;
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for input in &n.input {
                consumers.entry(input.as_str()).or_default().push(i);
            }
        }
        Ok(Graph {
            nodes: &g.node,
            inits: g.initializer.iter().map(|t| (t.name.as_str(), t)).collect(),
            consumers,
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

    fn init(&self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        self.inits.get(name).and_then(|t| floats(t))
    }

    /// The constant fp32 weights of a Conv/Gemm/MatMul, or why not. Weights produced by
    /// DequantizeLinear mean an already-quantized (QDQ) model, which is said so.
    fn weights(&self, node: &NodeProto) -> Result<(Vec<usize>, Vec<f32>), String> {
        let name = node.input.get(1).ok_or("no weights")?;
        if let Some(w) = self.init(name) {
            return Ok(w);
        }
        let dequantized =
            self.nodes.iter().any(|p| p.output.iter().any(|o| o == name) && p.op_type == "DequantizeLinear");
        Err(if dequantized {
            "weights come from DequantizeLinear: models already quantized (QDQ/QLinear) are not read; compile the fp32 model with --calibration".into()
        } else {
            "weights are not a constant fp32 tensor".into()
        })
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

fn conv_candidate(g: &Graph<'_>, i: usize) -> Result<Candidate, String> {
    let n = &g.nodes[i];
    if attr_i(n, "group", 1) != 1 {
        return Err("grouped convolution".into());
    }
    if attr(n, "auto_pad").is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET") {
        return Err("auto_pad".into());
    }
    let (wshape, w) = g.weights(n)?;
    if wshape.len() != 4 {
        return Err("only 2-D convolution".into());
    }
    let (cout, cin, kh, kw) = (wshape[0], wshape[1], wshape[2], wshape[3]);
    let mut bias = match n.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => g.init(b).ok_or("bias is not a constant fp32 tensor")?.1,
        None => vec![0.0; cout],
    };
    let strides = attr_ints(n, "strides", &[1, 1]);
    let pads = attr_ints(n, "pads", &[0, 0, 0, 0]);
    let dil = attr_ints(n, "dilations", &[1, 1]);
    if strides.len() != 2 || pads.len() != 4 || dil.len() != 2 {
        return Err("only 2-D convolution".into());
    }
    let mut w = w;
    let mut nodes = vec![label(n)];
    let mut node_indices = vec![i];
    let mut output = n.output[0].clone();
    let mut used = n.input[1..].iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>();
    // Fold a following BatchNormalization into the weights and bias.
    if let Some(bi) = g.only_consumer(&output, "BatchNormalization") {
        let bn = &g.nodes[bi];
        let get = |k: usize| bn.input.get(k).and_then(|name| g.init(name)).map(|(_, v)| v);
        if let (Some(gamma), Some(beta), Some(mean), Some(var)) = (get(1), get(2), get(3), get(4))
            && [&gamma, &beta, &mean, &var].iter().all(|v| v.len() == cout)
        {
            let eps = attr_f(bn, "epsilon", 1e-5);
            for c in 0..cout {
                let scale = gamma[c] / (var[c] + eps).sqrt();
                for x in &mut w[c * cin * kh * kw..(c + 1) * cin * kh * kw] {
                    *x *= scale;
                }
                bias[c] = (bias[c] - mean[c]) * scale + beta[c];
            }
            nodes.push(label(bn));
            node_indices.push(bi);
            output = bn.output[0].clone();
            used.extend(bn.input[1..].iter().cloned());
        }
    }
    let k = cin * kh * kw;
    // [cout, cin·kh·kw] -> [K, cout]: the order (ci, ky, kx) matches the host's im2col.
    let mut weights = vec![0f32; k * cout];
    for c in 0..cout {
        for kk in 0..k {
            weights[kk * cout + c] = w[c * k + kk];
        }
    }
    Ok(Candidate {
        nodes,
        node_indices,
        input: n.input[0].clone(),
        output,
        op: LayerOp::Conv {
            kernel: [kh, kw],
            strides: [strides[0] as usize, strides[1] as usize],
            pads: [pads[0] as usize, pads[1] as usize, pads[2] as usize, pads[3] as usize],
            dilations: [dil[0] as usize, dil[1] as usize],
        },
        cin,
        weights,
        bias,
        k,
        cout,
        relu: false,
        clip: None,
        used_initializers: used,
    })
}

fn gemm_candidate(g: &Graph<'_>, i: usize) -> Result<Candidate, String> {
    let n = &g.nodes[i];
    let (wshape, w) = g.weights(n)?;
    if wshape.len() != 2 {
        return Err("weights are not a matrix".into());
    }
    let mut used = vec![n.input[1].clone()];
    let (k, cout, weights) = if n.op_type == "Gemm" {
        if attr_f(n, "alpha", 1.0) != 1.0 || attr_f(n, "beta", 1.0) != 1.0 || attr_i(n, "transA", 0) != 0 {
            return Err("Gemm with alpha/beta ≠ 1 or transA".into());
        }
        if attr_i(n, "transB", 0) == 1 {
            let (cout, k) = (wshape[0], wshape[1]);
            let mut t = vec![0f32; k * cout];
            for c in 0..cout {
                for kk in 0..k {
                    t[kk * cout + c] = w[c * k + kk];
                }
            }
            (k, cout, t)
        } else {
            (wshape[0], wshape[1], w)
        }
    } else {
        (wshape[0], wshape[1], w)
    };
    let mut output = n.output[0].clone();
    let mut nodes = vec![label(n)];
    let mut node_indices = vec![i];
    let mut bias = vec![0f32; cout];
    if n.op_type == "Gemm" {
        if let Some(b) = n.input.get(2).filter(|b| !b.is_empty()) {
            let (_, v) = g.init(b).ok_or("bias is not a constant fp32 tensor")?;
            if v.len() != cout {
                return Err("bias does not have one value per output".into());
            }
            bias = v;
            used.push(b.clone());
        }
    } else if let Some(ai) = g.only_consumer(&output, "Add") {
        let add = &g.nodes[ai];
        let other = add.input.iter().find(|x| **x != output).cloned().unwrap_or_default();
        if let Some((_, v)) = g.init(&other).filter(|(_, v)| v.len() == cout) {
            bias = v;
            used.push(other);
            nodes.push(label(add));
            node_indices.push(ai);
            output = add.output[0].clone();
        }
    }
    Ok(Candidate {
        nodes,
        node_indices,
        input: n.input[0].clone(),
        output,
        op: LayerOp::Gemm,
        cin: k,
        weights,
        bias,
        k,
        cout,
        relu: false,
        clip: None,
        used_initializers: used,
    })
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
    let mut model = onnx
        .parse(proto, model_dir)
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
        .map_err(|e| CompileError::Model(format!("tract cannot run the model: {e}")))?;
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

fn sqnr_db(reference: &[f32], approx: &[f32]) -> f64 {
    let signal: f64 = reference.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let noise: f64 = reference.iter().zip(approx).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum();
    if noise == 0.0 { f64::INFINITY } else { 10.0 * (signal / noise).log10() }
}

/// Compiles `model` (the bytes of an fp32 ONNX file) with `calibration` inputs.
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
            "Conv" => conv_candidate(&g, i),
            "Gemm" | "MatMul" => gemm_candidate(&g, i),
            _ => continue,
        };
        match c {
            Ok(mut c) => {
                fuse_activation(&g, &mut c, &mut report);
                if c.k > MAX_K {
                    report.kept_on_cpu.push(format!(
                        "{}: K = {} exceeds the accelerator's {MAX_K}",
                        label(n),
                        c.k
                    ));
                    continue;
                }
                claimed.extend(c.node_indices.iter().copied());
                candidates.push(c);
            }
            Err(why) => report.kept_on_cpu.push(format!("{}: {why}", label(n))),
        }
    }
    if candidates.is_empty() {
        let quantized: BTreeSet<&str> = g
            .nodes
            .iter()
            .map(|n| n.op_type.as_str())
            .filter(|op| ["QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"].contains(op))
            .collect();
        if !quantized.is_empty() {
            report.kept_on_cpu.push(format!(
                "{}: models already quantized (QDQ/QLinear) are not read; compile the fp32 model with --calibration",
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

    // Calibration: ranges of every candidate's input and output.
    let wanted: Vec<String> = candidates.iter().flat_map(|c| [c.input.clone(), c.output.clone()]).collect();
    let values = run_float(&proto, model_dir, calibration, &wanted)?;
    let range = |name: &str| {
        let (_, v) = &values[name];
        v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
    };

    let mut header = new_header(format!("{:x}", Sha256::digest(model)));
    let mut payload = Vec::new();
    let mut accepted = Vec::new();
    for c in candidates {
        let (ilo, ihi) = range(&c.input);
        let (olo, ohi) = range(&c.output);
        let (in_scale, in_zp) = activation_params(ilo, ihi);
        let (lo, hi) = output_range(&c, (olo, ohi));
        let (out_scale, out_zp) = activation_params(lo, hi);
        let mut wq = vec![0u8; c.k * c.cout];
        let mut weight_scales = vec![0f32; c.cout];
        let mut bias = vec![0i32; c.cout];
        let mut requant = Vec::with_capacity(c.cout);
        let mut reject = None;
        for col in 0..c.cout {
            let maxabs = (0..c.k).map(|kk| c.weights[kk * c.cout + col].abs()).fold(0f32, f32::max);
            // A (nearly) dead channel has a tiny weight scale, and its bias would overflow the
            // accumulator; a floor on the scale keeps the bias in range (those weights round to 0,
            // as they are negligible anyway).
            let floor = c.bias[col].abs() / (in_scale * (1u32 << 29) as f32);
            let sw = if maxabs > 0.0 { (maxabs / 127.0).max(floor) } else { floor.max(1.0) };
            weight_scales[col] = sw;
            for kk in 0..c.k {
                wq[kk * c.cout + col] =
                    (c.weights[kk * c.cout + col] / sw).round_ties_even().clamp(-127.0, 127.0) as i8 as u8;
            }
            let b = (f64::from(c.bias[col]) / (f64::from(in_scale) * f64::from(sw))).round_ties_even();
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
        let (in_shape, _) = &values[&c.input];
        let rows_per_sample = match &c.op {
            LayerOp::Gemm => 1,
            LayerOp::Conv { .. } => {
                let (out_shape, _) = &values[&c.output];
                out_shape.get(2).copied().unwrap_or(1) * out_shape.get(3).copied().unwrap_or(1)
            }
        };
        let _ = in_shape;
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
            sqnr_db: 0.0,
            macs_per_row: (c.k * c.cout) as u64,
        });
        report.accelerated_macs += (rows_per_sample * c.k * c.cout) as u64;
        accepted.push(c);
    }
    if accepted.is_empty() {
        return Err(CompileError::NoSubgraph(format!(" ({})", report.kept_on_cpu.join("; "))));
    }

    // Host graph: each claimed subgraph becomes one KilnAccel node.
    let mut host = proto.clone();
    let graph = host.graph.as_mut().ok_or_else(|| CompileError::Model("no graph".into()))?;
    let replaced: HashSet<usize> = accepted.iter().flat_map(|c| c.node_indices.iter().copied()).collect();
    let first_of: BTreeMap<usize, usize> =
        accepted.iter().enumerate().map(|(li, c)| (*c.node_indices.iter().min().unwrap_or(&0), li)).collect();
    let mut nodes = Vec::with_capacity(graph.node.len());
    for (i, n) in graph.node.iter().enumerate() {
        if let Some(&li) = first_of.get(&i) {
            let c = &accepted[li];
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
        } else if !replaced.contains(&i) {
            nodes.push(n.clone());
            *report.cpu_ops.entry(n.op_type.clone()).or_default() += 1;
        }
    }
    report.accelerated_nodes = replaced.len();
    graph.node = nodes;
    // Weights that moved to the accelerator leave the host graph.
    let still_used: HashSet<String> = graph.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    let moved: HashSet<String> = accepted.iter().flat_map(|c| c.used_initializers.iter().cloned()).collect();
    graph.initializer.retain(|t| !moved.contains(&t.name) || still_used.contains(&t.name));
    host.opset_import.push(OperatorSetIdProto { domain: crate::op::DOMAIN.into(), version: 1 });
    let host_bytes = host.encode_to_vec();
    header.host_graph = (payload.len(), host_bytes.len());
    payload.extend_from_slice(&host_bytes);
    header.report = report;

    // SQNR of each layer through the bit-exact emulator, against the fp32 outputs.
    let draft = Arc::new(AcceleratorImage::new(header.clone(), payload.clone()));
    let runtime =
        AccelRuntime::new(Arc::new(EmulatedDevice::new(2)), Arc::clone(&draft), Duration::from_secs(60))
            .map_err(|e| CompileError::Model(e.to_string()))?;
    for (li, c) in accepted.iter().enumerate() {
        let (shape, input) = &values[&c.input];
        let (_, reference) = &values[&c.output];
        let (approx, _) = runtime.run_layer(li, shape, input).map_err(CompileError::Model)?;
        header.layers[li].sqnr_db = sqnr_db(reference, &approx);
    }
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
    fn sqnr() {
        assert!(sqnr_db(&[1.0, 2.0], &[1.0, 2.0]).is_infinite());
        assert!((sqnr_db(&[1.0, 0.0], &[0.9, 0.0]) - 20.0).abs() < 1e-5);
    }
}
