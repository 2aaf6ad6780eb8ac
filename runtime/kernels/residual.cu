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

// out (N,OC) floatX += bias (OC) floatX, broadcast over rows.
extern "C" __global__ void add_bias(floatX* out, const floatX* bias, int N, int OC) {
    const size_t n = (size_t)N * OC;
    GRID_STRIDE_LOOP(i, n) {
        out[i] = from_float(to_float(out[i]) + to_float(bias[i % OC]));
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
