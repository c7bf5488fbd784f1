//! Host side of an accelerated layer: quantize the input at the partition boundary, lower
//! convolutions to GEMM (im2col), cut the GEMM into 8×8 tiles, run them on the device's compute
//! units (weights resident on the device since load), and dequantize the result.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::device::{BufferId, Device, DeviceError, TileCommand, pack_requant};
use crate::image::{AccelLayer, AcceleratorImage, LayerOp};
use crate::numerics::{ARRAY_COLS, ARRAY_ROWS, TileQuant, TileShape};

/// Counters of accelerator work, process-wide, for `/metrics` and benchmarks.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// Modelled compute-unit cycles of completed commands.
    pub cycles: AtomicU64,
    /// MACs of completed commands.
    pub macs: AtomicU64,
    /// Commands (tiles) completed.
    pub tiles: AtomicU64,
    /// Bytes moved by DMA to and from devices.
    pub dma_bytes: AtomicU64,
    /// Commands that failed or timed out.
    pub failures: AtomicU64,
}

/// The process-wide telemetry.
pub fn telemetry() -> &'static Telemetry {
    static T: std::sync::OnceLock<Telemetry> = std::sync::OnceLock::new();
    T.get_or_init(Telemetry::default)
}

/// Weights of one layer's column block, resident on the device.
struct ColumnBlock {
    col0: usize,
    c: usize,
    w: BufferId,
    bias: BufferId,
    requant: BufferId,
}

/// An image loaded on a device, with every layer's weights uploaded.
pub struct AccelRuntime {
    device: Arc<dyn Device>,
    image: Arc<AcceleratorImage>,
    blocks: Vec<Vec<ColumnBlock>>,
    timeout: Duration,
}

impl std::fmt::Debug for AccelRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccelRuntime").field("image", &self.image.digest).finish()
    }
}

/// Round half to even, as the quantizer does on the host.
fn round_even(x: f32) -> f32 {
    x.round_ties_even()
}

/// Quantizes activations at the partition boundary.
pub fn quantize(x: &[f32], scale: f32, zp: i8) -> Vec<i8> {
    x.iter().map(|&v| (round_even(v / scale) + f32::from(zp)).clamp(-128.0, 127.0) as i8).collect()
}

impl AccelRuntime {
    /// Loads the image and uploads every layer's weights, bias and requantization, column block
    /// by column block.
    pub fn new(
        device: Arc<dyn Device>,
        image: Arc<AcceleratorImage>,
        timeout: Duration,
    ) -> Result<Self, DeviceError> {
        device.load_image(&image)?;
        let mut blocks = Vec::new();
        for (li, layer) in image.header.layers.iter().enumerate() {
            let weights = image.weights(li);
            let mut layer_blocks = Vec::new();
            for col0 in (0..layer.cout).step_by(ARRAY_COLS) {
                let c = (layer.cout - col0).min(ARRAY_COLS);
                let mut w = Vec::with_capacity(layer.k * c);
                for kk in 0..layer.k {
                    w.extend_from_slice(&weights[kk * layer.cout + col0..kk * layer.cout + col0 + c]);
                }
                let wb = device.alloc(w.len())?;
                device.write(wb, 0, &w)?;
                let bias: Vec<u8> = layer.bias[col0..col0 + c].iter().flat_map(|b| b.to_le_bytes()).collect();
                let bb = device.alloc(bias.len())?;
                device.write(bb, 0, &bias)?;
                let rq = pack_requant(&layer.requant[col0..col0 + c]);
                let rb = device.alloc(rq.len())?;
                device.write(rb, 0, &rq)?;
                layer_blocks.push(ColumnBlock { col0, c, w: wb, bias: bb, requant: rb });
            }
            blocks.push(layer_blocks);
        }
        telemetry().dma_bytes.store(device.dma_bytes(), Ordering::Relaxed);
        Ok(AccelRuntime { device, image, blocks, timeout })
    }

    /// The image.
    pub fn image(&self) -> &AcceleratorImage {
        &self.image
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }

    /// Output shape of a layer for an input shape.
    pub fn output_shape(layer: &AccelLayer, input: &[usize]) -> Result<Vec<usize>, String> {
        match &layer.op {
            LayerOp::Gemm => {
                if input.len() != 2 || input[1] != layer.k {
                    return Err(format!("accelerated Gemm expects [N, {}], got {input:?}", layer.k));
                }
                Ok(vec![input[0], layer.cout])
            }
            LayerOp::Conv { kernel, strides, pads, dilations } => {
                if input.len() != 4 || input[1] != layer.cin {
                    return Err(format!("accelerated Conv expects [N, {}, H, W], got {input:?}", layer.cin));
                }
                let out = |i: usize, axis: usize| -> Result<usize, String> {
                    let padded = input[i] + pads[axis] + pads[axis + 2];
                    let span = dilations[axis] * (kernel[axis] - 1) + 1;
                    if padded < span {
                        return Err(format!("input {input:?} is smaller than the kernel"));
                    }
                    Ok((padded - span) / strides[axis] + 1)
                };
                Ok(vec![input[0], layer.cout, out(2, 0)?, out(3, 1)?])
            }
        }
    }

