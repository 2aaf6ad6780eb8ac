// Token embedding, plus GPT-2's position embedding (llm.c encoder_forward / encoder_backward).

// out[b,t,:] = wte[inp[b,t],:] + wpe[t,:] (no wpe term when wpe is null)
// out (B,T,C) floatX, inp (B,T) int32 in [0,V), wte (V,C) floatX, wpe (maxT,C) floatX, T <= maxT.
extern "C" __global__ void encoder_forward(floatX* out, const int* inp, const floatX* wte,
                                           const floatX* wpe, int B, int T, int C) {
    const size_t n = (size_t)B * T * C;
    GRID_STRIDE_LOOP(idx, n) {
        const size_t bt = idx / C;
        const int c = (int)(idx % C);
        const int t = (int)(bt % T);
        const int token = inp[bt];
        const floatX e = wte[(size_t)token * C + c];
        out[idx] = wpe ? from_float(to_float(e) + to_float(wpe[(size_t)t * C + c])) : e;
    }
}

// dwpe[t,c] += sum_b dout[b,t,c]  (deterministic: one thread per (t,c)).
// dwpe (maxT,C) fp32, dout (B,T,C) floatX.
extern "C" __global__ void encoder_backward_wpe(float* dwpe, const floatX* dout, int B, int T,
                                                int C) {
    const size_t n = (size_t)T * C;
    GRID_STRIDE_LOOP(idx, n) {
        float acc = 0.0f;
        for (int b = 0; b < B; b++) {
            acc += to_float(dout[(size_t)b * T * C + idx]);
        }
        dwpe[idx] += acc;
    }
}

// dwte[inp[b,t],c] += dout[b,t,c]  (fp32 atomics: the order of additions into one token row is
// not deterministic, so results may differ in the last bits between runs).
// dwte (V,C) fp32, dout (B,T,C) floatX, inp (B,T) int32.
extern "C" __global__ void encoder_backward_wte(float* dwte, const floatX* dout, const int* inp,
                                                int B, int T, int C) {
    const size_t n = (size_t)B * T * C;
    GRID_STRIDE_LOOP(idx, n) {
        const size_t bt = idx / C;
        const int c = (int)(idx % C);
        const int token = inp[bt];
        atomicAdd(&dwte[(size_t)token * C + c], to_float(dout[idx]));
    }
}
