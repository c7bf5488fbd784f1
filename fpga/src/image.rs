//! The accelerator image: the "FPGA image" of a package. One versioned, hashed file holding the
//! quantized layers the accelerator runs and the host graph (the original ONNX model with those
//! layers replaced by `kiln.fpga:Accel` nodes) that tract runs around them.
//!
//! Layout: `KILNACC1` magic, u32 little-endian header length, the JSON header, then the payload.
//! The header records format and numerics versions, the array size, the source model's digest and
//! the payload's SHA-256; loading re-hashes the payload and refuses any mismatch.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::device::{DeviceError, DeviceInfo};
use crate::numerics::{ARRAY_COLS, ARRAY_ROWS, MAX_K, NUMERICS_VERSION, Requant};

/// Image file magic.
pub const MAGIC: &[u8; 8] = b"KILNACC1";
/// Version of this file format.
pub const FORMAT_VERSION: u32 = 1;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What kind of GEMM a layer is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum LayerOp {
    /// 2-D convolution (group 1) lowered to GEMM by im2col on the host.
    Conv {
        /// Kernel height and width.
        kernel: [usize; 2],
        /// Strides.
        strides: [usize; 2],
        /// Padding: top, left, bottom, right.
        pads: [usize; 4],
        /// Dilations.
        dilations: [usize; 2],
    },
    /// Matrix product with constant weights (Gemm or MatMul).
    Gemm,
}

/// A quantized layer the accelerator runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccelLayer {
    /// ONNX node names it replaces, its Conv/Gemm/MatMul first (then e.g. BatchNormalization,
    /// Relu, and the QuantizeLinear/DequantizeLinear nodes it absorbs).
    pub replaces: Vec<String>,
    /// Its operation.
    pub op: LayerOp,
    /// Input channels (Conv) or features (Gemm).
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Reduction length: cin·kh·kw or features.
    pub k: usize,
    /// Input scale.
    pub in_scale: f32,
    /// Input zero point.
    pub in_zp: i8,
    /// Output scale.
    pub out_scale: f32,
    /// Output zero point.
    pub out_zp: i8,
    /// Fused ReLU.
    pub relu: bool,
    /// Weights, K×cout int8 (row-major), offset into the payload.
    pub weights_offset: usize,
    /// Bias per output channel.
    pub bias: Vec<i32>,
    /// Requantization per output channel.
    pub requant: Vec<Requant>,
    /// Weight scale per output channel (for reports).
    pub weight_scales: Vec<f32>,
    /// Signal-to-quantization-noise ratio on the calibration data, in dB; `None` when compiled
    /// without calibration data (a model that states its own quantization).
    #[serde(default)]
    pub sqnr_db: Option<f64>,
    /// MACs per input row (one output position).
    pub macs_per_row: u64,
}

/// The JSON header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// `kiln-accelerator-image`.
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Numerics contract version.
    pub numerics_version: u32,
    /// Array rows × columns it was compiled for.
    pub array: (usize, usize),
    /// Largest K of a tile it uses.
    pub max_k: usize,
    /// SHA-256 of the source ONNX model.
    pub source_model_sha256: String,
    /// SHA-256 of the payload.
    pub payload_sha256: String,
    /// Offset and length of the host graph (ONNX) in the payload.
    pub host_graph: (usize, usize),
    /// The accelerated layers, in graph order (layer index = position).
    pub layers: Vec<AccelLayer>,
    /// Partition report, for `kiln fpga compile` and `inspect`.
    pub report: PartitionReport,
}

/// Which operators run where.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionReport {
    /// ONNX nodes on the accelerator (folded/fused ones included).
    pub accelerated_nodes: usize,
    /// ONNX nodes on the CPU (tract), by operator type.
    pub cpu_ops: std::collections::BTreeMap<String, usize>,
    /// MACs per sample on the accelerator.
    pub accelerated_macs: u64,
    /// Candidate layers kept on the CPU, with the reason.
    pub kept_on_cpu: Vec<String>,
}

/// A loaded accelerator image.
#[derive(Clone, Debug)]
pub struct AcceleratorImage {
    /// Header.
    pub header: Header,
    /// Payload (weights, host graph).
    pub payload: Vec<u8>,
    /// SHA-256 of the whole file, `sha256:<hex>`: the image's identity.
    pub digest: String,
}

/// Why an image cannot be read or used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not an accelerator image.
    #[error(
        "not a kiln accelerator image ({0}); build one with `kiln fpga compile MODEL --calibration DATA -o IMAGE`"
    )]
    NotAnImage(String),
    /// Corrupt.
    #[error("accelerator image is corrupt: {0}")]
    Corrupt(String),
}

