// C ABI shim around the Verilator model of gemm_tile; see kiln_tile_sim.h.
#include "kiln_tile_sim.h"

#include <memory>
#include <new>

#include "Vgemm_tile.h"
#include "verilated.h"

namespace {

// gemm_tile wr_sel codes.
constexpr uint8_t SEL_A = 0;
constexpr uint8_t SEL_W = 1;
constexpr uint8_t SEL_BIAS = 2;
constexpr uint8_t SEL_RQ = 3;
constexpr uint8_t SEL_CFG = 4;
constexpr uint32_t MAX_K = 4096;
constexpr int RESET_CYCLES = 12;  // longer than the 8-deep operand pipelines

}  // namespace

struct kiln_tile_sim {
    std::unique_ptr<VerilatedContext> ctx;
    std::unique_ptr<Vgemm_tile> top;
    uint64_t total_cycles = 0;

    // One rising edge, then the clock returns low (inputs are sampled at the rising edge).
    void tick() {
        top->clk = 1;
        top->eval();
        top->clk = 0;
        top->eval();
        ++total_cycles;
    }

    void write(uint8_t sel, uint16_t addr, uint64_t data) {
        top->wr_en = 1;
        top->wr_sel = sel;
        top->wr_addr = addr;
        top->wr_data = data;
        tick();
    }

    void reset() {
        top->wr_en = 0;
        top->start = 0;
        top->rst = 1;
        for (int i = 0; i < RESET_CYCLES; ++i) tick();
        top->rst = 0;
        tick();
    }
};

extern "C" kiln_tile_sim *kiln_tile_sim_new(void) {
    try {
        auto sim = std::make_unique<kiln_tile_sim>();
        sim->ctx = std::make_unique<VerilatedContext>();
        sim->top = std::make_unique<Vgemm_tile>(sim->ctx.get(), "gemm_tile");
        sim->top->clk = 0;
        sim->top->rd_row = 0;
        sim->top->eval();
        sim->reset();
        return sim.release();
    } catch (...) {
        return nullptr;
    }
}

extern "C" void kiln_tile_sim_free(kiln_tile_sim *sim) {
    if (sim == nullptr) return;
    sim->top->final();
    delete sim;
}

extern "C" uint64_t kiln_tile_sim_total_cycles(const kiln_tile_sim *sim) {
    return sim == nullptr ? 0 : sim->total_cycles;
}

extern "C" int32_t kiln_tile_sim_run(kiln_tile_sim *sim, const kiln_tile_args *args, int8_t *out,
                                     uint64_t *cycles) {
    if (sim == nullptr || args == nullptr || out == nullptr || cycles == nullptr) return KILN_TILE_SIM_BAD_ARGS;
    const kiln_tile_args &t = *args;
    if (t.r < 1 || t.r > 8 || t.c < 1 || t.c > 8 || t.k < 1 || t.k > MAX_K || t.a == nullptr ||
        t.w == nullptr || t.bias == nullptr || t.m0 == nullptr || t.shift == nullptr) {
        return KILN_TILE_SIM_BAD_ARGS;
    }
    Vgemm_tile &top = *sim->top;

    // Tile configuration: [3:0] R, [7:4] C, [20:8] K, [31:24] zp_a, [39:32] zp_y, [40] relu.
    const uint64_t cfg = uint64_t(t.r) | uint64_t(t.c) << 4 | uint64_t(t.k) << 8 |
                         uint64_t(uint8_t(t.zp_a)) << 24 | uint64_t(uint8_t(t.zp_y)) << 32 |
                         uint64_t(t.relu ? 1 : 0) << 40;
    sim->write(SEL_CFG, 0, cfg);
    for (uint32_t c = 0; c < t.c; ++c) sim->write(SEL_BIAS, uint16_t(c), uint32_t(t.bias[c]));
    for (uint32_t c = 0; c < t.c; ++c) {
        sim->write(SEL_RQ, uint16_t(c), uint64_t(uint32_t(t.m0[c])) | uint64_t(t.shift[c] & 31u) << 32);
    }
    // A column k: byte r = A[r][k].  W row k: byte c = W[k][c].
    for (uint32_t k = 0; k < t.k; ++k) {
        uint64_t word = 0;
        for (uint32_t r = 0; r < t.r; ++r) word |= uint64_t(uint8_t(t.a[size_t(r) * t.k + k])) << (8 * r);
        sim->write(SEL_A, uint16_t(k), word);
    }
    for (uint32_t k = 0; k < t.k; ++k) {
        uint64_t word = 0;
        for (uint32_t c = 0; c < t.c; ++c) word |= uint64_t(uint8_t(t.w[size_t(k) * t.c + c])) << (8 * c);
        sim->write(SEL_W, uint16_t(k), word);
    }
    top.wr_en = 0;

    // Edge 0 samples start; then count edges until done is high.
    top.start = 1;
    sim->tick();
    top.start = 0;
    if (!top.busy || top.done) {
        sim->reset();
        return KILN_TILE_SIM_NOT_STARTED;
    }
    uint64_t n = 0;
    while (!top.done) {
        if (n >= t.max_cycles) {
            sim->reset();
            return KILN_TILE_SIM_TIMEOUT;
        }
        sim->tick();
        ++n;
    }
    *cycles = n;

    for (uint32_t r = 0; r < t.r; ++r) {
        top.rd_row = uint8_t(r);
        top.eval();
        const uint64_t row = top.rd_data;
        for (uint32_t c = 0; c < t.c; ++c) out[size_t(r) * t.c + c] = int8_t(uint8_t(row >> (8 * c)));
    }
    return KILN_TILE_SIM_OK;
}
