// Fused causal attention with key/value heads (FlashAttention-2, Dao 2023): the (T,T) scores are
// computed tile by tile in registers and shared memory and never written to global memory. The
// CPU reference is runtime/src/backend/cpu/flash.rs (the same algorithm, in tiles of 128).
//
// Layouts (the seam's Op::check checks every size):
//   qkv  (B,T,W) floatX, W = (NH + 2*NKV)*HS: query head h at columns h*HS of a row, key and
//        value head g at (NH + g)*HS and (NH + NKV + g)*HS. Query head h reads key/value head
//        h / (NH/NKV) where it is (grouped-query attention; K and V are never repeated).
//   out, dout (B,T,NH*HS) floatX
//   lse, delta (B,NH,T) float: lse = ln sum over visible keys of exp(scale * q.k),
//                              delta = sum over d of dout * out (the backward's D)
//   dqkv (B,T,W) floatX, accumulated (+=) like every activation gradient of the seam
// scale = 1/sqrt(HS). Scores are kept in log2 units (scale * log2(e) * q.k) so exp2f does the
// exponentials; lse is stored in natural units.
//
// Backward, three kernels: flash_delta (D per row), then dK/dV (one block per key tile of one
// key/value head, looping over the query heads of its group and the query tiles that see it),
// then dQ (one block per query tile, looping over its visible key tiles). dQ has its own pass, recomputing P and dP, rather than atomics into
// an fp32 scratch: deterministic, no extra memory, at the cost of 7 tile products per tile pair
// instead of 5.
//
// Two implementations of the three main kernels:
// - *_mma_d<D>: tensor cores (mma.sync.m16n8k16, bf16 or fp16 inputs, fp32 accumulation), for
//   head sizes HS <= D with HS % 8 == 0 (columns HS..D are zero-filled in shared memory) and
//   16-byte aligned rows; D = 32, 64, 96, 128. 4 warps, 16 rows (or keys) per warp.
//   In the fp32 build these entry points exist but trap: the launcher never picks them there.
// - *_scalar: fp32 CUDA cores, any HS <= 128 and any floatX (the fp32 build; the fallback).
//
// runtime/kernels/emu runs every kernel here on the host (a std::thread per CUDA thread, mma.sync
// computed from its fragments) against a double-precision reference: tests/flash_emu.rs.

#define FLASH_LOG2E 1.4426950408889634f
#define FLASH_LN2 0.6931471805599453f
#define FLASH_HS_MAX 128

// Shared memory declared by the caller (the launcher passes its size in bytes).
#ifndef FLASH_DYNAMIC_SMEM
#define FLASH_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Where one sequence's heads start in qkv and out: W (qkv's row stride), CO (out's), and the
// first element of query head h and of its key and value heads at t = 0.
struct FlashHeads {
    size_t w, co, q, k, v, o;
};
__device__ __forceinline__ FlashHeads flash_heads(int b, int h, int T, int NH, int NKV, int HS) {
    FlashHeads f;
    const int kvh = h / (NH / NKV);
    f.w = (size_t)(NH + 2 * NKV) * HS;
    f.co = (size_t)NH * HS;
    f.q = (size_t)b * T * f.w + (size_t)h * HS;
    f.k = (size_t)b * T * f.w + (size_t)(NH + kvh) * HS;
    f.v = f.k + (size_t)NKV * HS;
    f.o = (size_t)b * T * f.co + (size_t)h * HS;
    return f;
}

// delta (B,NH,T) = rowsum(dout * out) per head. One warp per (b, h, t) row.
extern "C" __global__ void flash_delta(float* delta, const floatX* dout, const floatX* out,
                                       int B, int T, int NH, int NKV, int HS) {
    const int lane = threadIdx.x % WARP_SIZE;
    const size_t row = (size_t)blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= (size_t)B * NH * T) { return; }
    const int t = (int)(row % T);
    const int bh = (int)(row / T);
    const int h = bh % NH;
    const int b = bh / NH;
    const size_t at = ((size_t)b * T + t) * NH * HS + (size_t)h * HS;
    float sum = 0.0f;
    for (int d = lane; d < HS; d += WARP_SIZE) { sum += to_float(dout[at + d]) * to_float(out[at + d]); }
    sum = warp_reduce_sum(sum);
    if (lane == 0) { delta[row] = sum; }
}

// ------------------------------------------------------------------------------------------
// Scalar kernels: 8 warps per block, one query row (or key) per warp; the other side staged
// 32 rows at a time in shared memory as float, one per lane. Each lane owns the head dims
// lane, lane + 32, lane + 64, lane + 96 of the row it accumulates.

#define FLASH_SCALAR_WARPS 8
#define FLASH_SCALAR_TILE 32
#define FLASH_DIMS_PER_LANE (FLASH_HS_MAX / WARP_SIZE)
// Shared rows of HS + 1 floats: lanes reading different rows at one column hit different banks.
#define FLASH_SCALAR_LD (FLASH_HS_MAX + 1)

// Loads rows r0.. of one part of one head (floatX, row stride `ld`) as float into `dst`
// (FLASH_SCALAR_TILE rows of FLASH_SCALAR_LD), times `mul`; rows at or past `count` are zero.
__device__ __forceinline__ void flash_scalar_rows(float* dst, const floatX* src, size_t ld,
                                                  int count, int HS, float mul) {
    for (int e = threadIdx.x; e < FLASH_SCALAR_TILE * HS; e += blockDim.x) {
        const int r = e / HS;
        const int d = e % HS;
        dst[r * FLASH_SCALAR_LD + d] = (r < count) ? to_float(src[(size_t)r * ld + d]) * mul : 0.0f;
    }
}

