// emu.h — just enough of CUDA to run flash_attention.cu's kernels on the host, for checking the
// kernels' index arithmetic, masking, tiling and fragment layouts on a machine with no GPU.
//
// Each CUDA thread of a block is a std::thread; blocks run one after another. __syncthreads is
// a barrier of the block, warp shuffles and mma.sync a barrier of the warp's 32 threads around
// an exchange through shared slots. mma.sync.m16n8k16 is computed from the fragments as the PTX
// ISA lays them out (the layout flash_attention.cu documents at flash_mma); what this cannot
// check is that layout itself, nor timing, nor anything the real compiler or hardware adds.
//
// floatX: EMU_BF16 (a 16-bit bfloat16 with round-to-nearest-even) or EMU_FP32.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

using std::max;
using std::min;

// --- the CUDA keywords ----------------------------------------------------------------------
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __align__(n) alignas(n)
#define __shared__ static  // one object for all threads; blocks run one at a time

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
[[noreturn]] inline void __trap() {
    std::fprintf(stderr, "emu: __trap()\n");
    std::abort();
}

namespace emu {
struct Warp {
    std::barrier<> bar{32};
    float f[32];
    unsigned a[32][4];
    unsigned b[32][2];
};
struct Block {
    std::barrier<> bar;
    std::vector<std::unique_ptr<Warp>> warps;
    std::vector<unsigned char> smem;
    Block(unsigned threads, size_t smem_bytes) : bar((std::ptrdiff_t)threads), smem(smem_bytes + 16) {
        for (unsigned w = 0; w < (threads + 31) / 32; w++) { warps.push_back(std::make_unique<Warp>()); }
    }
};
inline thread_local Block* block = nullptr;
}  // namespace emu

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }
inline emu::Warp& emu_warp() { return *emu::block->warps[threadIdx.x / 32]; }

inline float emu_exchange(float v, int src_lane) {
    emu::Warp& w = emu_warp();
    const int lane = threadIdx.x % 32;
    w.f[lane] = v;
    w.bar.arrive_and_wait();
    const float r = w.f[src_lane & 31];
    w.bar.arrive_and_wait();
    return r;
}
inline float __shfl_xor_sync(unsigned, float v, int mask) {
    return emu_exchange(v, (int)(threadIdx.x % 32) ^ mask);
}
inline float __shfl_sync(unsigned, float v, int src) { return emu_exchange(v, src); }

#define FLASH_DYNAMIC_SMEM(name) unsigned char* name = emu::block->smem.data()

// --- floatX (common.cuh's conversions) ------------------------------------------------------
#if defined(EMU_BF16)
#define STRATA_FLOATX_BF16
struct floatX {
    uint16_t bits;
};
inline float to_float(floatX x) {
    uint32_t u = (uint32_t)x.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline floatX from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) { return floatX{(uint16_t)0x7fc0}; }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return floatX{(uint16_t)(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(floatX x) { return x.bits; }
#elif defined(EMU_FP32)
#define STRATA_FLOATX_FP32
typedef float floatX;
inline float to_float(floatX x) { return x; }
inline floatX from_float(float x) { return x; }
#else
#error "define EMU_BF16 or EMU_FP32"
#endif

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu
#define STRATA_NEG_INF (__int_as_float(0xff800000))
inline float warp_reduce_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) { v += __shfl_xor_sync(FULL_MASK, v, offset); }
    return v;
}
inline float warp_reduce_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) { v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset)); }
    return v;
}

// --- mma.sync.m16n8k16 (16-bit inputs, f32 accumulators) --------------------------------------
#define FLASH_MMA_EMULATED
#if defined(EMU_BF16)
inline float emu_half_bits(unsigned bits) { return to_float(floatX{(uint16_t)bits}); }
inline void flash_mma(float d[4], const unsigned a[4], const unsigned b[2]) {
    emu::Warp& w = emu_warp();
    const int lane = threadIdx.x % 32;
    std::memcpy(w.a[lane], a, sizeof(w.a[lane]));
    std::memcpy(w.b[lane], b, sizeof(w.b[lane]));
    w.bar.arrive_and_wait();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        const int rows[4] = {g, g + 8, g, g + 8};
        const int cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
        for (int r = 0; r < 4; r++) {
            A[rows[r]][cols[r]] = emu_half_bits(w.a[l][r] & 0xffffu);
            A[rows[r]][cols[r] + 1] = emu_half_bits(w.a[l][r] >> 16);
        }
        B[2 * t][g] = emu_half_bits(w.b[l][0] & 0xffffu);
        B[2 * t + 1][g] = emu_half_bits(w.b[l][0] >> 16);
        B[2 * t + 8][g] = emu_half_bits(w.b[l][1] & 0xffffu);
        B[2 * t + 9][g] = emu_half_bits(w.b[l][1] >> 16);
    }
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; e++) {
        const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
        float acc = 0.0f;
        for (int k = 0; k < 16; k++) { acc += A[row][k] * B[k][col]; }
        d[e] += acc;
    }
    w.bar.arrive_and_wait();
}
#endif

// --- launching ------------------------------------------------------------------------------
// Runs `kernel` (a callable taking no arguments) on every block of `grid`, `threads` threads each.
inline void emu_launch(dim3 grid, unsigned threads, size_t smem_bytes, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    for (unsigned by = 0; by < grid.y; by++) {
        for (unsigned bx = 0; bx < grid.x; bx++) {
            emu::Block blk(threads, smem_bytes);
            std::vector<std::thread> pool;
            pool.reserve(threads);
            for (unsigned tx = 0; tx < threads; tx++) {
                pool.emplace_back([&, tx] {
                    emu::block = &blk;
                    threadIdx = dim3{tx, 0, 0};
                    blockIdx = dim3{bx, by, 0};
                    kernel();
                });
            }
            for (auto& t : pool) { t.join(); }
        }
    }
}
