// A thin C ABI over the Xilinx Runtime C API, so the Rust side binds a handful of plain functions
// and the compiler checks every XRT call against Debian's libxrt-dev headers. Built only with the
// `xrt` feature.
//
// XRT's "C" API throws C++ exceptions (xrtDeviceOpen throws "XILINX_XRT not set" on a machine
// without the Xilinx install, for example), and an exception crossing into Rust aborts the
// process. So this layer is C++: every entry point catches everything, records the message for
// kiln_xrt_last_error() and returns the failure value.
#include <cerrno>
#include <cstddef>
#include <exception>
#include <string>

#include <xrt/xrt_bo.h>
#include <xrt/xrt_device.h>
#include <xrt/xrt_kernel.h>

namespace {
thread_local std::string last_error;

template <typename T, typename F>
T guarded(T failure, F &&f) {
    try {
        last_error.clear();
        return f();
    } catch (const std::exception &e) {
        last_error = e.what();
    } catch (...) {
        last_error = "unknown exception from XRT";
    }
    return failure;
}
}  // namespace

extern "C" {

void *kiln_xrt_open(unsigned int index) {
    return guarded<void *>(nullptr, [&] {
        void *dev = xrtDeviceOpen(index);
        if (dev == nullptr && last_error.empty()) last_error = "xrtDeviceOpen returned no device";
        return dev;
    });
}

int kiln_xrt_close(void *dev) {
    return guarded(-1, [&] { return xrtDeviceClose(dev); });
}

int kiln_xrt_load_xclbin(void *dev, const char *path, unsigned char uuid[16]) {
    return guarded(-1, [&] {
        if (xrtDeviceLoadXclbinFile(dev, path) != 0) return -1;
        return xrtDeviceGetXclbinUUID(dev, uuid);
    });
}

void *kiln_xrt_kernel_open(void *dev, const unsigned char uuid[16], const char *name) {
    return guarded<void *>(nullptr, [&] { return xrtPLKernelOpen(dev, uuid, name); });
}

int kiln_xrt_kernel_close(void *kernel) {
    return guarded(-1, [&] { return xrtKernelClose(kernel); });
}

int kiln_xrt_arg_group(void *kernel, int argno) {
    return guarded(-1, [&] { return xrtKernelArgGroupId(kernel, argno); });
}

void *kiln_xrt_bo_alloc(void *dev, size_t size, int group) {
    return guarded<void *>(nullptr, [&] {
        return xrtBOAlloc(dev, size, XRT_BO_FLAGS_NONE, static_cast<xrtMemoryGroup>(group));
    });
}

int kiln_xrt_bo_free(void *bo) {
    return guarded(-1, [&] { return xrtBOFree(bo); });
}

int kiln_xrt_bo_write(void *bo, const void *src, size_t size, size_t seek) {
    return guarded(-1, [&] {
        if (xrtBOWrite(bo, src, size, seek) != 0) return -1;
        return xrtBOSync(bo, XCL_BO_SYNC_BO_TO_DEVICE, size, seek);
    });
}

int kiln_xrt_bo_read(void *bo, void *dst, size_t size, size_t skip) {
    return guarded(-1, [&] {
        if (xrtBOSync(bo, XCL_BO_SYNC_BO_FROM_DEVICE, size, skip) != 0) return -1;
        return xrtBORead(bo, dst, size, skip);
    });
}

// Starts one GEMM tile on the `kiln_gemm_tile` kernel: buffer arguments in the order of the
// compute unit's AXI ports, then the scalars of the tile.
void *kiln_xrt_run_tile(void *kernel, void *a, void *w, void *bias, void *requant, void *out, int r,
                        int k, int c, int zp_a, int zp_y, int relu) {
    return guarded<void *>(nullptr, [&]() -> void * {
        xrtRunHandle run = xrtRunOpen(kernel);
        if (run == nullptr) return nullptr;
        if (xrtRunSetArg(run, 0, a) || xrtRunSetArg(run, 1, w) || xrtRunSetArg(run, 2, bias) ||
            xrtRunSetArg(run, 3, requant) || xrtRunSetArg(run, 4, out) || xrtRunSetArg(run, 5, r) ||
            xrtRunSetArg(run, 6, k) || xrtRunSetArg(run, 7, c) || xrtRunSetArg(run, 8, zp_a) ||
            xrtRunSetArg(run, 9, zp_y) || xrtRunSetArg(run, 10, relu) || xrtRunStart(run)) {
            xrtRunClose(run);
            return nullptr;
        }
        return run;
    });
}

// Waits for a run; returns the ERT command state (4 = completed), or -1 on timeout or error.
int kiln_xrt_run_wait(void *run, unsigned int timeout_ms) {
    return guarded(-1, [&] {
        ert_cmd_state state = xrtRunWaitFor(run, timeout_ms);
        if (state == ERT_CMD_STATE_COMPLETED) {
            xrtRunClose(run);
            return static_cast<int>(state);
        }
        return -1;
    });
}

void kiln_xrt_run_close(void *run) {
    guarded(0, [&] { return xrtRunClose(run); });
}

int kiln_xrt_errno(void) { return errno; }

// The message of the last exception caught on this thread ("" if the last call did not throw).
const char *kiln_xrt_last_error(void) { return last_error.c_str(); }
}