    /// Lowers the quantized input to the GEMM's A matrix (rows × K).
    fn lower(
        layer: &AccelLayer,
        input_shape: &[usize],
        q: &[i8],
    ) -> Result<(Vec<i8>, usize, Vec<usize>), String> {
        let out_shape = Self::output_shape(layer, input_shape)?;
        match &layer.op {
            LayerOp::Gemm => Ok((q.to_vec(), input_shape[0], out_shape)),
            LayerOp::Conv { kernel, strides, pads, dilations } => {
                let (n, cin, h, w) = (input_shape[0], input_shape[1], input_shape[2], input_shape[3]);
                let (oh, ow) = (out_shape[2], out_shape[3]);
                let k = layer.k;
                let rows = n * oh * ow;
                // Padding is zero in real terms, which is the zero point once quantized.
                let mut a = vec![layer.in_zp; rows * k];
                for b in 0..n {
                    for y in 0..oh {
                        for x in 0..ow {
                            let row = (b * oh + y) * ow + x;
                            let dst = &mut a[row * k..(row + 1) * k];
                            let mut kk = 0;
                            for ci in 0..cin {
                                for ky in 0..kernel[0] {
                                    for kx in 0..kernel[1] {
                                        let iy =
                                            (y * strides[0] + ky * dilations[0]) as isize - pads[0] as isize;
                                        let ix =
                                            (x * strides[1] + kx * dilations[1]) as isize - pads[1] as isize;
                                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                            dst[kk] = q[((b * cin + ci) * h + iy as usize) * w + ix as usize];
                                        }
                                        kk += 1;
                                    }
                                }
                            }
                        }
                    }
                }
                Ok((a, rows, out_shape))
            }
        }
    }

    /// Runs layer `index` on an f32 input; returns the f32 output and its shape.
    pub fn run_layer(
        &self,
        index: usize,
        input_shape: &[usize],
        input: &[f32],
    ) -> Result<(Vec<f32>, Vec<usize>), String> {
        let layer = &self.image.header.layers[index];
        let q = quantize(input, layer.in_scale, layer.in_zp);
        let (a, rows, out_shape) = Self::lower(layer, input_shape, &q)?;
        let k = layer.k;
        let quant = TileQuant { zp_a: layer.in_zp, zp_y: layer.out_zp, relu: layer.relu };
        let dev = &self.device;
        let fault = |e: DeviceError| {
            telemetry().failures.fetch_add(1, Ordering::Relaxed);
            format!("accelerator: {e}")
        };
        let mut y = vec![0i8; rows * layer.cout];
        let mut row0 = 0;
        while row0 < rows {
            let r = (rows - row0).min(ARRAY_ROWS);
            let ab = dev.alloc(r * k).map_err(fault)?;
            let a_bytes: Vec<u8> = a[row0 * k..(row0 + r) * k].iter().map(|&v| v as u8).collect();
            let mut pending = Vec::new();
            let result = (|| -> Result<(), String> {
                dev.write(ab, 0, &a_bytes).map_err(fault)?;
                for block in &self.blocks[index] {
                    let out = dev.alloc(r * block.c).map_err(fault)?;
                    let cmd = TileCommand {
                        shape: TileShape { r, k, c: block.c },
                        quant,
                        a: ab,
                        w: block.w,
                        bias: block.bias,
                        requant: block.requant,
                        out,
                    };
                    match dev.submit(cmd) {
                        Ok(run) => pending.push((run, out, block.col0, block.c)),
                        Err(e) => {
                            dev.free(out);
                            return Err(fault(e));
                        }
                    }
                }
                for (run, out, col0, c) in pending.drain(..) {
                    let report = dev.wait(run, self.timeout);
                    let mut tile = vec![0u8; r * c];
                    let read = report.and_then(|rep| dev.read(out, 0, &mut tile).map(|()| rep));
                    dev.free(out);
                    let rep = read.map_err(fault)?;
                    let t = telemetry();
                    t.cycles.fetch_add(rep.cycles, Ordering::Relaxed);
                    t.macs.fetch_add(rep.macs, Ordering::Relaxed);
                    t.tiles.fetch_add(1, Ordering::Relaxed);
                    for i in 0..r {
                        for j in 0..c {
                            y[(row0 + i) * layer.cout + col0 + j] = tile[i * c + j] as i8;
                        }
                    }
                }
                Ok(())
            })();
            for (_, out, _, _) in pending {
                dev.free(out);
            }
            dev.free(ab);
            result?;
            row0 += r;
        }
        telemetry().dma_bytes.store(dev.dma_bytes(), Ordering::Relaxed);
        let deq = |v: i8| (f32::from(v) - f32::from(layer.out_zp)) * layer.out_scale;
        let out = match &layer.op {
            LayerOp::Gemm => y.into_iter().map(deq).collect(),
            LayerOp::Conv { .. } => {
                // GEMM rows are (n, y, x), columns channels: back to NCHW.
                let (n, c, oh, ow) = (out_shape[0], out_shape[1], out_shape[2], out_shape[3]);
                let mut out = vec![0f32; n * c * oh * ow];
                for b in 0..n {
                    for p in 0..oh * ow {
                        for ch in 0..c {
                            out[(b * c + ch) * oh * ow + p] = deq(y[(b * oh * ow + p) * c + ch]);
                        }
                    }
                }
                out
            }
        };
        Ok((out, out_shape))
    }
}

impl Drop for AccelRuntime {
    fn drop(&mut self) {
        for layer in &self.blocks {
            for b in layer {
                self.device.free(b.w);
                self.device.free(b.bias);
                self.device.free(b.requant);
            }
        }
    }
}
