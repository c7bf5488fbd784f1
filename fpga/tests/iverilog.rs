//! The RTL compute unit under Icarus Verilog: golden vectors from `kiln_fpga::numerics` (seeded
//! random tiles plus the contract's edge cases) are replayed by the self-checking testbench
//! `fpga/rtl/tb/gemm_tile_tb.v`, which compares every output byte and every tile's cycle count.
//! A missing iverilog fails this test; it never skips.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kiln_fpga::numerics::{MAX_K, Requant, TileQuant, TileShape, check_tile, tile, tile_cycles};

mod common;
use common::{BIAS_MAX, M0_MIN, Rng, Tile, random_tile, uniform_tile};

const SEED: u64 = 0x6b69_6c6e_5254_4c31;
/// Random tiles on top of the fixed edge cases (iverilog simulates ~10k cycles/s of this design).
const RANDOM_TILES: usize = 1000;

fn random_shape(rng: &mut Rng) -> TileShape {
    let dim = |rng: &mut Rng| if rng.pct(30) { rng.pick(&[1, 8]) } else { rng.range(1, 8) as usize };
    let r = dim(rng);
    let c = dim(rng);
    let k = match rng.range(0, 99) {
        0..=39 => rng.range(1, 8),
        40..=89 => rng.range(9, 64),
        _ => rng.range(65, 300),
    } as usize;
    TileShape { r, k, c }
}

/// The fixed edge cases: extreme accumulators at K = 4096, K = 1, R/C at 1 and 8, rounding ties.
fn edge_tiles(rng: &mut Rng) -> Vec<Tile> {
    let mut tiles = Vec::new();
    let full = |r, k, c| TileShape { r, k, c };
    // Largest |acc|: (A - zp_a) = ±255 against W = ±127 over K = 4096, bias at ±(2^30 - 1).
    for (a, zp_a, wv, b, m0, shift, relu) in [
        (-128i8, 127i8, 127i8, -BIAS_MAX, i32::MAX, 0u8, false),
        (127, -128, 127, BIAS_MAX, i32::MAX, 31, false),
        (127, -128, -127, -BIAS_MAX, M0_MIN, 31, true),
        (-128, 127, -127, BIAS_MAX, i32::MAX, 31, false),
    ] {
        let s = full(8, MAX_K, 8);
        let rq = Requant { multiplier: m0, shift };
        tiles.push(uniform_tile(s, a, wv, b, rq, TileQuant { zp_a, zp_y: 0, relu }));
    }
    // Random full-depth tiles.
    tiles.push(random_tile(rng, full(8, MAX_K, 8)));
    tiles.push(random_tile(rng, full(3, MAX_K - 1, 5)));
    // Degenerate and full shapes with K = 1.
    for (r, c) in [(1, 1), (8, 1), (1, 8), (8, 8)] {
        for _ in 0..4 {
            tiles.push(random_tile(rng, full(r, 1, c)));
        }
    }
    // Rounding ties: M0 = 2^30, shift 0/1 makes p = round(acc / 2) or round(acc / 4), half up.
    for shift in [0u8, 1] {
        for zp_y in [-128i8, 0, 127] {
            let s = full(8, 1, 8);
            let mut t = random_tile(rng, s);
            t.w = (0..s.c).map(|i| if i % 2 == 0 { 1 } else { -1 }).collect();
            t.bias = (0..s.c).map(|_| rng.range(-64, 64) as i32).collect();
            t.rq = vec![Requant { multiplier: M0_MIN, shift }; s.c];
            t.q.zp_y = zp_y;
            tiles.push(t);
        }
    }
    tiles
}

fn tiles() -> Vec<Tile> {
    let mut rng = Rng::new(SEED);
    let mut tiles = edge_tiles(&mut rng);
    for _ in 0..RANDOM_TILES {
        let s = random_shape(&mut rng);
        tiles.push(random_tile(&mut rng, s));
    }
    tiles
}

