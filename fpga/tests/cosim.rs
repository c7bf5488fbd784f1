//! Co-simulation of the RTL compute unit (Verilator, `rtl-sim` feature) against the numerics
//! contract's golden reference and the emulated device's engine: seeded random tiles plus the
//! contract's edge cases, every output byte and every tile's cycle count (the emulator's model,
//! `tile_cycles`) compared.
//!
//! `KILN_COSIM_SEED` and `KILN_COSIM_TILES` override the seed and the number of random tiles;
//! a mismatch report names the seed and tile index, which regenerate that exact tile.
#![cfg(feature = "rtl-sim")]

use std::time::Instant;

use kiln_fpga::emulated::emulate_tile;
use kiln_fpga::numerics::{
    ARRAY_COLS, ARRAY_ROWS, MAX_K, Requant, TileQuant, TileShape, tile, tile_cycles, tile_macs,
};
use kiln_fpga::rtl_sim::RtlTile;

mod common;
use common::{BIAS_MAX, M0_MIN, Rng, Tile, accumulators, random_tile, uniform_tile};

const DEFAULT_SEED: u64 = 0x6b69_6c6e_636f_7369;
const DEFAULT_TILES: usize = 100_000;

fn random_shape(rng: &mut Rng) -> TileShape {
    let dim = |rng: &mut Rng, max: usize| {
        if rng.pct(30) { rng.pick(&[1, max]) } else { rng.range(1, max as i64) as usize }
    };
    let r = dim(rng, ARRAY_ROWS);
    let c = dim(rng, ARRAY_COLS);
    let k = match rng.range(0, 9999) {
        0..=4999 => rng.range(1, 8),
        5000..=8999 => rng.range(9, 32),
        9000..=9989 => rng.range(33, 256),
        _ => rng.range(257, MAX_K as i64),
    } as usize;
    TileShape { r, k, c }
}

/// The fixed edge cases: extreme accumulators at K = 4096, K = 1, R/C at 1 and 8, rounding ties.
fn edge_tiles(rng: &mut Rng) -> Vec<Tile> {
    let mut tiles = Vec::new();
    let shape = |r, k, c| TileShape { r, k, c };
    // Largest |acc|: (A - zp_a) = ±255 against W = ±127 over K = 4096, bias at ±(2^30 - 1),
    // through the extreme multipliers and shifts.
    for (a, zp_a) in [(-128i8, 127i8), (127, -128)] {
        for wv in [127i8, -127] {
            for b in [-BIAS_MAX, BIAS_MAX] {
                for (m0, shift) in [(i32::MAX, 31u8), (M0_MIN, 31), (i32::MAX, 0), (M0_MIN, 0)] {
                    for (zp_y, relu) in [(0i8, false), (-128, true), (127, false), (5, true)] {
                        let s = shape(ARRAY_ROWS, MAX_K, ARRAY_COLS);
                        let rq = Requant { multiplier: m0, shift };
                        tiles.push(uniform_tile(s, a, wv, b, rq, TileQuant { zp_a, zp_y, relu }));
                    }
                }
            }
        }
    }
    // Random full-depth tiles of every extreme shape.
    for (r, c) in [(1, 1), (8, 1), (1, 8), (8, 8), (5, 3)] {
        tiles.push(random_tile(rng, shape(r, MAX_K, c)));
        tiles.push(random_tile(rng, shape(r, MAX_K - 1, c)));
    }
    // K = 1 at every R, C.
    for r in 1..=ARRAY_ROWS {
        for c in 1..=ARRAY_COLS {
            for _ in 0..8 {
                tiles.push(random_tile(rng, shape(r, 1, c)));
            }
        }
    }
    // Rounding ties: M0 = 2^30 and shift 0/1 give p = round(acc / 2) or round(acc / 4), half up.
    for shift in [0u8, 1, 2] {
        for zp_y in [-128i8, -1, 0, 127] {
            for relu in [false, true] {
                let s = shape(8, rng.range(1, 3) as usize, 8);
                let mut t = random_tile(rng, s);
                t.w = (0..s.k * s.c).map(|i| if i % 2 == 0 { 1 } else { -1 }).collect();
                t.bias = (0..s.c).map(|_| rng.range(-300, 300) as i32).collect();
                t.rq = vec![Requant { multiplier: M0_MIN, shift }; s.c];
                t.q.zp_y = zp_y;
                t.q.relu = relu;
                tiles.push(t);
            }
        }
    }
    tiles
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v} is not valid")),
        Err(_) => default,
    }
}

