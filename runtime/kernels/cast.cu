// Precision casts and scaling (round to nearest even).

// out (N) floatX = in (N) fp32.
extern "C" __global__ void cast_f32_to_x(floatX* out, const float* in, size_t N) {
    GRID_STRIDE_LOOP(i, N) { out[i] = from_float(in[i]); }
}

// out (N) fp32 = in (N) floatX.
extern "C" __global__ void cast_x_to_f32(float* out, const floatX* in, size_t N) {
    GRID_STRIDE_LOOP(i, N) { out[i] = to_float(in[i]); }
}

// out (N) fp32 += scale * in (N) floatX: accumulates floatX gradients into fp32 gradients
// (micro-batch accumulation, unscaling of loss-scaled fp16 gradients).
extern "C" __global__ void accumulate_x_to_f32(float* out, const floatX* in, float scale,
                                               size_t N) {
    GRID_STRIDE_LOOP(i, N) { out[i] += scale * to_float(in[i]); }
}

// x (N) fp32 *= scale.
extern "C" __global__ void scale_f32(float* x, float scale, size_t N) {
    GRID_STRIDE_LOOP(i, N) { x[i] *= scale; }
}

// out (N) fp32 += in (N) fp32 (a reduced gradient shard into its accumulator).
extern "C" __global__ void add_f32(float* out, const float* in, size_t N) {
    GRID_STRIDE_LOOP(i, N) { out[i] += in[i]; }
}
