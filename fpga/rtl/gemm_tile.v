// Kiln GEMM tile compute unit (numerics contract v1, fpga/spec/numerics.md).
//
// An output-stationary 8x8 int8 systolic array computing one tile
//   y[r][c] = requant(bias[c] + sum_k (A[r][k] - zp_a) * W[k][c])
// for 1 <= R <= 8, 1 <= C <= 8, 1 <= K <= 4096, followed by a per-channel requantization
// pipeline. See fpga/rtl/README.md for the host interface and the cycle-exact timing:
// `done` rises exactly K + 2R + C + 1 clock edges after the edge that samples `start`.
`timescale 1ns / 1ps
`default_nettype none

module gemm_tile (
    input  wire        clk,
    input  wire        rst,      // synchronous, active high
    // Host write port (ignored while busy): one 64-bit word per cycle.
    input  wire        wr_en,
    input  wire [2:0]  wr_sel,   // SEL_* below
    input  wire [11:0] wr_addr,  // k for A/W words, channel for bias/requant words
    input  wire [63:0] wr_data,
    // Control.
    input  wire        start,    // sampled while idle; starts a tile
    output reg         busy,     // a tile is running
    output reg         done,     // the last tile finished; cleared by the next start
    // Result read port (combinational): byte c of rd_data is y[rd_row][c].
    input  wire [2:0]  rd_row,
    output wire [63:0] rd_data
);
  // wr_sel: A column k (byte r = A[r][k]); W row k (byte c = W[k][c]); bias[c] (data[31:0]);
  // requant[c] (data[31:0] = M0, data[36:32] = shift); tile config (see cfg_* below).
  localparam [2:0] SEL_A = 3'd0, SEL_W = 3'd1, SEL_BIAS = 3'd2, SEL_RQ = 3'd3, SEL_CFG = 3'd4;

  wire wr_ok = wr_en && !busy;

  // ---------------------------------------------------------------- tile configuration
  // Config word: [3:0] R, [7:4] C, [20:8] K, [31:24] zp_a, [39:32] zp_y, [40] relu.
  reg [3:0]  cfg_r;
  reg [3:0]  cfg_c;
  reg [12:0] cfg_k;
  reg [7:0]  zp_a;
  reg [7:0]  zp_y;
  reg        relu;
  reg [31:0] bias_q  [0:7];
  reg [31:0] m0_q    [0:7];
  reg [4:0]  shift_q [0:7];

  always @(posedge clk) begin
    if (wr_ok && wr_sel == SEL_CFG) begin
      cfg_r <= wr_data[3:0];
      cfg_c <= wr_data[7:4];
      cfg_k <= wr_data[20:8];
      zp_a  <= wr_data[31:24];
      zp_y  <= wr_data[39:32];
      relu  <= wr_data[40];
    end
    if (wr_ok && wr_sel == SEL_BIAS) bias_q[wr_addr[2:0]] <= wr_data[31:0];
    if (wr_ok && wr_sel == SEL_RQ) begin
      m0_q[wr_addr[2:0]]    <= wr_data[31:0];
      shift_q[wr_addr[2:0]] <= wr_data[36:32];
    end
  end

  // ---------------------------------------------------------------- sequencer
  // cnt holds e during the cycle before clock edge e, where edge 0 samples `start`:
  //   edge 0                    accumulators <= bias; operand buffers read k = 0 (row/col 0)
  //   edges 1 .. K+R+C-2        wavefront: PE(r,c) does MAC k at edge k + r + c + 1
  //   edges E0 .. E0+R-1        requant stage 1 (product) takes row edge - E0, E0 = K+R+C-1
  //   edges E0+1 .. E0+R        requant stage 2 (round, shift)
  //   edges E0+2 .. E0+R+1      output buffer writes (zero point, clamp)
  //   edge  K+2R+C+1            done (= E0 + R + 2)
  reg  [13:0] cnt;
  wire [13:0] k14 = {1'b0, cfg_k};
  wire [13:0] r14 = {10'd0, cfg_r};
  wire [13:0] c14 = {10'd0, cfg_c};
  wire [13:0] rq_first = k14 + r14 + c14 - 14'd1;
  wire [13:0] rq_end = rq_first + r14;  // one past the last row fed
  wire [13:0] t_done = k14 + r14 + r14 + c14 + 14'd1;
  wire        launch = start && !busy;
  wire        go = busy || launch;  // operand reads are live

  always @(posedge clk) begin
    if (rst) begin
      busy <= 1'b0;
      done <= 1'b0;
      cnt  <= 14'd0;
    end else if (launch) begin
      busy <= 1'b1;
      done <= 1'b0;
      cnt  <= 14'd1;
    end else if (busy) begin
      if (cnt == t_done) begin
        busy <= 1'b0;
        done <= 1'b1;
        cnt  <= 14'd0;
      end else begin
        cnt <= cnt + 14'd1;
      end
    end
  end

  // ---------------------------------------------------------------- operand buffers
  // Eight A banks (one per array row) and eight W banks (one per array column), 4096 x 8 each,
  // with registered reads. Bank i is read at k = cnt - i, which produces the systolic skew
  // without delay lines; reads outside [0, K) or beyond R/C inject zeros. (Per-element net
  // arrays rather than flat buses, here and below: event-driven simulators then wake only the
  // readers of the element that changed, which makes iverilog ~40x faster.)
  wire [8:0] a_edge [0:7];  // left edge of row r: A[r][k] - zp_a, 9-bit signed
  wire [7:0] w_edge [0:7];  // top edge of column c: W[k][c]

  genvar i;
  generate
    for (i = 0; i < 8; i = i + 1) begin : g_bank
      localparam [13:0] IDX = i;
      reg  [7:0] a_mem [0:4095];
      reg  [7:0] w_mem [0:4095];
      reg  [7:0] a_q;
      reg  [7:0] w_q;
      reg        a_v;
      reg        w_v;
      // Before the wavefront reaches this bank, cnt - i wraps to >= 2^14 - 7 > K: no extra test.
      wire [13:0] kk = cnt - IDX;
      wire        k_ok = go && (kk < k14);

      always @(posedge clk) begin
        if (wr_ok && wr_sel == SEL_A) a_mem[wr_addr] <= wr_data[8*i+7:8*i];
        if (wr_ok && wr_sel == SEL_W) w_mem[wr_addr] <= wr_data[8*i+7:8*i];
        a_q <= a_mem[kk[11:0]];
        w_q <= w_mem[kk[11:0]];
      end

      always @(posedge clk) begin
        if (rst) begin
          a_v <= 1'b0;
          w_v <= 1'b0;
        end else begin
          a_v <= k_ok && (IDX < r14);
          w_v <= k_ok && (IDX < c14);
        end
      end

      // (A - zp_a) as a 9-bit signed value: sign-extend both int8 operands before subtracting.
      wire signed [8:0] a_off = $signed({a_q[7], a_q}) - $signed({zp_a[7], zp_a});
      assign a_edge[i] = a_v ? a_off : 9'sd0;
      assign w_edge[i] = w_v ? w_q : 8'd0;
    end
  endgenerate

  // ---------------------------------------------------------------- systolic array
  // a_op/w_op: the operands PE(r,c) multiplies this cycle. Column 0 / row 0 take them from the
  // buffer read registers; PE(r,c) otherwise takes PE(r,c-1)'s A and PE(r-1,c)'s W one cycle late.
  wire [8:0]  a_op [0:63];  // index r * 8 + c
  wire [7:0]  w_op [0:63];
  wire [31:0] acc  [0:63];
  wire             pe_load = launch;
  wire             pe_en = busy;

  genvar r, c;
  generate
    for (r = 0; r < 8; r = r + 1) begin : g_row
      for (c = 0; c < 8; c = c + 1) begin : g_col
        localparam integer N = r * 8 + c;
        if (c == 0) begin : g_a_edge
          assign a_op[N] = a_edge[r];
        end else begin : g_a_pipe
          reg [8:0] a_p;
          always @(posedge clk) begin
            if (rst) a_p <= 9'd0;
            else a_p <= a_op[N-1];
          end
          assign a_op[N] = a_p;
        end
        if (r == 0) begin : g_w_edge
          assign w_op[N] = w_edge[c];
        end else begin : g_w_pipe
          reg [7:0] w_p;
          always @(posedge clk) begin
            if (rst) w_p <= 8'd0;
            else w_p <= w_op[N-8];
          end
          assign w_op[N] = w_p;
        end

        gemm_tile_pe pe (
            .clk (clk),
            .load(pe_load),
            .en  (pe_en),
            .bias(bias_q[c]),
            .a   (a_op[N]),
            .w   (w_op[N]),
            .acc (acc[N])
        );
      end
    end
  endgenerate

  // ---------------------------------------------------------------- requantization
  // One output row per cycle through eight lanes: row select + stage 1 (product), stage 2
  // (round/shift), then the output buffer write.
  wire        s0_v = busy && (cnt >= rq_first) && (cnt < rq_end);
  wire [2:0]  s0_row = cnt[2:0] - rq_first[2:0];  // (cnt - rq_first) mod 8 = the row fed
  reg         s1_v;
  reg         s2_v;
  reg  [2:0]  s1_row;
  reg  [2:0]  s2_row;
  wire [63:0] y_row;
  reg  [63:0] y_mem [0:7];

  generate
    for (c = 0; c < 8; c = c + 1) begin : g_lane
      // Accumulator (row s0_row, column c): an 8:1 mux over this column's PEs.
      wire [31:0] acc_lo = s0_row[1] ? (s0_row[0] ? acc[3*8+c] : acc[2*8+c])
                                     : (s0_row[0] ? acc[1*8+c] : acc[0*8+c]);
      wire [31:0] acc_hi = s0_row[1] ? (s0_row[0] ? acc[7*8+c] : acc[6*8+c])
                                     : (s0_row[0] ? acc[5*8+c] : acc[4*8+c]);
      wire [31:0] acc_row = s0_row[2] ? acc_hi : acc_lo;
      gemm_tile_requant lane (
          .clk  (clk),
          .acc  (acc_row),
          .m0   (m0_q[c]),
          .shift(shift_q[c]),
          .zp_y (zp_y),
          .relu (relu),
          .y    (y_row[8*c+7:8*c])
      );
    end
  endgenerate

  always @(posedge clk) begin
    if (rst) begin
      s1_v <= 1'b0;
      s2_v <= 1'b0;
    end else begin
      s1_v <= s0_v;
      s2_v <= s1_v;
    end
    s1_row <= s0_row;
    s2_row <= s1_row;
    if (s2_v) y_mem[s2_row] <= y_row;
  end

  assign rd_data = y_mem[rd_row];
endmodule

`default_nettype wire
