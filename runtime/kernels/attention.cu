// Causal self-attention helpers, as llm.c's CUDA attention: the two products (Q·K^T and att·V,
// and their backward products) run as cuBLAS strided-batched GEMMs on the Rust side (one batch
// per query head of a group, so key/value heads are read in place); these kernels move heads
// between the packed qkv (B,T,W), W = (NH + 2*NKV)*HS, and per-head (B,H,T,HS) layouts, and do
// the causal softmax.
//
// The scale 1/sqrt(HS) is applied by the Q·K^T GEMM (alpha), so `preatt` holds scaled scores
// exactly as llm.c's CPU attention_forward stores them, and dpreatt is the gradient with
// respect to those scaled scores (the backward GEMMs for dq/dk use alpha = scale as well).

// (b, h, t, d) of element idx of a (B,NH,T,HS) per-head tensor.
struct HeadCoords {
    int b, h, t, d;
};
__device__ __forceinline__ HeadCoords head_coords(size_t idx, int T, int NH, int HS) {
    HeadCoords c;
    c.d = (int)(idx % HS);
    c.t = (int)((idx / HS) % T);
    c.h = (int)((idx / ((size_t)HS * T)) % NH);
    c.b = (int)(idx / ((size_t)HS * T * NH));
    return c;
}

// dst (B,H,T,HS) floatX = the H heads of qkv (B,T,W) floatX from head `first` on.
extern "C" __global__ void attention_permute(floatX* dst, const floatX* qkv, int B, int T, int H,
                                             int HS, int W, int first) {
    const size_t n = (size_t)B * H * T * HS;
    GRID_STRIDE_LOOP(idx, n) {
        const HeadCoords c = head_coords(idx, T, H, HS);
        dst[idx] = qkv[((size_t)c.b * T + c.t) * W + (size_t)(first + c.h) * HS + c.d];
    }
}

// Inverse of attention_permute for gradients: those H heads of dqkv (B,T,W) += src (B,H,T,HS).
// Accumulates, as llm.c's CPU attention_backward.
extern "C" __global__ void attention_permute_backward(floatX* dqkv, const floatX* src, int B,
                                                      int T, int H, int HS, int W, int first) {
    const size_t n = (size_t)B * H * T * HS;
    GRID_STRIDE_LOOP(idx, n) {
        const HeadCoords c = head_coords(idx, T, H, HS);
        const size_t dst = ((size_t)c.b * T + c.t) * W + (size_t)(first + c.h) * HS + c.d;
        dqkv[dst] = from_float(to_float(dqkv[dst]) + to_float(src[idx]));
    }
}

// vaccum (B,NH,T,HS) floatX -> out (B,T,NH,HS) = (B,T,C) floatX.
extern "C" __global__ void attention_unpermute(floatX* out, const floatX* vaccum, int B, int T,
                                               int NH, int HS) {
    const size_t n = (size_t)B * NH * T * HS;
    GRID_STRIDE_LOOP(idx, n) {
        const HeadCoords c = head_coords(idx, T, NH, HS);
        out[(((size_t)c.b * T + c.t) * NH + c.h) * HS + c.d] = vaccum[idx];
    }
}

// dout (B,T,C) floatX -> dvaccum (B,NH,T,HS) floatX (writes).
extern "C" __global__ void attention_unpermute_backward(floatX* dvaccum, const floatX* dout,
                                                        int B, int T, int NH, int HS) {
    const size_t n = (size_t)B * NH * T * HS;
    GRID_STRIDE_LOOP(idx, n) {
        const HeadCoords c = head_coords(idx, T, NH, HS);
        dvaccum[idx] = dout[(((size_t)c.b * T + c.t) * NH + c.h) * HS + c.d];
    }
}

// Causal softmax over rows of preatt (rows, T) where rows = B*NH*T and row r has query
// position t = r % T: att[t2] = exp(preatt[t2] - max) / sum for t2 <= t, 0 for t2 > t.
// preatt is already scaled. One warp per row; att may alias preatt.
extern "C" __global__ void attention_softmax_forward(floatX* att, const floatX* preatt,
                                                     int rows, int T) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= rows) { return; }
    const int t = row % T;
    const floatX* x = preatt + (size_t)row * T;
    floatX* y = att + (size_t)row * T;

    float maxval = STRATA_NEG_INF;
    for (int i = lane; i <= t; i += WARP_SIZE) { maxval = fmaxf(maxval, to_float(x[i])); }
    maxval = warp_reduce_max(maxval);

    float sum = 0.0f;
    for (int i = lane; i <= t; i += WARP_SIZE) { sum += expf(to_float(x[i]) - maxval); }
    const float inv_sum = 1.0f / warp_reduce_sum(sum);

    for (int i = lane; i < T; i += WARP_SIZE) {
        const float p = (i <= t) ? expf(to_float(x[i]) - maxval) * inv_sum : 0.0f;
        y[i] = from_float(p);
    }
}