/// Serialises the tiles and their golden outputs into the testbench's vectors.hex format.
fn vectors(tiles: &[Tile]) -> (String, usize) {
    let mut words: Vec<u64> = vec![tiles.len() as u64];
    for t in tiles {
        let TileShape { r, k, c } = t.shape;
        check_tile(t.shape, &t.a, &t.w, &t.bias, &t.rq).expect("generated tile is valid");
        let y = tile(t.shape, &t.a, &t.w, &t.bias, &t.rq, t.q);
        let cfg = r as u64
            | (c as u64) << 4
            | (k as u64) << 8
            | u64::from(t.q.zp_a as u8) << 24
            | u64::from(t.q.zp_y as u8) << 32
            | u64::from(t.q.relu) << 40;
        words.push(cfg);
        words.push(tile_cycles(t.shape));
        words.extend(t.bias.iter().map(|&b| u64::from(b as u32)));
        words.extend(t.rq.iter().map(|q| u64::from(q.multiplier as u32) | u64::from(q.shift) << 32));
        for kk in 0..k {
            words.push(pack((0..r).map(|row| t.a[row * k + kk])));
        }
        for kk in 0..k {
            words.push(pack((0..c).map(|col| t.w[kk * c + col])));
        }
        for row in 0..r {
            words.push(pack(y[row * c..(row + 1) * c].iter().copied()));
        }
    }
    let mut text = String::with_capacity(words.len() * 17);
    for w in &words {
        writeln!(text, "{w:016x}").expect("write to string");
    }
    (text, words.len())
}

/// Byte i of the word is the i-th int8.
fn pack(bytes: impl Iterator<Item = i8>) -> u64 {
    bytes.enumerate().fold(0, |acc, (i, b)| acc | u64::from(b as u8) << (8 * i))
}

fn rtl_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rtl")
}

fn run(cmd: &mut Command, what: &str) -> std::process::Output {
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{what} not found: install iverilog (scripts/setup test installs it)")
        }
        Err(e) => panic!("running {what}: {e}"),
    }
}

#[test]
fn rtl_matches_the_numerics_contract_under_iverilog() {
    let t0 = Instant::now();
    let tiles = tiles();
    let macs: u64 = tiles.iter().map(|t| (t.shape.r * t.shape.k * t.shape.c) as u64).sum();
    let (text, nwords) = vectors(&tiles);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("vectors.hex"), text).expect("write vectors");

    let rtl = rtl_dir();
    let sim = dir.path().join("gemm_tile_tb.vvp");
    let out = run(
        Command::new("iverilog")
            .args(["-g2005", "-Wall", "-s", "gemm_tile_tb"])
            .arg(format!("-Pgemm_tile_tb.NWORDS={nwords}"))
            .arg("-o")
            .arg(&sim)
            .arg(rtl.join("tb/gemm_tile_tb.v"))
            .arg(rtl.join("gemm_tile.v"))
            .arg(rtl.join("gemm_tile_pe.v"))
            .arg(rtl.join("gemm_tile_requant.v")),
        "iverilog",
    );
    let diag = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iverilog failed:\n{diag}");
    assert!(diag.trim().is_empty(), "iverilog warnings:\n{diag}");

    let out = run(Command::new("vvp").arg("-n").arg(&sim).current_dir(dir.path()), "vvp");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let verdict = stdout.lines().find(|l| l.starts_with("PASS") || l.starts_with("FAIL"));
    println!(
        "iverilog: {} tiles, {macs} MACs, {:.1} s; testbench: {}",
        tiles.len(),
        t0.elapsed().as_secs_f64(),
        verdict.unwrap_or("no verdict")
    );
    assert!(
        out.status.success() && !stdout.contains("FAIL") && verdict.is_some_and(|v| v.starts_with("PASS")),
        "testbench failed (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
    let expected = format!("PASS {} tiles", tiles.len());
    assert!(verdict.is_some_and(|v| v.starts_with(&expected)), "expected `{expected}`, got {verdict:?}");
}