// out, lse of 8 query rows per block (blockIdx.x), one (b, h) per blockIdx.y.
extern "C" __global__ void __launch_bounds__(256)
flash_forward_scalar(floatX* out, float* lse, const floatX* qkv, int B, int T, int NH, int NKV,
                     int HS, float scale) {
    __shared__ float ks[FLASH_SCALAR_TILE * FLASH_SCALAR_LD];
    __shared__ float vs[FLASH_SCALAR_TILE * FLASH_SCALAR_LD];
    __shared__ float qs[FLASH_SCALAR_WARPS * FLASH_HS_MAX];
    const int bh = blockIdx.y;
    const int b = bh / NH;
    const int h = bh % NH;
    const FlashHeads f = flash_heads(b, h, T, NH, NKV, HS);
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int row0 = blockIdx.x * FLASH_SCALAR_WARPS;
    const int i = row0 + warp;
    const float sl2 = scale * FLASH_LOG2E;
    float* q = qs + warp * FLASH_HS_MAX;
    for (int d = lane; d < HS; d += WARP_SIZE) {
        q[d] = (i < T) ? to_float(qkv[f.q + (size_t)i * f.w + d]) * sl2 : 0.0f;
    }
    float m = STRATA_NEG_INF;
    float l = 0.0f;
    float o[FLASH_DIMS_PER_LANE] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int keys_end = min(row0 + FLASH_SCALAR_WARPS, T);
    const size_t ld = f.w;
    for (int k0 = 0; k0 < keys_end; k0 += FLASH_SCALAR_TILE) {
        __syncthreads();  // the previous tile is consumed (and q is written)
        flash_scalar_rows(ks, qkv + f.k + (size_t)k0 * ld, ld, T - k0, HS, 1.0f);
        flash_scalar_rows(vs, qkv + f.v + (size_t)k0 * ld, ld, T - k0, HS, 1.0f);
        __syncthreads();
        if (i >= T) { continue; }  // warp-uniform; no barrier below
        const int j = k0 + lane;
        float s = STRATA_NEG_INF;
        if (j <= i) {
            float acc = 0.0f;
            for (int d = 0; d < HS; d++) { acc += q[d] * ks[lane * FLASH_SCALAR_LD + d]; }
            s = acc;
        }
        const float tile_max = warp_reduce_max(s);
        if (tile_max == STRATA_NEG_INF) { continue; }  // warp-uniform: no key of this tile visible
        const float m_new = fmaxf(m, tile_max);
        const float alpha = exp2f(m - m_new);  // 0 on the first visible tile (m = -inf)
        const float p = (j <= i) ? exp2f(s - m_new) : 0.0f;
        l = l * alpha + warp_reduce_sum(p);
        for (int dd = 0; dd < FLASH_DIMS_PER_LANE; dd++) { o[dd] *= alpha; }
        const int visible = min(FLASH_SCALAR_TILE, i - k0 + 1);
        for (int r = 0; r < visible; r++) {
            const float pr = __shfl_sync(FULL_MASK, p, r);
            for (int dd = 0; dd < FLASH_DIMS_PER_LANE; dd++) {
                const int d = lane + dd * WARP_SIZE;
                if (d < HS) { o[dd] += pr * vs[r * FLASH_SCALAR_LD + d]; }
            }
        }
        m = m_new;
    }
    if (i >= T) { return; }
    const float inv = 1.0f / l;
    floatX* dst = out + f.o + (size_t)i * f.co;
    for (int dd = 0; dd < FLASH_DIMS_PER_LANE; dd++) {
        const int d = lane + dd * WARP_SIZE;
        if (d < HS) { dst[d] = from_float(o[dd] * inv); }
    }
    if (lane == 0) { lse[(size_t)bh * T + i] = m * FLASH_LN2 + logf(l); }
}