// Softmax backward over the causal rows: dpreatt[t2] = att[t2] * (datt[t2] - sum_j att[j]*datt[j])
// for t2 <= t, 0 above the diagonal. Writes (no accumulation); dpreatt may alias datt.
// att, datt, dpreatt (rows, T) floatX, rows = B*NH*T. One warp per row.
extern "C" __global__ void attention_softmax_backward(floatX* dpreatt, const floatX* datt,
                                                      const floatX* att, int rows, int T) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= rows) { return; }
    const int t = row % T;
    const floatX* a = att + (size_t)row * T;
    const floatX* da = datt + (size_t)row * T;
    floatX* dp = dpreatt + (size_t)row * T;

    float dot = 0.0f;
    for (int i = lane; i <= t; i += WARP_SIZE) { dot += to_float(a[i]) * to_float(da[i]); }
    dot = warp_reduce_sum(dot);

    for (int i = lane; i < T; i += WARP_SIZE) {
        const float g = (i <= t) ? to_float(a[i]) * (to_float(da[i]) - dot) : 0.0f;
        dp[i] = from_float(g);
    }
}

// Vectorized permutes: one thread per PACK-element run of a head's HS channels. The launcher
// checks HS % PACK == 0, 16-byte-aligned pointers and B*H*T*HS/PACK <= 2^30 (int index math
// with no 64-bit divisions), and uses the element-wise kernels above otherwise.
#define PERMUTE_VEC_LOOP(i, n) for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
                                    i += blockDim.x * gridDim.x)

// Per-pack coordinates: the offset in per-head layout (B,H,T,HS), in token-major layout
// (B,T,H,HS), and the pack's head and first channel.
struct PermuteIndex {
    size_t head_major;  // (b, h, t, d) in (B,H,T,HS)
    size_t token_major; // (b, t, h, d) in (B,T,H,HS)
    size_t b_t;         // b * T + t
    int h, d;
};

__device__ __forceinline__ PermuteIndex permute_index(int i, int T, int H, int HS) {
    const int hs_packs = HS / PACK;
    const int dp = i % hs_packs;
    const int row = i / hs_packs;  // (b, h, t)
    const int t = row % T;
    const int bh = row / T;
    PermuteIndex p;
    p.h = bh % H;
    p.d = dp * PACK;
    p.head_major = (size_t)i * PACK;
    p.b_t = (size_t)(bh / H) * T + t;
    p.token_major = (p.b_t * H + p.h) * HS + (size_t)p.d;
    return p;
}

extern "C" __global__ void attention_permute_vec(floatX* dst, const floatX* qkv, int B, int T,
                                                 int H, int HS, int W, int first) {
    const int n = B * H * T * (HS / PACK);
    PERMUTE_VEC_LOOP(i, n) {
        const PermuteIndex p = permute_index(i, T, H, HS);
        const size_t src = p.b_t * W + (size_t)(first + p.h) * HS + p.d;
        store_pack(dst + p.head_major, load_pack(qkv + src));
    }
}

extern "C" __global__ void attention_permute_backward_vec(floatX* dqkv, const floatX* src, int B,
                                                          int T, int H, int HS, int W,
                                                          int first) {
    const int n = B * H * T * (HS / PACK);
    PERMUTE_VEC_LOOP(i, n) {
        const PermuteIndex p = permute_index(i, T, H, HS);
        floatX* d = dqkv + p.b_t * W + (size_t)(first + p.h) * HS + p.d;
        PackX acc = load_pack(d);
        const PackX g = load_pack(src + p.head_major);
        for (int e = 0; e < PACK; e++) {
            acc.v[e] = from_float(to_float(acc.v[e]) + to_float(g.v[e]));
        }
        store_pack(d, acc);
    }
}

extern "C" __global__ void attention_unpermute_vec(floatX* out, const floatX* vaccum, int B,
                                                   int T, int NH, int HS) {
    const int n = B * NH * T * (HS / PACK);
    PERMUTE_VEC_LOOP(i, n) {
        const PermuteIndex p = permute_index(i, T, NH, HS);
        store_pack(out + p.token_major, load_pack(vaccum + p.head_major));
    }
}

extern "C" __global__ void attention_unpermute_backward_vec(floatX* dvaccum, const floatX* dout,
                                                            int B, int T, int NH, int HS) {
    const int n = B * NH * T * (HS / PACK);
    PERMUTE_VEC_LOOP(i, n) {
        const PermuteIndex p = permute_index(i, T, NH, HS);
        store_pack(dvaccum + p.head_major, load_pack(dout + p.token_major));
    }
}
