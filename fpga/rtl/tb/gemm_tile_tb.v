// Self-checking testbench of gemm_tile: replays golden vectors (written by fpga/tests/iverilog.rs
// from kiln_fpga::numerics) and compares every output byte and every tile's cycle count.
//
// vectors.hex (read from the working directory), 64-bit words:
//   word 0: number of tiles
//   per tile: config word (gemm_tile SEL_CFG layout), expected cycles,
//             C bias words, C requant words, K A-column words, K W-row words,
//             R expected output rows (byte c = y[r][c]).
// Prints exactly one of "PASS <n> tiles" or "FAIL ..." as its verdict; on failure it also ends
// with $fatal so vvp exits nonzero.
`timescale 1ns / 1ps
`default_nettype none

module gemm_tile_tb;
  parameter integer NWORDS = 1;  // words in vectors.hex (set with iverilog -P)
  parameter integer MAX_FAILS = 10;

  localparam [2:0] SEL_A = 3'd0, SEL_W = 3'd1, SEL_BIAS = 3'd2, SEL_RQ = 3'd3, SEL_CFG = 3'd4;

  reg         clk = 1'b0;
  reg         rst = 1'b1;
  reg         wr_en = 1'b0;
  reg  [2:0]  wr_sel = 3'd0;
  reg  [11:0] wr_addr = 12'd0;
  reg  [63:0] wr_data = 64'd0;
  reg         start = 1'b0;
  wire        busy;
  wire        done;
  reg  [2:0]  rd_row = 3'd0;
  wire [63:0] rd_data;

  gemm_tile dut (
      .clk(clk),
      .rst(rst),
      .wr_en(wr_en),
      .wr_sel(wr_sel),
      .wr_addr(wr_addr),
      .wr_data(wr_data),
      .start(start),
      .busy(busy),
      .done(done),
      .rd_row(rd_row),
      .rd_data(rd_data)
  );

  always #5 clk = ~clk;

  reg [63:0] vec[0:NWORDS-1];

  integer ntiles, t, p, i, r, c, k;
  integer rr, cc, kk;
  integer cycles, expected_cycles, fails, total_cycles;
  reg [63:0] cfg;
  reg [7:0] got, want;

  // One host write, presented at a falling edge and consumed by the next rising edge.
  task wr(input [2:0] sel, input [11:0] addr, input [63:0] data);
    begin
      @(negedge clk);
      wr_en = 1'b1;
      wr_sel = sel;
      wr_addr = addr;
      wr_data = data;
    end
  endtask

  task fail_note;
    begin
      fails = fails + 1;
      if (fails >= MAX_FAILS) begin
        $display("FAIL %0d mismatches (stopped early)", fails);
        $fatal(1, "gemm_tile_tb: failures");
      end
    end
  endtask

  initial begin
    $readmemh("vectors.hex", vec);
    ntiles = vec[0];
    p = 1;
    fails = 0;
    total_cycles = 0;
    repeat (12) @(posedge clk);  // flush the operand pipelines under reset
    @(negedge clk);
    rst = 1'b0;

    for (t = 0; t < ntiles; t = t + 1) begin
      if (p + 2 > NWORDS) begin
        $display("FAIL vectors.hex truncated at tile %0d", t);
        $fatal(1, "gemm_tile_tb: bad vectors");
      end
      cfg = vec[p];
      expected_cycles = vec[p+1];
      p = p + 2;
      rr = cfg[3:0];
      cc = cfg[7:4];
      kk = cfg[20:8];

      wr(SEL_CFG, 12'd0, cfg);
      for (i = 0; i < cc; i = i + 1) begin
        wr(SEL_BIAS, i, vec[p]);
        p = p + 1;
      end
      for (i = 0; i < cc; i = i + 1) begin
        wr(SEL_RQ, i, vec[p]);
        p = p + 1;
      end
      for (k = 0; k < kk; k = k + 1) begin
        wr(SEL_A, k, vec[p]);
        p = p + 1;
      end
      for (k = 0; k < kk; k = k + 1) begin
        wr(SEL_W, k, vec[p]);
        p = p + 1;
      end

      // Start: sampled by one rising edge (edge 0); count rising edges until done is high.
      @(negedge clk);
      wr_en = 1'b0;
      start = 1'b1;
      @(negedge clk);
      start = 1'b0;
      if (done || !busy) begin
        $display("FAIL tile %0d: start not taken (busy=%0d done=%0d)", t, busy, done);
        fail_note;
      end
      cycles = 0;
      while (!done && cycles <= expected_cycles + 64) begin
        @(posedge clk);
        cycles = cycles + 1;
        @(negedge clk);
      end
      total_cycles = total_cycles + cycles;
      if (cycles != expected_cycles) begin
        $display("FAIL tile %0d (R=%0d K=%0d C=%0d): %0d cycles, expected %0d", t, rr, kk, cc,
                 cycles, expected_cycles);
        fail_note;
      end

      for (r = 0; r < rr; r = r + 1) begin
        rd_row = r;
        #1;
        for (c = 0; c < cc; c = c + 1) begin
          got = rd_data[8*c+:8];
          want = vec[p+r][8*c+:8];
          if (got !== want) begin
            $display("FAIL tile %0d (R=%0d K=%0d C=%0d) y[%0d][%0d] = %0d, expected %0d", t, rr,
                     kk, cc, r, c, $signed(got), $signed(want));
            fail_note;
          end
        end
      end
      p = p + rr;
    end

    if (fails == 0) begin
      $display("PASS %0d tiles, %0d cycles", ntiles, total_cycles);
      $finish;
    end else begin
      $display("FAIL %0d mismatches in %0d tiles", fails, ntiles);
      $fatal(1, "gemm_tile_tb: failures");
    end
  end
endmodule

`default_nettype wire