// dK, dV of 8 keys per block (blockIdx.x), one (b, key/value head) per blockIdx.y: the query
// heads of its group one after another, their queries 32 at a time.
extern "C" __global__ void __launch_bounds__(256)
flash_backward_dkdv_scalar(floatX* dqkv, const floatX* qkv, const floatX* dout, const float* lse,
                           const float* delta, int B, int T, int NH, int NKV, int HS,
                           float scale) {
    __shared__ float qs[FLASH_SCALAR_TILE * FLASH_SCALAR_LD];
    __shared__ float dos[FLASH_SCALAR_TILE * FLASH_SCALAR_LD];
    __shared__ float lse_s[FLASH_SCALAR_TILE];
    __shared__ float delta_s[FLASH_SCALAR_TILE];
    __shared__ float krow[FLASH_SCALAR_WARPS * FLASH_HS_MAX];
    __shared__ float vrow[FLASH_SCALAR_WARPS * FLASH_HS_MAX];
    const int group = NH / NKV;
    const int b = blockIdx.y / NKV;
    const int h0 = (blockIdx.y % NKV) * group;  // the group's first query head
    const FlashHeads f0 = flash_heads(b, h0, T, NH, NKV, HS);
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int key0 = blockIdx.x * FLASH_SCALAR_WARPS;
    const int j = key0 + warp;
    const float sl2 = scale * FLASH_LOG2E;
    float* k = krow + warp * FLASH_HS_MAX;
    float* v = vrow + warp * FLASH_HS_MAX;
    const size_t ld = f0.w;
    for (int d = lane; d < HS; d += WARP_SIZE) {
        k[d] = (j < T) ? to_float(qkv[f0.k + (size_t)j * ld + d]) * sl2 : 0.0f;
        v[d] = (j < T) ? to_float(qkv[f0.v + (size_t)j * ld + d]) : 0.0f;
    }
    float dk[FLASH_DIMS_PER_LANE] = {0.0f, 0.0f, 0.0f, 0.0f};
    float dv[FLASH_DIMS_PER_LANE] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int h = h0; h < h0 + group; h++) {
    const FlashHeads f = flash_heads(b, h, T, NH, NKV, HS);
    const size_t bh = (size_t)b * NH + h;
    for (int q0 = key0 - key0 % FLASH_SCALAR_TILE; q0 < T; q0 += FLASH_SCALAR_TILE) {
        __syncthreads();
        flash_scalar_rows(qs, qkv + f.q + (size_t)q0 * ld, ld, T - q0, HS, 1.0f);
        flash_scalar_rows(dos, dout + f.o + (size_t)q0 * f.co, f.co, T - q0, HS, 1.0f);
        if (threadIdx.x < FLASH_SCALAR_TILE) {
            const int q = q0 + threadIdx.x;
            lse_s[threadIdx.x] = (q < T) ? lse[(size_t)bh * T + q] * FLASH_LOG2E : 0.0f;
            delta_s[threadIdx.x] = (q < T) ? delta[(size_t)bh * T + q] : 0.0f;
        }
        __syncthreads();
        if (j >= T) { continue; }  // warp-uniform
        const int q = q0 + lane;
        float p = 0.0f;
        float ds = 0.0f;
        if (q < T && q >= j) {
            float s = 0.0f;
            float dp = 0.0f;
            for (int d = 0; d < HS; d++) {
                s += qs[lane * FLASH_SCALAR_LD + d] * k[d];
                dp += dos[lane * FLASH_SCALAR_LD + d] * v[d];
            }
            p = exp2f(s - lse_s[lane]);
            ds = p * (dp - delta_s[lane]);
        }
        for (int r = 0; r < FLASH_SCALAR_TILE; r++) {
            const float pr = __shfl_sync(FULL_MASK, p, r);
            const float dsr = __shfl_sync(FULL_MASK, ds, r);
            for (int dd = 0; dd < FLASH_DIMS_PER_LANE; dd++) {
                const int d = lane + dd * WARP_SIZE;
                if (d < HS) {
                    dv[dd] += pr * dos[r * FLASH_SCALAR_LD + d];
                    dk[dd] += dsr * qs[r * FLASH_SCALAR_LD + d];
                }
            }
        }
    }
    }
    if (j >= T) { return; }
    floatX* dkr = dqkv + f0.k + (size_t)j * ld;
    floatX* dvr = dqkv + f0.v + (size_t)j * ld;
    for (int dd = 0; dd < FLASH_DIMS_PER_LANE; dd++) {
        const int d = lane + dd * WARP_SIZE;
        if (d < HS) {
            dkr[d] = from_float(to_float(dkr[d]) + dk[dd] * scale);
            dvr[d] = from_float(to_float(dvr[d]) + dv[dd]);
        }
    }
}

// dQ of 8 query rows per block (blockIdx.x), one (b, h) per blockIdx.y: keys 32 at a time.
extern "C" __global__ void __launch_bounds__(256)
flash_backward_dq_scalar(floatX* dqkv, const floatX* qkv, const floatX* dout, const float* lse,
                         const float* delta, int B, int T, int NH, int NKV, int HS,
                         float scale) {
    __shared__ float ks[FLASH_SCALAR_TILE * FLASH_SCALAR_LD];
    __shared__ float vs[FLASH_SCALAR_TILE * FLASH_SCALAR_LD];
    __shared__ float qrow[FLASH_SCALAR_WARPS * FLASH_HS_MAX];
    __shared__ float dorow[FLASH_SCALAR_WARPS * FLASH_HS_MAX];
    const int bh = blockIdx.y;
    const int b = bh / NH;
    const int h = bh % NH;
    const FlashHeads f = flash_heads(b, h, T, NH, NKV, HS);
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int row0 = blockIdx.x * FLASH_SCALAR_WARPS;
    const int i = row0 + warp;
    const float sl2 = scale * FLASH_LOG2E;
    float* q = qrow + warp * FLASH_HS_MAX;
    float* dy = dorow + warp * FLASH_HS_MAX;
    for (int d = lane; d < HS; d += WARP_SIZE) {
        q[d] = (i < T) ? to_float(qkv[f.q + (size_t)i * f.w + d]) * sl2 : 0.0f;
        dy[d] = (i < T) ? to_float(dout[f.o + (size_t)i * f.co + d]) : 0.0f;
    }
    const float lse2 = (i < T) ? lse[(size_t)bh * T + i] * FLASH_LOG2E : 0.0f;
    const float di = (i < T) ? delta[(size_t)bh * T + i] : 0.0f;
    float dq[FLASH_DIMS_PER_LANE] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int keys_end = min(row0 + FLASH_SCALAR_WARPS, T);
    const size_t ld = f.w;
    for (int k0 = 0; k0 < keys_end; k0 += FLASH_SCALAR_TILE) {
        __syncthreads();
        flash_scalar_rows(ks, qkv + f.k + (size_t)k0 * ld, ld, T - k0, HS, 1.0f);
        flash_scalar_rows(vs, qkv + f.v + (size_t)k0 * ld, ld, T - k0, HS, 1.0f);
        __syncthreads();
        if (i >= T) { continue; }  // warp-uniform
        const int j = k0 + lane;
        float ds = 0.0f;
        if (j <= i) {
            float s = 0.0f;
            float dp = 0.0f;
            for (int d = 0; d < HS; d++) {
                s += q[d] * ks[lane * FLASH_SCALAR_LD + d];
                dp += dy[d] * vs[lane * FLASH_SCALAR_LD + d];
            }
            const float p = exp2f(s - lse2);
            ds = p * (dp - di);
        }
        const int visible = min(FLASH_SCALAR_TILE, i - k0 + 1);
        for (int r = 0; r < visible; r++) {
            const float dsr = __shfl_sync(FULL_MASK, ds, r);
            for (int dd = 0; dd < FLASH_DIMS_PER_LANE; dd++) {
                const int d = lane + dd * WARP_SIZE;
                if (d < HS) { dq[dd] += dsr * ks[r * FLASH_SCALAR_LD + d]; }
            }
        }
    }
    if (i >= T) { return; }
    floatX* dqr = dqkv + f.q + (size_t)i * ld;
    for (int dd = 0; dd < FLASH_DIMS_PER_LANE; dd++) {
        const int d = lane + dd * WARP_SIZE;
        if (d < HS) { dqr[d] = from_float(to_float(dqr[d]) + dq[dd] * scale); }
    }
}

