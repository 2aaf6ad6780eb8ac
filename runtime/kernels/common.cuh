// common.cuh — prepended (not #included) to every kernel source before NVRTC compiles it.
// The Rust side (backend/cuda/nvrtc.rs) builds one translation unit per precision:
//   "#define STRATA_FLOATX_<BF16|FP16|FP32>\n" + common.cuh + <kernel>.cu
// so each .cu file can use floatX, the conversion helpers and the reductions below.
//
// Conventions shared by all kernels:
// - floatX is the compute/storage type of activations and compute weights (bf16 by default);
//   every reduction and every accumulation runs in fp32.
// - Parameter gradients, master weights, AdamW m/v, losses, LayerNorm mean/rstd are fp32.
// - Sizes are int (rows, channels) or size_t (flat element counts), launch grids are 1-D.
#pragma once

#if defined(STRATA_FLOATX_BF16)
#include <cuda_bf16.h>
typedef __nv_bfloat16 floatX;
__device__ __forceinline__ float to_float(floatX x) { return __bfloat162float(x); }
__device__ __forceinline__ floatX from_float(float x) { return __float2bfloat16_rn(x); }
#elif defined(STRATA_FLOATX_FP16)
#include <cuda_fp16.h>
typedef __half floatX;
__device__ __forceinline__ float to_float(floatX x) { return __half2float(x); }
__device__ __forceinline__ floatX from_float(float x) { return __float2half_rn(x); }
#elif defined(STRATA_FLOATX_FP32)
typedef float floatX;
__device__ __forceinline__ float to_float(floatX x) { return x; }
__device__ __forceinline__ floatX from_float(float x) { return x; }
#else
#error "define one of STRATA_FLOATX_BF16, STRATA_FLOATX_FP16, STRATA_FLOATX_FP32"
#endif

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu
// -inf without <math.h> (NVRTC has no host headers).
#define STRATA_NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float warp_reduce_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_reduce_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32
// and at most 1024. `scratch` must hold 32 floats of shared memory. Contains __syncthreads,
// so every thread of the block must call it.
__device__ __forceinline__ float block_reduce_sum(float v, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    v = warp_reduce_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) { scratch[warp] = v; }
    __syncthreads();
    v = (lane < num_warps) ? scratch[lane] : 0.0f;
    return warp_reduce_sum(v);
}

__device__ __forceinline__ float block_reduce_max(float v, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    v = warp_reduce_max(v);
    __syncthreads();
    if (lane == 0) { scratch[warp] = v; }
    __syncthreads();
    v = (lane < num_warps) ? scratch[lane] : STRATA_NEG_INF;
    return warp_reduce_max(v);
}

// Grid-stride loop over a flat range of size_t elements.
#define GRID_STRIDE_LOOP(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (size_t)blockDim.x * gridDim.x)

// 16-byte packs of floatX for vectorized loads and stores: PACK elements (8 in bf16/fp16, 4 in
// fp32). A kernel using them needs 16-byte-aligned pointers and counts that divide by PACK; the
// Rust launcher checks both and falls back to the element-wise kernel otherwise.
constexpr int PACK = 16 / sizeof(floatX);
struct __align__(16) PackX {
    floatX v[PACK];
};
__device__ __forceinline__ PackX load_pack(const floatX* p) {
    return *reinterpret_cast<const PackX*>(p);
}
__device__ __forceinline__ void store_pack(floatX* p, const PackX& x) {
    *reinterpret_cast<PackX*>(p) = x;
}

// Grid-stride loop over packs: i is a pack index in [0, n_packs).
#define PACK_STRIDE_LOOP(i, n_packs) GRID_STRIDE_LOOP(i, n_packs)
