// Global gradient norm: sum of squares in two stages, fp32 throughout, deterministic for a
// fixed grid (each block writes one partial; one block adds the partials in order).

#define NORM_BLOCK_SIZE 512

// partials[blockIdx.x] = sum over this block's grid-stride share of x[i]^2, x (N) fp32.
// blockDim.x must be NORM_BLOCK_SIZE.
extern "C" __global__ void norm_squared_partial_f32(float* partials, const float* x, size_t N) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    GRID_STRIDE_LOOP(i, N) {
        const float v = x[i];
        acc += v * v;
    }
    acc = block_reduce_sum(acc, scratch);
    if (threadIdx.x == 0) { partials[blockIdx.x] = acc; }
}

// Same for floatX inputs (gradients kept in the compute type).
extern "C" __global__ void norm_squared_partial_x(float* partials, const floatX* x, size_t N) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    GRID_STRIDE_LOOP(i, N) {
        const float v = to_float(x[i]);
        acc += v * v;
    }
    acc = block_reduce_sum(acc, scratch);
    if (threadIdx.x == 0) { partials[blockIdx.x] = acc; }
}

// out[0] = (accumulate ? out[0] : 0) + sum(partials[0..num_partials)). Launch with one block
// of NORM_BLOCK_SIZE threads. The result is the squared norm (Inf/NaN if any gradient
// overflowed: the loss scaler uses that to skip a step).
extern "C" __global__ void norm_squared_finalize(float* out, const float* partials,
                                                 int num_partials, int accumulate) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < num_partials; i += blockDim.x) { acc += partials[i]; }
    acc = block_reduce_sum(acc, scratch);
    if (threadIdx.x == 0) { out[0] = (accumulate ? out[0] : 0.0f) + acc; }
}
