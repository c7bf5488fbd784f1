// One output-channel lane of the requantization pipeline (numerics contract v1):
//   p = (acc * M0 + 2^(t-1)) >>> t,  t = 31 + shift      (64-bit product, arithmetic shift)
//   y = clamp(p + zp_y, relu ? zp_y : -128, 127)
// Stage 1 registers the 64-bit product, stage 2 registers the rounded, shifted value (saturated
// to 10 bits, which cannot change y: any |p| beyond 511 clamps the same way after adding an
// int8 zero point); `y` is the combinational zero-point add and clamp of stage 2, written into
// the output buffer by the parent.
`timescale 1ns / 1ps
`default_nettype none

module gemm_tile_requant (
    input  wire               clk,
    input  wire signed [31:0] acc,
    input  wire signed [31:0] m0,     // Q0.31 multiplier in [2^30, 2^31)
    input  wire        [4:0]  shift,  // extra right shift, 0..31
    input  wire signed [7:0]  zp_y,
    input  wire               relu,
    output wire        [7:0]  y
);
  // Stage 1: exact signed 32x32 -> 64 product (operands explicitly sign-extended).
  wire signed [63:0] acc64 = {{32{acc[31]}}, acc};
  wire signed [63:0] m064 = {{32{m0[31]}}, m0};
  reg signed [63:0] prod_q;

  // Stage 2: single rounding (add half the divisor, floor) and saturation to 10 bits.
  // |acc * M0| < 2^62 and the rounding term is at most 2^61, so the sum cannot overflow.
  wire [5:0] t = 6'd31 + {1'b0, shift};
  wire [5:0] t_half = 6'd30 + {1'b0, shift};
  wire signed [63:0] rnd = $signed(64'd1 << t_half);
  wire signed [63:0] sum = prod_q + rnd;
  wire signed [63:0] p = sum >>> t;
  wire signed [9:0] p_sat = (p > 64'sd511) ? 10'sd511 : (p < -64'sd512) ? -10'sd512 : $signed(p[9:0]);
  reg signed [9:0] p_q;

  always @(posedge clk) begin
    prod_q <= acc64 * m064;
    p_q <= p_sat;
  end

  // Output: zero point and clamp, in 11-bit signed arithmetic (no overflow).
  wire signed [10:0] zp11 = {{3{zp_y[7]}}, zp_y};
  wire signed [10:0] ysum = {p_q[9], p_q} + zp11;
  wire signed [10:0] lo = relu ? zp11 : -11'sd128;
  assign y = (ysum > 11'sd127) ? 8'd127 : (ysum < lo) ? lo[7:0] : ysum[7:0];
endmodule

`default_nettype wire
