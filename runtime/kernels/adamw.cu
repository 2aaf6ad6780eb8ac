// AdamW with decoupled weight decay (torch.optim.AdamW, llm.c adamw_update):
//   g = grad * grad_scale                      (grad_scale = clip factor / loss scale)
//   m = beta1 m + (1 - beta1) g
//   v = beta2 v + (1 - beta2) g^2
//   m_hat = m / beta1_correction, v_hat = v / beta2_correction   (correction = 1 - beta^t)
//   p -= lr (m_hat / (sqrt(v_hat) + eps) + weight_decay p)
// params (N) fp32 master, grads (N) fp32, m (N) fp32, v (N) fp32. If params_x is not null the
// updated parameter is also written there in floatX (the compute copy), round to nearest.
extern "C" __global__ void adamw_update(float* params, floatX* params_x, const float* grads,
                                        float* m, float* v, size_t N, float lr, float beta1,
                                        float beta2, float beta1_correction,
                                        float beta2_correction, float eps, float weight_decay,
                                        float grad_scale) {
    GRID_STRIDE_LOOP(i, N) {
        const float g = grads[i] * grad_scale;
        const float m_new = beta1 * m[i] + (1.0f - beta1) * g;
        const float v_new = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = m_new;
        v[i] = v_new;
        const float m_hat = m_new / beta1_correction;
        const float v_hat = v_new / beta2_correction;
        float p = params[i];
        p -= lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);
        params[i] = p;
        if (params_x != nullptr) { params_x[i] = from_float(p); }
    }
}