// ------------------------------------------------------------------------------------------
// Tensor-core kernels.

#define FLASH_TILE 64  // query rows per block (forward, dQ), keys per block (dK/dV)
#define FLASH_SUB 32   // the inner loop's tile in the backward kernels (queries for dK/dV, keys for dQ)
#define FLASH_MMA_THREADS 128  // 4 warps of 16 rows (or keys) each
// Padding of shared rows (elements): a row of D + 8 (or n + 8) 16-bit elements shifts the next
// by 4 banks, so the 8 rows x 4 columns of a fragment load hit 32 different banks.
#define FLASH_PAD 8

#if !defined(STRATA_FLOATX_FP32)

__device__ __forceinline__ unsigned flash_bits(floatX v) {
#if defined(STRATA_FLOATX_BF16)
    return (unsigned)__bfloat16_as_ushort(v);
#else
    return (unsigned)__half_as_ushort(v);
#endif
}

// Two values as one 32-bit fragment register: `lo` (the lower column) in the low half.
__device__ __forceinline__ unsigned flash_pack(float lo, float hi) {
    return flash_bits(from_float(lo)) | (flash_bits(from_float(hi)) << 16);
}

// The 32-bit register holding elements `at` and `at + 1` of a shared array (`at` even).
__device__ __forceinline__ unsigned flash_ld32(const floatX* s, int at) {
    return *reinterpret_cast<const unsigned*>(s + at);
}

// d (16x8, f32) += a (16x16, row-major) * b (16x8, "col": stored as 8 rows of 16), per thread
// with g = lane / 4 and t = lane % 4 (PTX ISA, mma.m16n8k16 fragments for 16-bit types):
//   a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]                         d[2], d[3] = D[g+8][2t, 2t+1]
#ifndef FLASH_MMA_EMULATED
__device__ __forceinline__ void flash_mma(float d[4], const unsigned a[4], const unsigned b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // m16n8k16 with 16-bit inputs needs sm_80; the launcher never picks these kernels below
#elif defined(STRATA_FLOATX_BF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#endif

// The A fragment of rows r0..r0+15, columns c0..c0+15 of a row-major shared matrix (row stride ld).
__device__ __forceinline__ void flash_a(unsigned a[4], const floatX* s, int ld, int r0, int c0,
                                        int g, int t) {
    a[0] = flash_ld32(s, (r0 + g) * ld + c0 + 2 * t);
    a[1] = flash_ld32(s, (r0 + g + 8) * ld + c0 + 2 * t);
    a[2] = flash_ld32(s, (r0 + g) * ld + c0 + 2 * t + 8);
    a[3] = flash_ld32(s, (r0 + g + 8) * ld + c0 + 2 * t + 8);
}

// The B fragment (k = c0..c0+15, n = n0..n0+7) of a shared matrix stored n-major: row n holds k.
__device__ __forceinline__ void flash_b(unsigned b[2], const floatX* s, int ld, int n0, int c0,
                                        int g, int t) {
    b[0] = flash_ld32(s, (n0 + g) * ld + c0 + 2 * t);
    b[1] = flash_ld32(s, (n0 + g) * ld + c0 + 2 * t + 8);
}

// The A fragment of k-step kk (columns 16kk..16kk+15) from accumulators c[n-tile][4] of a
// 16 x (8·N) product: the accumulator layout of one mma is the A layout of the next.
__device__ __forceinline__ void flash_a_from_acc(unsigned a[4], const float (*c)[4], int kk) {
    a[0] = flash_pack(c[2 * kk][0], c[2 * kk][1]);
    a[1] = flash_pack(c[2 * kk][2], c[2 * kk][3]);
    a[2] = flash_pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = flash_pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// Copies `n` rows (row stride `ld` elements) from `src` into shared `dst` as an n x D row-major
// matrix with row stride D + PAD; rows at or past `count` and columns at or past HS are zero.
// 16-byte loads: HS % 8 == 0 and 16-byte aligned rows (the launcher checks).
template <int D>
__device__ __forceinline__ void flash_load(floatX* dst, const floatX* src, size_t ld, int n,
                                           int count, int HS) {
    constexpr int chunks = D / 8;
    for (int e = threadIdx.x; e < n * chunks; e += blockDim.x) {
        const int r = e / chunks;
        const int c = (e % chunks) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < count && c < HS) { v = *reinterpret_cast<const uint4*>(src + (size_t)r * ld + c); }
        *reinterpret_cast<uint4*>(dst + r * (D + FLASH_PAD) + c) = v;
    }
}

// The same rows transposed: dst is D x n row-major with row stride n + PAD (dst[c][r] = src[r][c]).
// Consecutive threads take consecutive rows, so the 2-byte shared stores do not collide.
template <int D>
__device__ __forceinline__ void flash_load_t(floatX* dst, const floatX* src, size_t ld, int n,
                                             int count, int HS) {
    constexpr int chunks = D / 8;
    for (int e = threadIdx.x; e < n * chunks; e += blockDim.x) {
        const int r = e % n;
        const int c = (e / n) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < count && c < HS) { v = *reinterpret_cast<const uint4*>(src + (size_t)r * ld + c); }
        const floatX* x = reinterpret_cast<const floatX*>(&v);
        for (int k = 0; k < 8; k++) { dst[(c + k) * (n + FLASH_PAD) + r] = x[k]; }
    }
}

