// RMSNorm over rows (transformers' LlamaRMSNorm): out = weight * (inp * rstd),
// rstd = rsqrt(mean(inp^2) + eps). Rows may be strided (Qwen3's per-head q/k norm inside a
// packed qkv): row r of N starts at (r / group) * stride + (r % group) * C.

__device__ __forceinline__ size_t rms_row_at(int r, int C, int group, int stride) {
    return (size_t)(r / group) * stride + (size_t)(r % group) * C;
}

// out, inp floatX laid out as above; rstd (N) fp32; weight (C) floatX. One warp per row.
// Block: any multiple of 32 threads; grid: ceil(N / (blockDim.x/32)).
extern "C" __global__ void rmsnorm_forward(floatX* out, float* rstd, const floatX* inp,
                                           const floatX* weight, int N, int C, int group,
                                           int stride, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) { return; }
    const size_t at = rms_row_at(row, C, group, stride);
    const floatX* x = inp + at;
    float sum_sq = 0.0f;
    for (int i = lane; i < C; i += WARP_SIZE) {
        const float v = to_float(x[i]);
        sum_sq += v * v;
    }
    const float s = rsqrtf(warp_reduce_sum(sum_sq) / C + eps);
    floatX* o = out + at;
    for (int i = lane; i < C; i += WARP_SIZE) {
        o[i] = from_float(to_float(weight[i]) * (to_float(x[i]) * s));
    }
    if (lane == 0) { rstd[row] = s; }
}

// dinp = or += (accumulate) the RMSNorm backward; dweight (C) fp32 += sum over rows of
// dout * inp * rstd. One warp per row, blocks stride over rows; each block sums its rows'
// dweight in shared memory (C floats of dynamic shared memory), then one atomicAdd per channel.
extern "C" __global__ void rmsnorm_backward(floatX* dinp, float* dweight, const floatX* dout,
                                            const floatX* inp, const floatX* weight,
                                            const float* rstd, int N, int C, int group,
                                            int stride, int accumulate) {
    extern __shared__ float dweight_shared[];
    for (int i = threadIdx.x; i < C; i += blockDim.x) { dweight_shared[i] = 0.0f; }
    __syncthreads();
    const int lane = threadIdx.x % WARP_SIZE;
    const int warps_per_block = blockDim.x / WARP_SIZE;
    const int warp_global = blockIdx.x * warps_per_block + threadIdx.x / WARP_SIZE;
    const int warps_total = gridDim.x * warps_per_block;
    for (int row = warp_global; row < N; row += warps_total) {
        const size_t at = rms_row_at(row, C, group, stride);
        const floatX* dy = dout + at;
        const floatX* x = inp + at;
        floatX* dx = dinp + at;
        const float s = rstd[row];
        float dot = 0.0f;
        for (int i = lane; i < C; i += WARP_SIZE) {
            dot += to_float(weight[i]) * to_float(dy[i]) * to_float(x[i]);
        }
        const float dot_mean = warp_reduce_sum(dot) * s / C;
        for (int i = lane; i < C; i += WARP_SIZE) {
            const float norm = to_float(x[i]) * s;
            const float d = to_float(dy[i]);
            atomicAdd(&dweight_shared[i], d * norm);
            const float dval = s * (to_float(weight[i]) * d - norm * dot_mean);
            dx[i] = from_float(accumulate ? to_float(dx[i]) + dval : dval);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < C; i += blockDim.x) { atomicAdd(&dweight[i], dweight_shared[i]); }
}
