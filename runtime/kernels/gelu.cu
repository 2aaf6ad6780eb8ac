// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

#define GELU_SCALING_FACTOR 0.7978845608028654f  // sqrt(2/pi)

// out (N) floatX = gelu(inp (N) floatX). out may alias inp.
extern "C" __global__ void gelu_forward(floatX* out, const floatX* inp, size_t N) {
    GRID_STRIDE_LOOP(i, N) {
        const float x = to_float(inp[i]);
        const float cube = 0.044715f * x * x * x;
        out[i] = from_float(0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube))));
    }
}

// dinp (N) floatX += gelu'(inp) * dout — ACCUMULATES, as llm.c's CPU reference and strata's CPU
// backend. dinp must not alias dout or inp.
extern "C" __global__ void gelu_backward(floatX* dinp, const floatX* inp, const floatX* dout,
                                         size_t N) {
    GRID_STRIDE_LOOP(i, N) {
        const float x = to_float(inp[i]);
        const float cube = 0.044715f * x * x * x;
        const float tanh_arg = GELU_SCALING_FACTOR * (x + cube);
        const float tanh_out = tanhf(tanh_arg);
        const float cosh_out = coshf(tanh_arg);
        const float sech_sq = 1.0f / (cosh_out * cosh_out);
        const float local_grad = 0.5f * (1.0f + tanh_out) +
                                 x * 0.5f * sech_sq * GELU_SCALING_FACTOR *
                                     (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = from_float(to_float(dinp[i]) + local_grad * to_float(dout[i]));
    }
}
