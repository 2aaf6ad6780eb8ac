// Residual connections and bias handling around the cuBLAS GEMMs.

// out (N) = a (N) + b (N), all floatX. out may alias a or b.
extern "C" __global__ void residual_forward(floatX* out, const floatX* a, const floatX* b,
                                            size_t N) {
    GRID_STRIDE_LOOP(i, N) { out[i] = from_float(to_float(a[i]) + to_float(b[i])); }
}

// dst (N) += src (N), floatX (residual backward: the gradient flows into both branches).
extern "C" __global__ void accumulate(floatX* dst, const floatX* src, size_t N) {
    GRID_STRIDE_LOOP(i, N) { dst[i] = from_float(to_float(dst[i]) + to_float(src[i])); }
}

// Vectorized residual_forward: N = n_packs * PACK, pointers 16-byte aligned.
extern "C" __global__ void residual_forward_vec(floatX* out, const floatX* a, const floatX* b,
                                                size_t n_packs) {
    PACK_STRIDE_LOOP(i, n_packs) {
        const PackX pa = load_pack(a + i * PACK);
        const PackX pb = load_pack(b + i * PACK);
        PackX po;
        for (int k = 0; k < PACK; k++) { po.v[k] = from_float(to_float(pa.v[k]) + to_float(pb.v[k])); }
        store_pack(out + i * PACK, po);
    }
}

// Vectorized accumulate: N = n_packs * PACK, pointers 16-byte aligned.
extern "C" __global__ void accumulate_vec(floatX* dst, const floatX* src, size_t n_packs) {
    PACK_STRIDE_LOOP(i, n_packs) {
        PackX pd = load_pack(dst + i * PACK);
        const PackX ps = load_pack(src + i * PACK);
        for (int k = 0; k < PACK; k++) { pd.v[k] = from_float(to_float(pd.v[k]) + to_float(ps.v[k])); }
        store_pack(dst + i * PACK, pd);
    }
}

// out (N,OC) floatX += bias (OC) floatX, broadcast over rows.
extern "C" __global__ void add_bias(floatX* out, const floatX* bias, int N, int OC) {
    const size_t n = (size_t)N * OC;
    GRID_STRIDE_LOOP(i, n) {
        out[i] = from_float(to_float(out[i]) + to_float(bias[i % OC]));
    }
}

// Vectorized add_bias: OC divides by PACK, pointers 16-byte aligned. Grid (x: packs of a row,
// y: rows, grid-stride), so no thread divides by OC.
extern "C" __global__ void add_bias_vec(floatX* out, const floatX* bias, int N, int OC) {
    const int packs_per_row = OC / PACK;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= packs_per_row) { return; }
    const PackX pb = load_pack(bias + (size_t)j * PACK);
    for (int row = blockIdx.y; row < N; row += gridDim.y) {
        floatX* o = out + (size_t)row * OC + (size_t)j * PACK;
        PackX po = load_pack(o);
        for (int k = 0; k < PACK; k++) { po.v[k] = from_float(to_float(po.v[k]) + to_float(pb.v[k])); }
        store_pack(o, po);
    }
}

// dbias (OC) fp32 += sum over rows of dout (N,OC) floatX. Grid (ceil(OC/blockDim.x),
// ceil(N/rows_per_chunk)): each thread sums one column over one chunk of rows (coalesced
// across the warp) and adds the chunk's sum with one fp32 atomicAdd, so the order of the
// chunk sums (and the last bits of dbias) may vary between runs.
extern "C" __global__ void bias_backward(float* dbias, const floatX* dout, int N, int OC,
                                         int rows_per_chunk) {
    const int oc = blockIdx.x * blockDim.x + threadIdx.x;
    if (oc >= OC) { return; }
    const int row_begin = blockIdx.y * rows_per_chunk;
    const int row_end = min(N, row_begin + rows_per_chunk);
    float acc = 0.0f;
    for (int n = row_begin; n < row_end; n++) { acc += to_float(dout[(size_t)n * OC + oc]); }
    atomicAdd(&dbias[oc], acc);
}
