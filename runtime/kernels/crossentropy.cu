// Fused softmax + cross-entropy over padded logits (llm.c fused_classifier).

// logits (R,Vp) floatX with R = B*T rows, only the first V <= Vp columns are real vocabulary;
// targets (R) int32 in [0,V), or negative: ignored (PyTorch's ignore_index), loss 0 and a
// zero gradient row; losses (R) fp32 receives -log p[target].
// If write_dlogits != 0, logits are overwritten in place with
//   dlogits[i] = (softmax(logits)[i] - [i == target]) * dloss   for i < V,
//   dlogits[i] = 0                                               for V <= i < Vp,
// where dloss = grad_scale / (B*T) is passed by the caller. This WRITES (llm.c's CPU reference
// accumulates into zeroed dlogits, which is the same).
// One block per row, blockDim.x a multiple of 32 (<= 1024).
extern "C" __global__ void crossentropy_forward_backward(floatX* logits, float* losses,
                                                         const int* targets, int R, int V,
                                                         int Vp, float dloss,
                                                         int write_dlogits) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= R) { return; }
    floatX* x = logits + (size_t)row * Vp;
    const int target = targets[row];
    if (target < 0) {
        if (threadIdx.x == 0) { losses[row] = 0.0f; }
        if (write_dlogits != 0) {
            for (int i = threadIdx.x; i < Vp; i += blockDim.x) { x[i] = from_float(0.0f); }
        }
        return;  // block-uniform: no barrier is skipped by part of the block
    }

    float maxval = STRATA_NEG_INF;
    for (int i = threadIdx.x; i < V; i += blockDim.x) { maxval = fmaxf(maxval, to_float(x[i])); }
    maxval = block_reduce_max(maxval, scratch);

    float sum = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) { sum += expf(to_float(x[i]) - maxval); }
    sum = block_reduce_sum(sum, scratch);
    const float inv_sum = 1.0f / sum;

    if (threadIdx.x == 0) {
        const float p_target = expf(to_float(x[target]) - maxval) * inv_sum;
        losses[row] = -logf(p_target);
    }
    // Thread 0 reads x[target] above; another thread overwrites it in place below.
    __syncthreads();
    if (write_dlogits == 0) { return; }
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float g = 0.0f;
        if (i < V) {
            const float p = expf(to_float(x[i]) - maxval) * inv_sum;
            g = (p - (i == target ? 1.0f : 0.0f)) * dloss;
        }
        x[i] = from_float(g);
    }
}
