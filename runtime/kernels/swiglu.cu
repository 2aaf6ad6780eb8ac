// SwiGLU (Llama's MLP activation): each row of inp (N,2I) floatX is [gate (I) | up (I)];
// out (N,I) = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
extern "C" __global__ void swiglu_forward(floatX* out, const floatX* inp, int N, int I) {
    const size_t n = (size_t)N * I;
    GRID_STRIDE_LOOP(idx, n) {
        const size_t row = idx / I;
        const int k = (int)(idx % I);
        const float g = to_float(inp[row * 2 * I + k]);
        const float u = to_float(inp[row * 2 * I + I + k]);
        out[idx] = from_float(g / (1.0f + expf(-g)) * u);
    }
}

// dinp (N,2I) = [dgate | dup] (written): dup = dout * silu(gate),
// dgate = dout * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))).
extern "C" __global__ void swiglu_backward(floatX* dinp, const floatX* dout, const floatX* inp,
                                           int N, int I) {
    const size_t n = (size_t)N * I;
    GRID_STRIDE_LOOP(idx, n) {
        const size_t row = idx / I;
        const int k = (int)(idx % I);
        const float g = to_float(inp[row * 2 * I + k]);
        const float u = to_float(inp[row * 2 * I + I + k]);
        const float dy = to_float(dout[idx]);
        const float sig = 1.0f / (1.0f + expf(-g));
        dinp[row * 2 * I + k] = from_float(dy * u * sig * (1.0f + g * (1.0f - sig)));
        dinp[row * 2 * I + I + k] = from_float(dy * g * sig);
    }
}