// Writes a 16 x D accumulator (this thread's rows row_a and row_a + 8, fragment layout) into
// the rows of `dst` (row stride ld elements), row r's values times mul[r]: added to what is
// there when `add`, else stored. Rows at or past T and columns at or past HS are skipped.
template <int D>
__device__ __forceinline__ void flash_write_rows(floatX* dst, size_t ld, const float (*acc)[4],
                                                 int row_a, int T, int HS, const float mul[2],
                                                 bool add, int t) {
    for (int dt = 0; dt < D / 8; dt++) {
        for (int e = 0; e < 4; e++) {
            const int row = row_a + (e >> 1) * 8;
            const int col = dt * 8 + 2 * t + (e & 1);
            if (row < T && col < HS) {
                floatX* p = dst + (size_t)row * ld + col;
                const float v = acc[dt][e] * mul[e >> 1];
                *p = from_float(add ? to_float(*p) + v : v);
            }
        }
    }
}

// Shared memory of each kernel, in bytes (must match flash.rs).
//   forward: K tile (64 x D+8) and V tile transposed (D x 64+8)
//   dK/dV:   K, V tiles (64 x D+8 each); Q, dO sub-tiles (32 x D+8) and transposed (D x 32+8); lse, D (32 floats each)
//   dQ:      Q, dO tiles (64 x D+8 each); K, V sub-tiles (32 x D+8), K transposed (D x 32+8)

