// LayerNorm over the last dimension (llm.c layernorm_forward / layernorm_backward), eps 1e-5.

#define LN_EPS 1e-5f

// One warp per row. out (N,C) floatX, mean (N) fp32, rstd (N) fp32, inp (N,C) floatX,
// weight (C) floatX, bias (C) floatX. mean/rstd are saved for the backward pass.
// Block: any multiple of 32 threads; grid: ceil(N / (blockDim.x/32)).
extern "C" __global__ void layernorm_forward(floatX* out, float* mean, float* rstd,
                                             const floatX* inp, const floatX* weight,
                                             const floatX* bias, int N, int C) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) { return; }
    const floatX* x = inp + (size_t)row * C;

    float sum = 0.0f;
    for (int i = lane; i < C; i += WARP_SIZE) { sum += to_float(x[i]); }
    const float m = warp_reduce_sum(sum) / C;

    float sum_sq = 0.0f;
    for (int i = lane; i < C; i += WARP_SIZE) {
        const float d = to_float(x[i]) - m;
        sum_sq += d * d;
    }
    const float s = rsqrtf(warp_reduce_sum(sum_sq) / C + LN_EPS);

    floatX* o = out + (size_t)row * C;
    for (int i = lane; i < C; i += WARP_SIZE) {
        const float n = s * (to_float(x[i]) - m);
        o[i] = from_float(n * to_float(weight[i]) + to_float(bias[i]));
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// Accumulating backward: dinp += ..., dweight += ..., dbias += ... (as llm.c's CPU reference).
// dinp (N,C) floatX, dweight (C) fp32, dbias (C) fp32, dout (N,C) floatX, inp (N,C) floatX,
// weight (C) floatX, mean (N) fp32, rstd (N) fp32.
// One warp per row, each block strides over rows and sums its rows' dweight/dbias in shared
// memory, then adds them to global memory with one atomicAdd per channel per block.
// Dynamic shared memory: 2*C floats. Block: multiple of 32 threads.
extern "C" __global__ void layernorm_backward(floatX* dinp, float* dweight, float* dbias,
                                              const floatX* dout, const floatX* inp,
                                              const floatX* weight, const float* mean,
                                              const float* rstd, int N, int C) {
    extern __shared__ float shared[];
    float* dweight_shared = shared;
    float* dbias_shared = shared + C;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        dweight_shared[i] = 0.0f;
        dbias_shared[i] = 0.0f;
    }
    __syncthreads();

    const int lane = threadIdx.x % WARP_SIZE;
    const int warps_per_block = blockDim.x / WARP_SIZE;
    const int warp_global = blockIdx.x * warps_per_block + threadIdx.x / WARP_SIZE;
    const int warps_total = gridDim.x * warps_per_block;
    for (int row = warp_global; row < N; row += warps_total) {
        const floatX* dout_row = dout + (size_t)row * C;
        const floatX* inp_row = inp + (size_t)row * C;
        floatX* dinp_row = dinp + (size_t)row * C;
        const float m = mean[row];
        const float s = rstd[row];

        float dnorm_mean = 0.0f;
        float dnorm_norm_mean = 0.0f;
        for (int i = lane; i < C; i += WARP_SIZE) {
            const float norm = (to_float(inp_row[i]) - m) * s;
            const float dnorm = to_float(weight[i]) * to_float(dout_row[i]);
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean = warp_reduce_sum(dnorm_mean) / C;
        dnorm_norm_mean = warp_reduce_sum(dnorm_norm_mean) / C;

        for (int i = lane; i < C; i += WARP_SIZE) {
            const float norm = (to_float(inp_row[i]) - m) * s;
            const float d = to_float(dout_row[i]);
            const float dnorm = to_float(weight[i]) * d;
            atomicAdd(&dbias_shared[i], d);
            atomicAdd(&dweight_shared[i], norm * d);
            const float dval = (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
            dinp_row[i] = from_float(to_float(dinp_row[i]) + dval);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        atomicAdd(&dweight[i], dweight_shared[i]);
        atomicAdd(&dbias[i], dbias_shared[i]);
    }
}
