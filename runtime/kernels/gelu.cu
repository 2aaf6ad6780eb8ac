// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

#define GELU_SCALING_FACTOR 0.7978845608028654f  // sqrt(2/pi)

__device__ __forceinline__ float gelu(float x) {
    const float cube = 0.044715f * x * x * x;
    return 0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube)));
}

// d gelu(x) / dx.
__device__ __forceinline__ float gelu_grad(float x) {
    const float cube = 0.044715f * x * x * x;
    const float tanh_arg = GELU_SCALING_FACTOR * (x + cube);
    const float tanh_out = tanhf(tanh_arg);
    const float cosh_out = coshf(tanh_arg);
    const float sech_sq = 1.0f / (cosh_out * cosh_out);
    return 0.5f * (1.0f + tanh_out) +
           x * 0.5f * sech_sq * GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * x * x);
}

// out (N) floatX = gelu(inp (N) floatX). out may alias inp.
extern "C" __global__ void gelu_forward(floatX* out, const floatX* inp, size_t N) {
    GRID_STRIDE_LOOP(i, N) { out[i] = from_float(gelu(to_float(inp[i]))); }
}

// Vectorized gelu_forward: N = n_packs * PACK, pointers 16-byte aligned.
extern "C" __global__ void gelu_forward_vec(floatX* out, const floatX* inp, size_t n_packs) {
    PACK_STRIDE_LOOP(i, n_packs) {
        const PackX px = load_pack(inp + i * PACK);
        PackX po;
        for (int k = 0; k < PACK; k++) { po.v[k] = from_float(gelu(to_float(px.v[k]))); }
        store_pack(out + i * PACK, po);
    }
}

// dinp (N) floatX += gelu'(inp) * dout when accumulate != 0 (as llm.c's CPU reference and
// strata's CPU backend), dinp = gelu'(inp) * dout otherwise. dinp must not alias dout or inp.
extern "C" __global__ void gelu_backward(floatX* dinp, const floatX* inp, const floatX* dout,
                                         int accumulate, size_t N) {
    GRID_STRIDE_LOOP(i, N) {
        const float g = gelu_grad(to_float(inp[i])) * to_float(dout[i]);
        dinp[i] = from_float(accumulate ? to_float(dinp[i]) + g : g);
    }
}

// Vectorized gelu_backward: N = n_packs * PACK, pointers 16-byte aligned.
extern "C" __global__ void gelu_backward_vec(floatX* dinp, const floatX* inp, const floatX* dout,
                                             int accumulate, size_t n_packs) {
    PACK_STRIDE_LOOP(i, n_packs) {
        const PackX px = load_pack(inp + i * PACK);
        const PackX pg = load_pack(dout + i * PACK);
        PackX pd;
        if (accumulate) { pd = load_pack(dinp + i * PACK); }
        for (int k = 0; k < PACK; k++) {
            const float g = gelu_grad(to_float(px.v[k])) * to_float(pg.v[k]);
            pd.v[k] = from_float(accumulate ? to_float(pd.v[k]) + g : g);
        }
        store_pack(dinp + i * PACK, pd);
    }
}