impl AcceleratorImage {
    /// Assembles an image from its header (payload hash filled in) and payload.
    pub fn new(mut header: Header, payload: Vec<u8>) -> Self {
        header.payload_sha256 = hex(&Sha256::digest(&payload));
        let mut img = AcceleratorImage { header, payload, digest: String::new() };
        img.digest = format!("sha256:{}", hex(&Sha256::digest(img.to_bytes())));
        img
    }

    /// Serialises the file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).unwrap_or_default();
        let mut out = Vec::with_capacity(12 + header.len() + self.payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.payload);
        out
    }

    /// True when `bytes` start like an accelerator image.
    pub fn sniff(bytes: &[u8]) -> bool {
        bytes.starts_with(MAGIC)
    }

    /// Parses and verifies a file.
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        if !Self::sniff(bytes) {
            return Err(ImageError::NotAnImage("no KILNACC1 magic".into()));
        }
        let len = bytes
            .get(8..12)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .unwrap_or(usize::MAX);
        let header_bytes = bytes
            .get(12..12usize.saturating_add(len))
            .ok_or_else(|| ImageError::Corrupt("truncated header".into()))?;
        let header: Header =
            serde_json::from_slice(header_bytes).map_err(|e| ImageError::Corrupt(format!("header: {e}")))?;
        if header.format != "kiln-accelerator-image" {
            return Err(ImageError::NotAnImage(format!("format {:?}", header.format)));
        }
        let payload = bytes[12 + len..].to_vec();
        let actual = hex(&Sha256::digest(&payload));
        if actual != header.payload_sha256 {
            return Err(ImageError::Corrupt(format!(
                "payload hashes to {actual}, the header says {}",
                header.payload_sha256
            )));
        }
        let (start, n) = header.host_graph;
        if start.checked_add(n).is_none_or(|e| e > payload.len()) {
            return Err(ImageError::Corrupt("host graph outside the payload".into()));
        }
        for (i, l) in header.layers.iter().enumerate() {
            if l.weights_offset.checked_add(l.k * l.cout).is_none_or(|e| e > payload.len())
                || l.bias.len() != l.cout
                || l.requant.len() != l.cout
            {
                return Err(ImageError::Corrupt(format!("layer {i} does not fit its payload")));
            }
        }
        Ok(AcceleratorImage { header, payload, digest: format!("sha256:{}", hex(&Sha256::digest(bytes))) })
    }

    /// The host graph (ONNX bytes).
    pub fn host_graph(&self) -> &[u8] {
        let (s, n) = self.header.host_graph;
        &self.payload[s..s + n]
    }

    /// A layer's weights (K×cout int8).
    pub fn weights(&self, layer: usize) -> &[u8] {
        let l = &self.header.layers[layer];
        &self.payload[l.weights_offset..l.weights_offset + l.k * l.cout]
    }

    /// Refuses an image built for another array size or numerics version, naming both.
    pub fn check_compatible(&self, device: &DeviceInfo) -> Result<(), DeviceError> {
        let h = &self.header;
        if h.format_version != FORMAT_VERSION {
            return Err(DeviceError::IncompatibleImage(format!(
                "accelerator image format version {} but this kiln reads version {FORMAT_VERSION}",
                h.format_version
            )));
        }
        if h.numerics_version != device.numerics_version {
            return Err(DeviceError::IncompatibleImage(format!(
                "accelerator image uses numerics version {} but the {} device implements version {}; recompile the model",
                h.numerics_version, device.kind, device.numerics_version
            )));
        }
        if h.array != device.array || h.max_k > device.max_k {
            return Err(DeviceError::IncompatibleImage(format!(
                "accelerator image was built for a {}x{} array (K ≤ {}) but the {} device has {}x{} (K ≤ {}); recompile the model",
                h.array.0, h.array.1, h.max_k, device.kind, device.array.0, device.array.1, device.max_k
            )));
        }
        Ok(())
    }
}

/// A fresh header for the current contract.
pub fn new_header(source_sha256: String) -> Header {
    Header {
        format: "kiln-accelerator-image".into(),
        format_version: FORMAT_VERSION,
        numerics_version: NUMERICS_VERSION,
        array: (ARRAY_ROWS, ARRAY_COLS),
        max_k: MAX_K,
        source_model_sha256: source_sha256,
        payload_sha256: String::new(),
        host_graph: (0, 0),
        layers: Vec::new(),
        report: PartitionReport::default(),
    }
}
