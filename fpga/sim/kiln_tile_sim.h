/* C ABI over the Verilator model of the gemm_tile compute unit (fpga/rtl/gemm_tile.v).
 * Used by fpga/src/rtl_sim.rs; each handle owns its own VerilatedContext and model, so distinct
 * handles may run concurrently on different threads, and one handle may move between threads
 * (but must not be used by two threads at once). */
#ifndef KILN_TILE_SIM_H
#define KILN_TILE_SIM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* kiln_tile_sim_run status codes. */
#define KILN_TILE_SIM_OK 0
#define KILN_TILE_SIM_BAD_ARGS (-1)    /* null pointer or shape outside 1..8 x 1..4096 x 1..8 */
#define KILN_TILE_SIM_NOT_STARTED (-2) /* busy did not rise after start */
#define KILN_TILE_SIM_TIMEOUT (-3)     /* done did not rise within max_cycles (model is reset) */

typedef struct kiln_tile_sim kiln_tile_sim;

/* One tile: operands as numerics.rs defines them. */
typedef struct kiln_tile_args {
    uint32_t r, k, c;
    int8_t zp_a;
    int8_t zp_y;
    uint8_t relu;
    uint8_t reserved;
    const int8_t *a;       /* r*k, row-major */
    const int8_t *w;       /* k*c, row-major */
    const int32_t *bias;   /* c */
    const int32_t *m0;     /* c, requantization multipliers */
    const uint8_t *shift;  /* c, requantization shifts */
    uint64_t max_cycles;   /* give up when done has not risen after this many cycles */
} kiln_tile_args;

/* A fresh, reset compute unit; NULL when it cannot be allocated. */
kiln_tile_sim *kiln_tile_sim_new(void);
/* Frees a handle from kiln_tile_sim_new (NULL is ignored). */
void kiln_tile_sim_free(kiln_tile_sim *sim);
/* Loads the operands through the host write port, pulses start, clocks until done and reads the
 * r*c outputs (row-major) into out. *cycles receives the clock edges from the edge that sampled
 * start to the first edge after which done is high. Returns a KILN_TILE_SIM_* status. */
int32_t kiln_tile_sim_run(kiln_tile_sim *sim, const kiln_tile_args *args, int8_t *out, uint64_t *cycles);
/* Clock edges simulated by this handle so far (host writes, compute and reset). */
uint64_t kiln_tile_sim_total_cycles(const kiln_tile_sim *sim);

#ifdef __cplusplus
}
#endif

#endif
