//! Test vectors shared by the RTL tests (Verilator co-simulation and the iverilog testbench):
//! a seeded generator and random tiles that mix uniform values with the contract's extremes.
#![allow(dead_code)] // each test binary uses its own part

use kiln_fpga::numerics::{Requant, TileQuant, TileShape};

/// Largest bias magnitude the contract allows.
pub const BIAS_MAX: i32 = (1 << 30) - 1;
/// Smallest multiplier M0 (a Q31 value in [0.5, 1)).
pub const M0_MIN: i32 = 1 << 30;

/// xorshift64*: small and seeded. `for_tile` seeds through splitmix64 so that (seed, index)
/// names one tile.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn for_tile(seed: u64, index: u64) -> Self {
        let mut z = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)).max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    /// True with probability `pct`%.
    pub fn pct(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// One tile's operands, as the numerics contract takes them.
pub struct Tile {
    pub shape: TileShape,
    pub a: Vec<i8>,
    pub w: Vec<i8>,
    pub bias: Vec<i32>,
    pub rq: Vec<Requant>,
    pub q: TileQuant,
}

/// A tile of constant operands: every activation `a`, every weight `w`, every bias `b`, one
/// requantization for all columns. The edge cases (extreme values, extreme multipliers and
/// shifts at the full K) are built from these.
pub fn uniform_tile(shape: TileShape, a: i8, w: i8, b: i32, rq: Requant, q: TileQuant) -> Tile {
    Tile {
        shape,
        a: vec![a; shape.r * shape.k],
        w: vec![w; shape.k * shape.c],
        bias: vec![b; shape.c],
        rq: vec![rq; shape.c],
        q,
    }
}

/// A random tile of the given shape, mixing uniform values with the contract's extremes.
pub fn random_tile(rng: &mut Rng, shape: TileShape) -> Tile {
    let TileShape { r, k, c } = shape;
    let zp_a = match rng.range(0, 3) {
        0 => rng.pick(&[-128i8, 127]),
        1 => 0,
        _ => rng.range(-128, 127) as i8,
    };
    let a_mode = rng.range(0, 3);
    let a = (0..r * k)
        .map(|_| match a_mode {
            0 => rng.pick(&[-128i8, 127]),
            1 => (i64::from(zp_a) + rng.range(-8, 8)).clamp(-128, 127) as i8,
            _ => rng.range(-128, 127) as i8,
        })
        .collect();
    let w_mode = rng.range(0, 3);
    let w = (0..k * c)
        .map(|_| match w_mode {
            0 => rng.pick(&[-127i8, 127]),
            1 => rng.pick(&[-1i8, 0, 1, 0, 5, -127, 127]),
            _ => rng.range(-127, 127) as i8,
        })
        .collect();
    let bias_mode = rng.range(0, 3);
    let bias = (0..c)
        .map(|_| match bias_mode {
            0 => rng.pick(&[-BIAS_MAX, BIAS_MAX, 0]),
            1 => rng.range(-(1 << 15), 1 << 15) as i32,
            _ => rng.range(-i64::from(BIAS_MAX), i64::from(BIAS_MAX)) as i32,
        })
        .collect();
    let q = TileQuant {
        zp_a,
        zp_y: if rng.pct(30) { rng.pick(&[-128i8, 127, 0]) } else { rng.range(-128, 127) as i8 },
        relu: rng.pct(50),
    };
    let mut t = Tile { shape, a, w, bias, rq: Vec::new(), q };
    // Shifts: extremes/uniform, or fitted to the accumulators so that outputs span int8.
    let accs = accumulators(&t);
    let fit = rng.pct(60);
    t.rq = (0..c)
        .map(|col| {
            let multiplier = match rng.range(0, 3) {
                0 => M0_MIN,
                1 => i32::MAX,
                _ => rng.range(i64::from(M0_MIN), i64::from(i32::MAX)) as i32,
            };
            let shift = if fit {
                let max = (0..r).map(|row| accs[row * c + col].unsigned_abs()).max().unwrap_or(0);
                let bits = 32 - max.leading_zeros() as i64;
                (bits - 8 + rng.range(-1, 2)).clamp(0, 31) as u8
            } else {
                let any = rng.range(0, 31) as u8;
                rng.pick(&[0u8, 31, any])
            };
            Requant { multiplier, shift }
        })
        .collect();
    t
}

/// The tile's i32 accumulators (bias included), for fitting shifts and for reports.
pub fn accumulators(t: &Tile) -> Vec<i32> {
    let TileShape { r, k, c } = t.shape;
    let mut out = vec![0i32; r * c];
    for row in 0..r {
        for col in 0..c {
            let mut acc = t.bias[col];
            for kk in 0..k {
                acc += (i32::from(t.a[row * k + kk]) - i32::from(t.q.zp_a)) * i32::from(t.w[kk * c + col]);
            }
            out[row * c + col] = acc;
        }
    }
    out
}