template <int D>
__device__ void flash_forward_mma(floatX* out, float* lse, const floatX* qkv, int B, int T, int NH,
                                  int NKV, int HS, float scale) {
    FLASH_DYNAMIC_SMEM(smem);
    constexpr int LD = D + FLASH_PAD;
    constexpr int LDT = FLASH_TILE + FLASH_PAD;
    floatX* ks = reinterpret_cast<floatX*>(smem);  // the Q tile first
    floatX* vt = ks + FLASH_TILE * LD;
    const int tiles = (T + FLASH_TILE - 1) / FLASH_TILE;
    const int qt = tiles - 1 - (int)blockIdx.x;  // the longest rows first
    const int bh = blockIdx.y;
    const int b = bh / NH;
    const int h = bh % NH;
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4;
    const int t = lane % 4;
    const int q0 = qt * FLASH_TILE;
    const int wr = warp * 16;
    const int row_a = q0 + wr + g;  // this thread's rows: row_a and row_a + 8
    const FlashHeads f = flash_heads(b, h, T, NH, NKV, HS);
    const size_t ld = f.w;
    const float sl2 = scale * FLASH_LOG2E;

    flash_load<D>(ks, qkv + f.q + (size_t)q0 * ld, ld, FLASH_TILE, T - q0, HS);
    __syncthreads();
    unsigned qf[D / 16][4];
    for (int kk = 0; kk < D / 16; kk++) { flash_a(qf[kk], ks, LD, wr, kk * 16, g, t); }

    float o[D / 8][4];
    for (int dt = 0; dt < D / 8; dt++) {
        for (int e = 0; e < 4; e++) { o[dt][e] = 0.0f; }
    }
    float m[2] = {STRATA_NEG_INF, STRATA_NEG_INF};
    float l[2] = {0.0f, 0.0f};
    for (int kt = 0; kt <= qt; kt++) {
        const int k0 = kt * FLASH_TILE;
        __syncthreads();  // every warp has its Q fragments, or is done with the previous tile
        flash_load<D>(ks, qkv + f.k + (size_t)k0 * ld, ld, FLASH_TILE, T - k0, HS);
        flash_load_t<D>(vt, qkv + f.v + (size_t)k0 * ld, ld, FLASH_TILE, T - k0, HS);
        __syncthreads();
        float s[FLASH_TILE / 8][4];
        for (int nt = 0; nt < FLASH_TILE / 8; nt++) {
            for (int e = 0; e < 4; e++) { s[nt][e] = 0.0f; }
        }
        for (int kk = 0; kk < D / 16; kk++) {
            for (int nt = 0; nt < FLASH_TILE / 8; nt++) {
                unsigned bf[2];
                flash_b(bf, ks, LD, nt * 8, kk * 16, g, t);
                flash_mma(s[nt], qf[kk], bf);
            }
        }
        // Scale to log2 units, mask above the diagonal (only the diagonal tile has any), row max.
        float mx[2] = {m[0], m[1]};
        for (int nt = 0; nt < FLASH_TILE / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                const int key = k0 + nt * 8 + 2 * t + (e & 1);
                const int row = row_a + (e >> 1) * 8;
                float v = s[nt][e] * sl2;
                if (kt == qt && key > row) { v = STRATA_NEG_INF; }
                s[nt][e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        }
        float m_use[2];
        for (int r = 0; r < 2; r++) {
            // The 4 threads of a quad hold the 64 columns of a row.
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 2));
            m_use[r] = (mx[r] == STRATA_NEG_INF) ? 0.0f : mx[r];
            const float alpha = exp2f(m[r] - m_use[r]);  // 0 while m = -inf
            m[r] = mx[r];
            l[r] *= alpha;  // a per-thread partial sum: the quad adds its parts at the end
            for (int dt = 0; dt < D / 8; dt++) {
                o[dt][2 * r] *= alpha;
                o[dt][2 * r + 1] *= alpha;
            }
        }
        for (int nt = 0; nt < FLASH_TILE / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                const float p = exp2f(s[nt][e] - m_use[e >> 1]);
                s[nt][e] = p;
                l[e >> 1] += p;
            }
        }
        // O += P V: P (16 x 64) from the score accumulators, V^T (D x 64) in shared.
        for (int kk = 0; kk < FLASH_TILE / 16; kk++) {
            unsigned af[4];
            flash_a_from_acc(af, s, kk);
            for (int dt = 0; dt < D / 8; dt++) {
                unsigned bf[2];
                flash_b(bf, vt, LDT, dt * 8, kk * 16, g, t);
                flash_mma(o[dt], af, bf);
            }
        }
    }
    float inv[2];
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
        inv[r] = 1.0f / l[r];
    }
    flash_write_rows<D>(out + f.o, f.co, o, row_a, T, HS, inv, false, t);
    if (t == 0) {
        for (int r = 0; r < 2; r++) {
            const int row = row_a + r * 8;
            if (row < T) { lse[(size_t)bh * T + row] = m[r] * FLASH_LN2 + logf(l[r]); }
        }
    }
}

