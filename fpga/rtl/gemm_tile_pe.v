// One processing element of the output-stationary systolic array: a signed 9x8-bit multiplier
// feeding a 32-bit accumulator. The operands arrive already skewed (the array owns the operand
// pipeline registers); `load` overwrites the accumulator with the channel bias, `en` accumulates.
`timescale 1ns / 1ps
`default_nettype none

module gemm_tile_pe (
    input  wire               clk,
    input  wire               load,  // start of a tile: acc <= bias
    input  wire               en,    // tile running: acc <= acc + a * w
    input  wire signed [31:0] bias,
    input  wire signed [8:0]  a,     // A[r][k] - zp_a, in [-255, 255] (0 outside the wavefront)
    input  wire signed [7:0]  w,     // W[k][c], in [-127, 127] (0 outside the wavefront)
    output reg  signed [31:0] acc
);
  // Both operands are signed, so the product is a signed 17-bit value (|a * w| < 2^15).
  wire signed [16:0] prod = a * w;

  always @(posedge clk) begin
    if (load) acc <= bias;
    else if (en) acc <= acc + {{15{prod[16]}}, prod};
  end
endmodule

`default_nettype wire