/// Runs one tile through the golden reference, the emulated device's engine and the RTL; `Err`
/// describes the first difference.
fn check(sim: &mut RtlTile, t: &Tile) -> Result<u64, String> {
    let want = tile(t.shape, &t.a, &t.w, &t.bias, &t.rq, t.q);
    if emulate_tile(t.shape, &t.a, &t.w, &t.bias, &t.rq, t.q) != want {
        return Err("the emulator differs from the golden reference".into());
    }
    let (got, cycles) = sim.run(t.shape, &t.a, &t.w, &t.bias, &t.rq, t.q)?;
    let expected = tile_cycles(t.shape);
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        let (row, col) = (i / t.shape.c, i % t.shape.c);
        let acc = accumulators(t)[i];
        return Err(format!(
            "y[{row}][{col}] = {}, expected {} (acc {acc}, rq {:?}, {:?})",
            got[i], want[i], t.rq[col], t.q
        ));
    }
    if cycles != expected {
        return Err(format!("{cycles} cycles, expected tile_cycles = {expected}"));
    }
    Ok(cycles)
}

#[test]
fn rtl_matches_the_golden_reference_tile_by_tile() {
    let seed: u64 = env_or("KILN_COSIM_SEED", DEFAULT_SEED);
    let n_random: usize = env_or("KILN_COSIM_TILES", DEFAULT_TILES);
    let t0 = Instant::now();
    let mut sim = RtlTile::new().expect("create the Verilator model");

    let mut tiles_run = 0u64;
    let mut macs = 0u64;
    let mut compute_cycles = 0u64;
    let mut failures: Vec<String> = Vec::new();
    let mut record = |what: String, t: &Tile, res: Result<u64, String>| {
        tiles_run += 1;
        macs += tile_macs(t.shape);
        match res {
            Ok(c) => compute_cycles += c,
            Err(e) => {
                let TileShape { r, k, c } = t.shape;
                let msg = format!("seed {seed:#x}, {what}, shape R={r} K={k} C={c}: {e}");
                if failures.len() < 10 {
                    eprintln!("MISMATCH {msg}");
                }
                failures.push(msg);
            }
        }
    };

    // Edge cases: generated from the seed with the index space above the random tiles.
    for (i, t) in edge_tiles(&mut Rng::for_tile(seed, u64::MAX)).iter().enumerate() {
        let res = check(&mut sim, t);
        record(format!("edge tile {i}"), t, res);
    }
    for i in 0..n_random {
        let mut rng = Rng::for_tile(seed, i as u64);
        let shape = random_shape(&mut rng);
        let t = random_tile(&mut rng, shape);
        let res = check(&mut sim, &t);
        record(format!("tile index {i}"), &t, res);
    }

    let elapsed = t0.elapsed().as_secs_f64();
    println!(
        "cosim: {tiles_run} tiles, {macs} MACs, {compute_cycles} simulated compute cycles \
         ({} including host writes), {} mismatching tiles, seed {seed:#x}, {elapsed:.1} s",
        sim.total_cycles(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {tiles_run} tiles differ from the golden reference; first: {}",
        failures.len(),
        failures[0]
    );
}

#[test]
fn rtl_tile_moves_between_threads_and_rejects_bad_tiles() {
    let mut sim = RtlTile::new().expect("create the Verilator model");
    let shape = TileShape { r: 2, k: 3, c: 2 };
    let a = [1i8, -2, 3, -128, 127, 0];
    let w = [1i8, 2, -3, 4, 127, -127];
    let bias = [10i32, -10];
    let rq = [Requant { multiplier: M0_MIN, shift: 0 }; 2];
    let q = TileQuant { zp_a: -1, zp_y: 3, relu: false };
    let want = tile(shape, &a, &w, &bias, &rq, q);
    let sim = std::thread::spawn(move || {
        let got = sim.run(shape, &a, &w, &bias, &rq, q).expect("tile runs");
        assert_eq!(got, (want, tile_cycles(shape)));
        sim
    })
    .join()
    .expect("thread");
    let mut sim = sim;
    let bad = TileShape { r: 9, k: 1, c: 1 };
    assert!(sim.run(bad, &[0; 9], &[0], &[0], &rq[..1], q).is_err());
    assert!(sim.run(TileShape { r: 1, k: 1, c: 1 }, &[0], &[-128], &[0], &rq[..1], q).is_err());
    // Still usable after rejecting.
    let one = TileShape { r: 1, k: 1, c: 1 };
    let (y, cycles) = sim.run(one, &[5], &[1], &[0], &rq[..1], q).expect("tile runs");
    assert_eq!(y, tile(one, &[5], &[1], &[0], &rq[..1], q));
    assert_eq!(cycles, tile_cycles(one));
}
