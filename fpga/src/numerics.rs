//! The numerics contract (`fpga/spec/numerics.md`) in executable form: the golden reference that
//! the emulated device and the RTL compute unit are checked against, bit for bit.

/// Version of the numerics contract; accelerator images record it.
pub const NUMERICS_VERSION: u32 = 1;
/// Rows of the systolic array (R of a tile is at most this).
pub const ARRAY_ROWS: usize = 8;
/// Columns of the systolic array (C of a tile is at most this).
pub const ARRAY_COLS: usize = 8;
/// Depth of the operand buffers: the largest K of one tile.
pub const MAX_K: usize = 4096;
/// Modelled clock of the compute unit.
pub const CLOCK_HZ: u64 = 250_000_000;

/// Requantization of one output channel: `m = multiplier · 2^-(31 + shift)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Requant {
    /// Q0.31 multiplier in [2^30, 2^31).
    pub multiplier: i32,
    /// Extra right shift, 0..=31.
    pub shift: u8,
}

/// The scalar parameters of a tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileShape {
    /// Rows of A and of the output (1..=8).
    pub r: usize,
    /// Reduction length (1..=4096).
    pub k: usize,
    /// Columns of W and of the output (1..=8).
    pub c: usize,
}

/// Quantization parameters shared by the tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileQuant {
    /// Activation zero point.
    pub zp_a: i8,
    /// Output zero point.
    pub zp_y: i8,
    /// Fused ReLU (clamp below at `zp_y`).
    pub relu: bool,
}

/// Requantizes one accumulator: single rounding, arithmetic shift, zero point, clamp.
#[inline]
pub fn requantize(acc: i32, rq: Requant, q: TileQuant) -> i8 {
    let t = 31 + u32::from(rq.shift);
    let p = (i64::from(acc) * i64::from(rq.multiplier) + (1i64 << (t - 1))) >> t;
    let lo = if q.relu { i64::from(q.zp_y) } else { -128 };
    (p + i64::from(q.zp_y)).clamp(lo, 127) as i8
}

/// Checks a tile's shape and parameters against the contract.
pub fn check_tile(shape: TileShape, a: &[i8], w: &[i8], bias: &[i32], rq: &[Requant]) -> Result<(), String> {
    let TileShape { r, k, c } = shape;
    if !(1..=ARRAY_ROWS).contains(&r) || !(1..=ARRAY_COLS).contains(&c) || !(1..=MAX_K).contains(&k) {
        return Err(format!("tile {r}x{k}x{c} exceeds the 8x4096x8 limits"));
    }
    if a.len() != r * k || w.len() != k * c || bias.len() != c || rq.len() != c {
        return Err("tile operand lengths do not match its shape".into());
    }
    if w.contains(&-128) {
        return Err("weights are symmetric int8: -128 is not allowed".into());
    }
    if bias.iter().any(|b| b.unsigned_abs() >= 1 << 30) {
        return Err("bias outside ±2^30".into());
    }
    if rq.iter().any(|q| q.shift > 31 || q.multiplier < (1 << 30)) {
        return Err("requantization multiplier must be in [2^30, 2^31) and shift in 0..=31".into());
    }
    Ok(())
}

/// One tile, as the contract defines it (the golden reference).
pub fn tile(shape: TileShape, a: &[i8], w: &[i8], bias: &[i32], rq: &[Requant], q: TileQuant) -> Vec<i8> {
    let TileShape { r, k, c } = shape;
    let mut out = vec![0i8; r * c];
    for row in 0..r {
        for col in 0..c {
            let mut acc = bias[col];
            for kk in 0..k {
                let x = i32::from(a[row * k + kk]) - i32::from(q.zp_a);
                acc += x * i32::from(w[kk * c + col]);
            }
            out[row * c + col] = requantize(acc, rq[col], q);
        }
    }
    out
}

/// Cycles from `start` to `done` of one tile on the modelled array.
pub fn tile_cycles(shape: TileShape) -> u64 {
    (shape.k + 2 * shape.r + shape.c + 1) as u64
}

/// MACs a tile performs.
pub fn tile_macs(shape: TileShape) -> u64 {
    (shape.r * shape.k * shape.c) as u64
}

/// Encodes a real multiplier `0 < m < 1` as `(M0, shift)`; `None` when it cannot be encoded.
pub fn quantize_multiplier(m: f64) -> Option<Requant> {
    if !(m > 0.0 && m < 1.0) {
        return None;
    }
    let mut shift = 0u8;
    let mut x = m;
    while x < 0.5 {
        x *= 2.0;
        shift += 1;
        if shift > 31 {
            return None;
        }
    }
    let mut q = (x * (1u64 << 31) as f64).round() as i64;
    if q == 1 << 31 {
        // Rounded up to 1.0: renormalise.
        q = 1 << 30;
        if shift == 0 {
            return None;
        }
        shift -= 1;
    }
    Some(Requant { multiplier: q as i32, shift })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_up_for_both_signs() {
        // m = 0.5 exactly: M0 = 2^30, shift = 0.
        let rq = quantize_multiplier(0.5).unwrap();
        assert_eq!(rq, Requant { multiplier: 1 << 30, shift: 0 });
        let q = TileQuant { zp_a: 0, zp_y: 0, relu: false };
        assert_eq!(requantize(5, rq, q), 3); // 2.5 -> 3
        assert_eq!(requantize(-5, rq, q), -2); // -2.5 -> -2
        assert_eq!(requantize(4, rq, q), 2);
        assert_eq!(requantize(1000, rq, q), 127);
        assert_eq!(requantize(-1000, rq, q), -128);
        assert_eq!(requantize(-1000, rq, TileQuant { relu: true, zp_y: -3, ..q }), -3);
    }

    #[test]
    fn multipliers_encode_within_a_ulp() {
        for m in [0.9999, 0.75, 0.5, 0.3, 1e-3, 1e-7, 2.0f64.powi(-20)] {
            let rq = quantize_multiplier(m).unwrap();
            let back = f64::from(rq.multiplier) * 2f64.powi(-(31 + i32::from(rq.shift)));
            assert!((back - m).abs() <= m * 2f64.powi(-30), "{m}: {back}");
            assert!(rq.multiplier >= 1 << 30);
        }
        assert!(quantize_multiplier(1.0).is_none());
        assert!(quantize_multiplier(0.0).is_none());
    }
}
