// Runs flash_attention.cu's kernels under emu.h and compares them with a double-precision
// reference: out, lse and dqkv (accumulated onto nonzero values) for a list of shapes, with
// the tensor-core kernels (EMU_BF16 builds) and the scalar kernels (both builds).
//   c++ -std=c++20 -O1 -fno-strict-aliasing -pthread -DEMU_BF16 flash_check.cpp && ./a.out
// Prints one line per check; exits 1 when any check exceeds its tolerance.
#include "emu.h"
#include "../flash_attention.cu"

#include <random>
#include <string>

namespace {

struct Shape {
    int b, t, nh, nkv, hs;
};

// The launch configurations of backend/cuda/flash.rs.
constexpr int TILE = 64, SUB = 32, PAD = 8, SCALAR_ROWS = 8;

std::vector<floatX> to_x(const std::vector<float>& v) {
    std::vector<floatX> out(v.size());
    for (size_t i = 0; i < v.size(); i++) { out[i] = from_float(v[i]); }
    return out;
}
std::vector<float> from_x(const std::vector<floatX>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); i++) { out[i] = to_float(v[i]); }
    return out;
}

// max |got - want| / max |want|
double rel(const std::vector<float>& got, const std::vector<double>& want) {
    double scale = 1e-30, diff = 0.0;
    for (size_t i = 0; i < want.size(); i++) {
        scale = std::max(scale, std::fabs(want[i]));
        const double d = std::fabs((double)got[i] - want[i]);
        diff = std::isfinite(d) ? std::max(diff, d) : INFINITY;
    }
    return diff / scale;
}

struct Reference {
    std::vector<double> out, lse, dqkv;
};

// Causal attention of qkv (B,T,(NH+2·NKV)·HS) and its gradient for dout, accumulated onto base,
// in double: query head h reads key/value head h / (NH/NKV).
Reference reference(const Shape& s, const std::vector<float>& qkv, const std::vector<float>& dout,
                    const std::vector<float>& base) {
    const int C = s.nh * s.hs;
    const size_t W = (size_t)(s.nh + 2 * s.nkv) * s.hs;
    const double scale = 1.0 / std::sqrt((double)s.hs);
    Reference r;
    r.out.assign((size_t)s.b * s.t * C, 0.0);
    r.lse.assign((size_t)s.b * s.nh * s.t, 0.0);
    r.dqkv.assign(base.begin(), base.end());
    // Part 0: query head h; parts 1 and 2: the key and value head of query head h.
    auto at = [&](int b, int t, int part, int h) {
        const int kvh = h / (s.nh / s.nkv);
        const size_t head = part == 0 ? (size_t)h : part == 1 ? (size_t)(s.nh + kvh) : (size_t)(s.nh + s.nkv + kvh);
        return ((size_t)b * s.t + t) * W + head * s.hs;
    };
    std::vector<double> p(s.t), dp(s.t);
    for (int b = 0; b < s.b; b++) {
        for (int h = 0; h < s.nh; h++) {
            for (int i = 0; i < s.t; i++) {
                double mx = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    double acc = 0;
                    for (int d = 0; d < s.hs; d++) { acc += (double)qkv[at(b, i, 0, h) + d] * qkv[at(b, j, 1, h) + d]; }
                    p[j] = acc * scale;
                    mx = std::max(mx, p[j]);
                }
                double sum = 0;
                for (int j = 0; j <= i; j++) { sum += std::exp(p[j] - mx); }
                r.lse[((size_t)b * s.nh + h) * s.t + i] = mx + std::log(sum);
                for (int j = 0; j <= i; j++) { p[j] = std::exp(p[j] - mx) / sum; }
                const size_t o = ((size_t)b * s.t + i) * C + (size_t)h * s.hs;
                for (int d = 0; d < s.hs; d++) {
                    double acc = 0;
                    for (int j = 0; j <= i; j++) { acc += p[j] * qkv[at(b, j, 2, h) + d]; }
                    r.out[o + d] = acc;
                }
                // backward of this row: dp_j = dout·v_j; ds_j = p_j (dp_j - sum p dp)
                double dot = 0;
                for (int j = 0; j <= i; j++) {
                    double acc = 0;
                    for (int d = 0; d < s.hs; d++) { acc += (double)dout[o + d] * qkv[at(b, j, 2, h) + d]; }
                    dp[j] = acc;
                    dot += p[j] * acc;
                }
                for (int j = 0; j <= i; j++) {
                    const double ds = p[j] * (dp[j] - dot) * scale;
                    for (int d = 0; d < s.hs; d++) {
                        r.dqkv[at(b, i, 0, h) + d] += ds * qkv[at(b, j, 1, h) + d];
                        r.dqkv[at(b, j, 1, h) + d] += ds * qkv[at(b, i, 0, h) + d];
                        r.dqkv[at(b, j, 2, h) + d] += p[j] * dout[o + d];
                    }
                }
            }
        }
    }
    return r;
}