// dK, dV of one key tile (64 keys, 16 per warp) of one (b, key/value head), over the query heads
// of its group and their query sub-tiles of 32 that see it. Per sub-tile, with this warp's keys
// as rows (the transposed products):
//   S^T = K_w Q^T, P^T = exp2(S^T - lse), dV_w += P^T dO, dP^T = V_w dO^T,
//   dS^T = P^T (dP^T - D), dK_w += dS^T Q.
template <int D>
__device__ void flash_backward_dkdv_mma(floatX* dqkv, const floatX* qkv, const floatX* dout,
                                        const float* lse, const float* delta, int B, int T, int NH,
                                        int NKV, int HS, float scale) {
    FLASH_DYNAMIC_SMEM(smem);
    constexpr int LD = D + FLASH_PAD;
    constexpr int LDS = FLASH_SUB + FLASH_PAD;
    floatX* ks = reinterpret_cast<floatX*>(smem);
    floatX* vs = ks + FLASH_TILE * LD;
    floatX* qs = vs + FLASH_TILE * LD;
    floatX* dos = qs + FLASH_SUB * LD;
    floatX* qt = dos + FLASH_SUB * LD;
    floatX* dot = qt + D * LDS;
    float* lse_s = reinterpret_cast<float*>(dot + D * LDS);
    float* delta_s = lse_s + FLASH_SUB;
    const int k0 = blockIdx.x * FLASH_TILE;  // the first tiles see the most queries: first
    const int group = NH / NKV;
    const int b = blockIdx.y / NKV;
    const int h0 = (blockIdx.y % NKV) * group;  // the group's first query head
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4;
    const int t = lane % 4;
    const int wk = warp * 16;
    const int key_a = k0 + wk + g;  // this thread's keys: key_a and key_a + 8
    const FlashHeads f0 = flash_heads(b, h0, T, NH, NKV, HS);
    const size_t ld = f0.w;
    const float sl2 = scale * FLASH_LOG2E;

    flash_load<D>(ks, qkv + f0.k + (size_t)k0 * ld, ld, FLASH_TILE, T - k0, HS);
    flash_load<D>(vs, qkv + f0.v + (size_t)k0 * ld, ld, FLASH_TILE, T - k0, HS);
    float dk[D / 8][4];
    float dv[D / 8][4];
    for (int dt = 0; dt < D / 8; dt++) {
        for (int e = 0; e < 4; e++) {
            dk[dt][e] = 0.0f;
            dv[dt][e] = 0.0f;
        }
    }
    for (int h = h0; h < h0 + group; h++) {
    const FlashHeads f = flash_heads(b, h, T, NH, NKV, HS);
    const floatX* q_rows = qkv + f.q;
    const floatX* do_rows = dout + f.o;
    const size_t bh = (size_t)b * NH + h;
    for (int q0 = k0; q0 < T; q0 += FLASH_SUB) {
        __syncthreads();  // the previous sub-tile is consumed
        flash_load<D>(qs, q_rows + (size_t)q0 * ld, ld, FLASH_SUB, T - q0, HS);
        flash_load_t<D>(qt, q_rows + (size_t)q0 * ld, ld, FLASH_SUB, T - q0, HS);
        flash_load<D>(dos, do_rows + (size_t)q0 * f.co, f.co, FLASH_SUB, T - q0, HS);
        flash_load_t<D>(dot, do_rows + (size_t)q0 * f.co, f.co, FLASH_SUB, T - q0, HS);
        if (threadIdx.x < FLASH_SUB) {
            const int q = q0 + threadIdx.x;
            lse_s[threadIdx.x] = (q < T) ? lse[(size_t)bh * T + q] * FLASH_LOG2E : 0.0f;
            delta_s[threadIdx.x] = (q < T) ? delta[(size_t)bh * T + q] : 0.0f;
        }
        __syncthreads();
        // S^T (16 keys x 32 queries) = K_w Q^T, then P^T.
        float pt[FLASH_SUB / 8][4];
        float dpt[FLASH_SUB / 8][4];
        for (int nt = 0; nt < FLASH_SUB / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                pt[nt][e] = 0.0f;
                dpt[nt][e] = 0.0f;
            }
        }
        for (int kk = 0; kk < D / 16; kk++) {
            unsigned kf[4];
            unsigned vf[4];
            flash_a(kf, ks, LD, wk, kk * 16, g, t);
            flash_a(vf, vs, LD, wk, kk * 16, g, t);
            for (int nt = 0; nt < FLASH_SUB / 8; nt++) {
                unsigned qf[2];
                unsigned df[2];
                flash_b(qf, qs, LD, nt * 8, kk * 16, g, t);
                flash_b(df, dos, LD, nt * 8, kk * 16, g, t);
                flash_mma(pt[nt], kf, qf);   // S^T
                flash_mma(dpt[nt], vf, df);  // dP^T = V_w dO^T
            }
        }
        for (int nt = 0; nt < FLASH_SUB / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                const int qi = nt * 8 + 2 * t + (e & 1);
                const int q = q0 + qi;
                const int key = key_a + (e >> 1) * 8;
                const float p =
                    (q < T && q >= key) ? exp2f(pt[nt][e] * sl2 - lse_s[qi]) : 0.0f;
                pt[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - delta_s[qi]);  // dS^T
            }
        }
        // dV_w += P^T dO and dK_w += dS^T Q: B operands from the transposed sub-tiles.
        for (int kk = 0; kk < FLASH_SUB / 16; kk++) {
            unsigned pf[4];
            unsigned sf[4];
            flash_a_from_acc(pf, pt, kk);
            flash_a_from_acc(sf, dpt, kk);
            for (int dt = 0; dt < D / 8; dt++) {
                unsigned bf[2];
                flash_b(bf, dot, LDS, dt * 8, kk * 16, g, t);
                flash_mma(dv[dt], pf, bf);
                flash_b(bf, qt, LDS, dt * 8, kk * 16, g, t);
                flash_mma(dk[dt], sf, bf);
            }
        }
    }
    }
    const float k_mul[2] = {scale, scale};
    const float v_mul[2] = {1.0f, 1.0f};
    flash_write_rows<D>(dqkv + f0.k, ld, dk, key_a, T, HS, k_mul, true, t);
    flash_write_rows<D>(dqkv + f0.v, ld, dv, key_a, T, HS, v_mul, true, t);
}

