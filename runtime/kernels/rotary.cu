// Rotary position embeddings in place on the query and key heads of a packed qkv
// (B,T,(NH+2*NKV)*HS) floatX, in transformers' rotate-half convention: for position t and
// i < HS/2, x[i] <- x[i]*cos[t,i] - x[i+HS/2]*sin[t,i], x[i+HS/2] <- x[i+HS/2]*cos[t,i] +
// x[i]*sin[t,i]; with `inverse` the angle is negated (the backward). cos, sin (>=T, HS/2) fp32.
// One thread per (token, rotated head, i).
extern "C" __global__ void rotary(floatX* qkv, const float* cos_table, const float* sin_table,
                                  int B, int T, int NH, int NKV, int HS, int inverse) {
    const int half = HS / 2;
    const int heads = NH + NKV;
    const size_t width = (size_t)(NH + 2 * NKV) * HS;
    const size_t n = (size_t)B * T * heads * half;
    GRID_STRIDE_LOOP(idx, n) {
        const int i = (int)(idx % half);
        const int head = (int)((idx / half) % heads);
        const size_t bt = idx / ((size_t)half * heads);
        const int t = (int)(bt % T);
        floatX* x = qkv + bt * width + (size_t)head * HS;
        const float c = cos_table[(size_t)t * half + i];
        const float s = inverse ? -sin_table[(size_t)t * half + i] : sin_table[(size_t)t * half + i];
        const float a = to_float(x[i]);
        const float b = to_float(x[i + half]);
        x[i] = from_float(a * c - b * s);
        x[i + half] = from_float(b * c + a * s);
    }
}