using Forward = void (*)(floatX*, float*, const floatX*, int, int, int, int, int, float);
using Backward = void (*)(floatX*, const floatX*, const floatX*, const float*, const float*, int, int, int, int, int,
                          float);

struct Kernels {
    std::string name;
    int d;  // 0: scalar
    Forward forward;
    Backward dkdv, dq;
};

int failures = 0;

void check(const char* what, const Kernels& k, const Shape& s, double err, double tol) {
    const bool ok = err <= tol;
    failures += !ok;
    std::printf("%-7s %-10s B=%d T=%-4d NH=%d NKV=%d HS=%-3d maxdiff %.3e tol %.1e %s\n", k.name.c_str(), what, s.b,
                s.t, s.nh, s.nkv, s.hs, err, tol, ok ? "ok" : "FAIL");
}

void run(const Kernels& k, const Shape& s, double tol, unsigned seed) {
    const int C = s.nh * s.hs;
    const size_t btc = (size_t)s.b * s.t * C, rows = (size_t)s.b * s.nh * s.t;
    const size_t qkv_len = (size_t)s.b * s.t * (s.nh + 2 * s.nkv) * s.hs;
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto rnd = [&](size_t n, float sd) {
        std::vector<float> v(n);
        for (auto& x : v) { x = to_float(from_float(normal(rng) * sd)); }
        return v;
    };
    const auto qkv = rnd(qkv_len, 1.0f), dout = rnd(btc, 1.0f), base = rnd(qkv_len, 0.5f);
    const Reference want = reference(s, qkv, dout, base);

    const auto qkv_x = to_x(qkv), dout_x = to_x(dout);
    std::vector<floatX> out_x(btc, from_float(NAN)), dqkv_x = to_x(base);
    std::vector<float> lse(rows, NAN), delta(rows, NAN);
    const float scale = 1.0f / std::sqrt((float)s.hs);
    const unsigned bh = s.b * s.nh, bkv = s.b * s.nkv;
    const int ld = k.d + PAD;
    dim3 grid, kv_grid;
    unsigned threads;
    size_t fwd_smem = 0, dkdv_smem = 0, dq_smem = 0;
    if (k.d == 0) {
        grid = dim3{(unsigned)((s.t + SCALAR_ROWS - 1) / SCALAR_ROWS), bh, 1};
        kv_grid = dim3{grid.x, bkv, 1};
        threads = 256;
    } else {
        grid = dim3{(unsigned)((s.t + TILE - 1) / TILE), bh, 1};
        kv_grid = dim3{grid.x, bkv, 1};
        threads = 128;
        fwd_smem = 2 * (TILE * ld + k.d * (TILE + PAD));
        dkdv_smem = 2 * (2 * TILE * ld + 2 * SUB * ld + 2 * k.d * (SUB + PAD)) + 2 * SUB * 4;
        dq_smem = 2 * (2 * TILE * ld + 2 * SUB * ld + k.d * (SUB + PAD));
    }
    emu_launch(grid, threads, fwd_smem,
               [&] { k.forward(out_x.data(), lse.data(), qkv_x.data(), s.b, s.t, s.nh, s.nkv, s.hs, scale); });
    const auto out = from_x(out_x);
    check("out", k, s, rel(out, want.out), tol);
    double lse_err = 0;
    for (size_t i = 0; i < rows; i++) { lse_err = std::max(lse_err, std::fabs(lse[i] - want.lse[i]) / (1.0 + std::fabs(want.lse[i]))); }
    check("lse", k, s, lse_err, tol);

    emu_launch(dim3{(unsigned)((rows + 7) / 8), 1, 1}, 256, 0,
               [&] { flash_delta(delta.data(), dout_x.data(), out_x.data(), s.b, s.t, s.nh, s.nkv, s.hs); });
    emu_launch(kv_grid, threads, dkdv_smem, [&] {
        k.dkdv(dqkv_x.data(), qkv_x.data(), dout_x.data(), lse.data(), delta.data(), s.b, s.t, s.nh, s.nkv, s.hs,
               scale);
    });
    emu_launch(grid, threads, dq_smem, [&] {
        k.dq(dqkv_x.data(), qkv_x.data(), dout_x.data(), lse.data(), delta.data(), s.b, s.t, s.nh, s.nkv, s.hs, scale);
    });
    // The gradient alone (dqkv minus what it started from), against the reference's.
    const auto dqkv = from_x(dqkv_x);
    std::vector<float> grad(dqkv.size());
    std::vector<double> want_grad(dqkv.size());
    for (size_t i = 0; i < dqkv.size(); i++) {
        grad[i] = dqkv[i] - base[i];
        want_grad[i] = want.dqkv[i] - base[i];
    }
    check("dqkv", k, s, rel(grad, want_grad), 2 * tol);
}

}  // namespace

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    std::vector<Kernels> sets = {{"scalar", 0, flash_forward_scalar, flash_backward_dkdv_scalar, flash_backward_dq_scalar}};
#if defined(EMU_BF16)
    sets.push_back({"mma32", 32, flash_forward_mma_d32, flash_backward_dkdv_mma_d32, flash_backward_dq_mma_d32});
    sets.push_back({"mma64", 64, flash_forward_mma_d64, flash_backward_dkdv_mma_d64, flash_backward_dq_mma_d64});
    sets.push_back({"mma96", 96, flash_forward_mma_d96, flash_backward_dkdv_mma_d96, flash_backward_dq_mma_d96});
    sets.push_back({"mma128", 128, flash_forward_mma_d128, flash_backward_dkdv_mma_d128, flash_backward_dq_mma_d128});
    const double tol = 2e-2;  // bf16 inputs, outputs and P
#else
    const double tol = 2e-5;
#endif
    unsigned seed = 1;
    for (const Kernels& k : sets) {
        // Head sizes the set runs: its D and below (padding) for mma; odd sizes for scalar.
        // Grouped-query shapes (NKV < NH) beside multi-head ones.
        std::vector<Shape> shapes;
        if (k.d == 0) {
            shapes = {{1, 1, 1, 1, 8}, {2, 37, 2, 2, 18}, {1, 70, 1, 1, 128}, {2, 41, 4, 2, 18}, {1, 35, 3, 1, 8}};
            if (!quick) { shapes.push_back({1, 131, 3, 3, 40}); }
        } else {
            shapes = {{1, 1, 1, 1, k.d}, {2, 70, 2, 2, k.d - 8}, {1, 130, 1, 1, k.d}, {1, 70, 4, 2, k.d}};
            if (!quick && k.d == 64) {
                shapes.push_back({1, 200, 2, 2, 64});
                shapes.push_back({1, 130, 6, 2, 64});
            }
        }
        for (const Shape& s : shapes) { run(k, s, tol, seed++); }
    }
    std::printf("%s\n", failures ? "FAILED" : "all ok");
    return failures ? 1 : 0;
}