// dQ of one query tile (64 rows, 16 per warp) of one (b, h), over its visible key sub-tiles of
// 32: S = Q_w K^T, P = exp2(S - lse), dP = dO_w V^T, dS = P (dP - D), dQ_w += dS K.
template <int D>
__device__ void flash_backward_dq_mma(floatX* dqkv, const floatX* qkv, const floatX* dout,
                                      const float* lse, const float* delta, int B, int T, int NH,
                                      int NKV, int HS, float scale) {
    FLASH_DYNAMIC_SMEM(smem);
    constexpr int LD = D + FLASH_PAD;
    constexpr int LDS = FLASH_SUB + FLASH_PAD;
    floatX* qs = reinterpret_cast<floatX*>(smem);
    floatX* dos = qs + FLASH_TILE * LD;
    floatX* ks = dos + FLASH_TILE * LD;
    floatX* vs = ks + FLASH_SUB * LD;
    floatX* kt = vs + FLASH_SUB * LD;
    const int tiles = (T + FLASH_TILE - 1) / FLASH_TILE;
    const int qtile = tiles - 1 - (int)blockIdx.x;  // the longest rows first
    const int q0 = qtile * FLASH_TILE;
    const int bh = blockIdx.y;
    const int b = bh / NH;
    const int h = bh % NH;
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4;
    const int t = lane % 4;
    const int wr = warp * 16;
    const int row_a = q0 + wr + g;  // this thread's rows: row_a and row_a + 8
    const FlashHeads f = flash_heads(b, h, T, NH, NKV, HS);
    const size_t ld = f.w;
    const float sl2 = scale * FLASH_LOG2E;

    flash_load<D>(qs, qkv + f.q + (size_t)q0 * ld, ld, FLASH_TILE, T - q0, HS);
    flash_load<D>(dos, dout + f.o + (size_t)q0 * f.co, f.co, FLASH_TILE, T - q0, HS);
    float lse2[2];
    float di[2];
    for (int r = 0; r < 2; r++) {
        const int row = row_a + r * 8;
        lse2[r] = (row < T) ? lse[(size_t)bh * T + row] * FLASH_LOG2E : 0.0f;
        di[r] = (row < T) ? delta[(size_t)bh * T + row] : 0.0f;
    }
    float dq[D / 8][4];
    for (int dt = 0; dt < D / 8; dt++) {
        for (int e = 0; e < 4; e++) { dq[dt][e] = 0.0f; }
    }
    const int keys_end = min(q0 + FLASH_TILE, T);
    for (int k0 = 0; k0 < keys_end; k0 += FLASH_SUB) {
        __syncthreads();  // the previous sub-tile is consumed
        flash_load<D>(ks, qkv + f.k + (size_t)k0 * ld, ld, FLASH_SUB, T - k0, HS);
        flash_load_t<D>(kt, qkv + f.k + (size_t)k0 * ld, ld, FLASH_SUB, T - k0, HS);
        flash_load<D>(vs, qkv + f.v + (size_t)k0 * ld, ld, FLASH_SUB, T - k0, HS);
        __syncthreads();
        float p[FLASH_SUB / 8][4];
        float ds[FLASH_SUB / 8][4];
        for (int nt = 0; nt < FLASH_SUB / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                p[nt][e] = 0.0f;
                ds[nt][e] = 0.0f;
            }
        }
        for (int kk = 0; kk < D / 16; kk++) {
            unsigned qf[4];
            unsigned df[4];
            flash_a(qf, qs, LD, wr, kk * 16, g, t);
            flash_a(df, dos, LD, wr, kk * 16, g, t);
            for (int nt = 0; nt < FLASH_SUB / 8; nt++) {
                unsigned kf[2];
                unsigned vf[2];
                flash_b(kf, ks, LD, nt * 8, kk * 16, g, t);
                flash_b(vf, vs, LD, nt * 8, kk * 16, g, t);
                flash_mma(p[nt], qf, kf);   // S
                flash_mma(ds[nt], df, vf);  // dP
            }
        }
        for (int nt = 0; nt < FLASH_SUB / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                const int key = k0 + nt * 8 + 2 * t + (e & 1);
                const int row = row_a + (e >> 1) * 8;
                const float pv =
                    (row < T && key <= row) ? exp2f(p[nt][e] * sl2 - lse2[e >> 1]) : 0.0f;
                ds[nt][e] = pv * (ds[nt][e] - di[e >> 1]);
            }
        }
        // dQ_w += dS K: B operand from the transposed K sub-tile.
        for (int kk = 0; kk < FLASH_SUB / 16; kk++) {
            unsigned sf[4];
            flash_a_from_acc(sf, ds, kk);
            for (int dt = 0; dt < D / 8; dt++) {
                unsigned bf[2];
                flash_b(bf, kt, LDS, dt * 8, kk * 16, g, t);
                flash_mma(dq[dt], sf, bf);
            }
        }
    }
    const float mul[2] = {scale, scale};
    flash_write_rows<D>(dqkv + f.q, ld, dq, row_a, T, HS, mul, true, t);
}

#endif  // !STRATA_FLOATX_FP32

// The tensor-core entry points, one per padded head size D. The fp32 build has no 16-bit
// tensor-core path: its entry points trap (the launcher never picks them there).
#if defined(STRATA_FLOATX_FP32)
#define FLASH_MMA_CALL(call) __trap()
#else
#define FLASH_MMA_CALL(call) call
#endif

#define FLASH_MMA_ENTRIES(D)                                                                      \
    extern "C" __global__ void __launch_bounds__(FLASH_MMA_THREADS)                              \
        flash_forward_mma_d##D(floatX* out, float* lse, const floatX* qkv, int B, int T, int NH,   \
                               int NKV, int HS, float scale) {                                    \
        FLASH_MMA_CALL((flash_forward_mma<D>(out, lse, qkv, B, T, NH, NKV, HS, scale)));          \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(FLASH_MMA_THREADS)                              \
        flash_backward_dkdv_mma_d##D(floatX* dqkv, const floatX* qkv, const floatX* dout,          \
                                     const float* lse, const float* delta, int B, int T, int NH,   \
                                     int NKV, int HS, float scale) {                              \
        FLASH_MMA_CALL(                                                                           \
            (flash_backward_dkdv_mma<D>(dqkv, qkv, dout, lse, delta, B, T, NH, NKV, HS, scale))); \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(FLASH_MMA_THREADS)                              \
        flash_backward_dq_mma_d##D(floatX* dqkv, const floatX* qkv, const floatX* dout,            \
                                   const float* lse, const float* delta, int B, int T, int NH,     \
                                   int NKV, int HS, float scale) {                                \
        FLASH_MMA_CALL(                                                                           \
            (flash_backward_dq_mma<D>(dqkv, qkv, dout, lse, delta, B, T, NH, NKV, HS, scale)));   \
    }

FLASH_MMA_ENTRIES(32)
FLASH_MMA_ENTRIES(64)
FLASH_MMA_ENTRIES(96)
FLASH_MMA_ENTRIES(128)
