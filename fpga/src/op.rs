//! The host graph's `kiln.fpga:Accel` node as a tract operator: tract runs every CPU operator of
//! the model and calls this op, which runs one accelerated layer on the device.

use std::sync::Arc;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::expandable::{Expansion, expand};

use crate::runtime::AccelRuntime;

/// The operator type written into host graphs.
pub const OP_TYPE: &str = "KilnAccel";
/// Its domain.
pub const DOMAIN: &str = "kiln.fpga";

/// One accelerated layer, evaluated on the device.
#[derive(Clone, Debug)]
pub struct AccelOp {
    /// Layer index in the image.
    pub layer: usize,
    /// The loaded image and device.
    pub runtime: Arc<AccelRuntime>,
}

impl PartialEq for AccelOp {
    fn eq(&self, other: &Self) -> bool {
        self.layer == other.layer && Arc::ptr_eq(&self.runtime, &other.runtime)
    }
}
impl Eq for AccelOp {}

impl std::hash::Hash for AccelOp {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.layer.hash(state);
        self.runtime.image().digest.hash(state);
    }
}

impl Op for AccelOp {
    fn name(&self) -> StaticName {
        format!("KilnAccel#{}", self.layer).into()
    }

    op_as_typed_op!();
}

impl EvalOp for AccelOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs[0].cast_to::<f32>()?;
        let view = input.try_as_plain_ram()?;
        let data = view.as_slice::<f32>()?;
        let (out, shape) = self.runtime.run_layer(self.layer, input.shape(), data).map_err(|e| anyhow!(e))?;
        Ok(tvec!(Tensor::from_shape(&shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for AccelOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let layer = &self.runtime.image().header.layers[self.layer];
        let shape = &inputs[0].shape;
        let out: TVec<TDim> = match &layer.op {
            crate::image::LayerOp::Gemm => tvec![shape[0].clone(), layer.cout.to_dim()],
            crate::image::LayerOp::Conv { .. } => {
                let h = shape[2].to_usize()?;
                let w = shape[3].to_usize()?;
                let concrete =
                    AccelRuntime::output_shape(layer, &[1, layer.cin, h, w]).map_err(|e| anyhow!(e))?;
                tvec![shape[0].clone(), layer.cout.to_dim(), concrete[2].to_dim(), concrete[3].to_dim()]
            }
        };
        Ok(tvec!(f32::fact(out)))
    }

    as_op!();
}

/// Registers `KilnAccel` in an ONNX operator register. tract's register takes plain function
/// pointers, so the builder finds the loaded runtime through [`with_runtime`].
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert(OP_TYPE, build);
}

thread_local! {
    static PARSING: std::cell::RefCell<Option<Arc<AccelRuntime>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (parsing a host graph) with `runtime` bound for the `KilnAccel` builder.
pub fn with_runtime<T>(runtime: Arc<AccelRuntime>, f: impl FnOnce() -> T) -> T {
    PARSING.with(|p| *p.borrow_mut() = Some(runtime));
    let out = f();
    PARSING.with(|p| *p.borrow_mut() = None);
    out
}

fn build(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let layer = node
        .attribute
        .iter()
        .find(|a| a.name == "layer")
        .map(|a| a.i as usize)
        .ok_or_else(|| anyhow!("KilnAccel node {} has no layer attribute", node.name))?;
    let runtime = PARSING
        .with(|p| p.borrow().clone())
        .ok_or_else(|| anyhow!("KilnAccel found outside an accelerator image load"))?;
    if layer >= runtime.image().header.layers.len() {
        bail!(
            "KilnAccel node {} names layer {layer}, the image has {}",
            node.name,
            runtime.image().header.layers.len()
        );
    }
    Ok((expand(AccelExpansion { op: AccelOp { layer, runtime } }), vec![]))
}

/// The inference-time face of [`AccelOp`]: shape rules, then the typed op.
#[derive(Clone, Debug)]
struct AccelExpansion {
    op: AccelOp,
}

impl Expansion for AccelExpansion {
    fn name(&self) -> StaticName {
        Op::name(&self.op)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        let layer = &self.op.runtime.image().header.layers[self.op.layer];
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[1], layer.cout.to_dim())?;
        match &layer.op {
            crate::image::LayerOp::Gemm => s.equals(&outputs[0].rank, 2),
            crate::image::LayerOp::Conv { .. } => {
                s.equals(&outputs[0].rank, 4)?;
                s.given_2(&inputs[0].shape[2], &inputs[0].shape[3], move |s, h, w| {
                    let (h, w) = (h.to_usize()?, w.to_usize()?);
                    let shape =
                        AccelRuntime::output_shape(layer, &[1, layer.cin, h, w]).map_err(|e| anyhow!(e))?;
                    s.equals(&outputs[0].shape[2], shape[2].to_dim())?;
                    s.equals(&outputs[0].shape[3], shape[3].to_dim())
                })
            }
        }
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.op.clone(), inputs)
    }
}
