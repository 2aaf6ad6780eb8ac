// Decoding with a key/value cache (the CPU reference is backend/cpu/decode.rs). The cache of one
// layer is k_cache and v_cache (B,NKV,CAP,HS) floatX: for each sequence and key/value head, CAP
// rows of HS elements, row p the key (value) of position p. qkv (B,T,(NH+2*NKV)*HS) floatX holds
// the T new tokens (positions pos..pos+T), laid out as the training attention's input.

// Rows pos..pos+T of each (b, kv head) of the caches <- the key and value heads of the new
// tokens. One thread per element written.
extern "C" __global__ void kv_cache_write(floatX* k_cache, floatX* v_cache, const floatX* qkv,
                                          int B, int T, int NH, int NKV, int HS, int pos,
                                          int CAP) {
    const size_t width = (size_t)(NH + 2 * NKV) * HS;
    const size_t n = (size_t)B * T * NKV * HS;
    GRID_STRIDE_LOOP(idx, n) {
        const int d = (int)(idx % HS);
        const int h = (int)((idx / HS) % NKV);
        const size_t bt = idx / ((size_t)HS * NKV);
        const int b = (int)(bt / T);
        const int t = (int)(bt % T);
        const floatX* token = qkv + bt * width;
        const size_t dst = (((size_t)b * NKV + h) * CAP + pos + t) * HS + d;
        k_cache[dst] = token[(size_t)(NH + h) * HS + d];
        v_cache[dst] = token[(size_t)(NH + NKV + h) * HS + d];
    }
}

// The most elements of a head: each lane of a warp holds HS/32 of them.
#define DECODE_HS_MAX 256
#define DECODE_PER_LANE (DECODE_HS_MAX / WARP_SIZE)

// out (B,T,NH*HS): for new token i (position pos+i) and query head h, softmax(q.k_j/sqrt(HS)).v_j
// over the cache rows j <= pos+i of key/value head h/(NH/NKV). One warp per (b, i, h) row, an
// online softmax over the keys in fp32 (HS <= DECODE_HS_MAX, checked by the launcher).
extern "C" __global__ void cached_attention(floatX* out, const floatX* qkv, const floatX* k_cache,
                                            const floatX* v_cache, int B, int T, int NH, int NKV,
                                            int HS, int pos, int CAP) {
    const int lane = threadIdx.x % WARP_SIZE;
    const size_t row = (size_t)blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= (size_t)B * T * NH) { return; }
    const int h = (int)(row % NH);
    const size_t bt = row / NH;
    const int b = (int)(bt / T);
    const int i = (int)(bt % T);
    const floatX* q = qkv + bt * (size_t)(NH + 2 * NKV) * HS + (size_t)h * HS;
    const size_t head = (((size_t)b * NKV) + h / (NH / NKV)) * CAP * HS;
    const floatX* keys = k_cache + head;
    const floatX* values = v_cache + head;
    const float scale = rsqrtf((float)HS);
    float qr[DECODE_PER_LANE];
    float acc[DECODE_PER_LANE];
#pragma unroll
    for (int k = 0; k < DECODE_PER_LANE; k++) {
        const int d = lane + k * WARP_SIZE;
        qr[k] = d < HS ? to_float(q[d]) : 0.0f;
        acc[k] = 0.0f;
    }
    float m = STRATA_NEG_INF;
    float l = 0.0f;
    const int visible = pos + i + 1;
    for (int j = 0; j < visible; j++) {
        const floatX* key = keys + (size_t)j * HS;
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < DECODE_PER_LANE; k++) {
            const int d = lane + k * WARP_SIZE;
            if (d < HS) { dot += qr[k] * to_float(key[d]); }
        }
        const float s = warp_reduce_sum(dot) * scale;
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * correction + p;
        const floatX* value = values + (size_t)j * HS;
#pragma unroll
        for (int k = 0; k < DECODE_PER_LANE; k++) {
            const int d = lane + k * WARP_SIZE;
            const float v = d < HS ? to_float(value[d]) : 0.0f;
            acc[k] = acc[k] * correction + p * v;
        }
        m = m_new;
    }
    floatX* y = out + bt * (size_t)NH * HS + (size_t)h * HS;
    const float inv = 1.0f / l;
#pragma unroll
    for (int k = 0; k < DECODE_PER_LANE; k++) {
        const int d = lane + k * WARP_SIZE;
        if (d < HS) { y[d] = from_float(acc[k] * inv); }
    }
}
