//! Row-major GEMMs on cuBLAS (`cublasGemmEx` / `cublasGemmStridedBatchedEx`): floatX inputs,
//! fp32 accumulation, floatX or fp32 output.
//!
//! Row-major C (m×n) = α·op(A)·op(B) + β·C, where op(A) is m×k (A stored k×m row-major when
//! `trans_a`) and op(B) is k×n (B stored n×k when `trans_b`). cuBLAS is column-major, so this
//! runs as Cᵀ = op(B)ᵀ·op(A)ᵀ with the operands swapped: no data is transposed.
//!
//! The llm.c layer products in these terms (N = B·T rows):
//! - forward   out (N,OC)  = inp (N,C) · W(OC,C)ᵀ        m=N,  n=OC, k=C,  trans_b
//! - backward  dinp (N,C)  = dout (N,OC) · W (OC,C)      m=N,  n=C,  k=OC
//! - backward  dW (OC,C)  += dout (N,OC)ᵀ · inp (N,C)    m=OC, n=C,  k=N,  trans_a, β=1, fp32 out

use std::ffi::{c_int, c_longlong, c_void};
use std::sync::Arc;

use cudarc::cublas::sys::{self as blas_sys, cublasComputeType_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaStream;

use super::error::{ensure, CudaError, Result};
use super::{DType, Precision};
use crate::backend::Buf;

/// Shape of one row-major product (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

/// Batch count and element strides between consecutive matrices of A, B and C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStrides {
    pub count: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

/// The column-major cuBLAS call computing a row-major product: Cᵀ (n×m) = op(B)ᵀ·op(A)ᵀ,
/// so cuBLAS's first operand is B and its second is A.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnMajor {
    pub trans_first: bool,
    pub trans_second: bool,
    pub m: c_int,
    pub n: c_int,
    pub k: c_int,
    pub ld_first: c_int,
    pub ld_second: c_int,
    pub ldc: c_int,
}

impl ColumnMajor {
    pub fn of(shape: GemmShape) -> Result<Self> {
        let GemmShape {
            m,
            n,
            k,
            trans_a,
            trans_b,
        } = shape;
        Ok(ColumnMajor {
            trans_first: trans_b,
            trans_second: trans_a,
            m: to_int(n, "n")?,
            n: to_int(m, "m")?,
            k: to_int(k, "k")?,
            ld_first: to_int(if trans_b { k } else { n }, "ldb")?,
            ld_second: to_int(if trans_a { m } else { k }, "lda")?,
            ldc: to_int(n, "ldc")?,
        })
    }
}

/// cuBLAS handle bound to the compute stream, with its workspace in the arena.
pub struct Blas {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    _workspace: Buf,
    compute_type: cublasComputeType_t,
    precision: Precision,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blas({:?}, {:?})", self.precision, self.compute_type)
    }
}

fn data_type(dtype: DType) -> Result<cudaDataType> {
    match dtype {
        DType::F32 => Ok(cudaDataType::CUDA_R_32F),
        DType::Bf16 => Ok(cudaDataType::CUDA_R_16BF),
        DType::F16 => Ok(cudaDataType::CUDA_R_16F),
        DType::I32 => Err(CudaError::precondition(
            "gemm",
            "i32 matrices are not supported",
        )),
    }
}

fn op(trans: bool) -> cublasOperation_t {
    if trans {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

fn to_int(v: usize, what: &str) -> Result<c_int> {
    c_int::try_from(v)
        .map_err(|_| CudaError::precondition("gemm", format!("{what} = {v} exceeds i32")))
}

impl Blas {
    /// Creates the handle on `stream` (the compute queue) and gives it `workspace` so cuBLAS
    /// never allocates during the step.
    pub fn new(
        stream: &Arc<CudaStream>,
        workspace: Buf,
        precision: Precision,
        allow_tf32: bool,
    ) -> Result<Self> {
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::blas("cublasCreate", e))?;
        // SAFETY: the handle is live; the workspace is device memory of this context that the
        // struct keeps alive for as long as the handle exists.
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.ptr() as *mut c_void,
                workspace.size_bytes(),
            )
        }
        .result()
        .map_err(|e| CudaError::blas("cublasSetWorkspace", e))?;
        let compute_type = if precision == Precision::Fp32 && allow_tf32 {
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        Ok(Blas {
            blas,
            stream: stream.clone(),
            _workspace: workspace,
            compute_type,
            precision,
        })
    }

    fn check_operands(&self, c: &Buf, a: &Buf, b: &Buf) -> Result<()> {
        let x = self.precision.dtype();
        ensure(a.dtype() == x && b.dtype() == x, "gemm", || {
            format!(
                "inputs must be {} (the context's floatX), got A {} and B {}",
                x.name(),
                a.dtype().name(),
                b.dtype().name()
            )
        })?;
        ensure(c.dtype() == x || c.dtype() == DType::F32, "gemm", || {
            format!(
                "output must be {} or f32, got {}",
                x.name(),
                c.dtype().name()
            )
        })
    }

    /// C = α·op(A)·op(B) + β·C, row-major (see module docs). Runs on the compute queue.
    pub fn matmul(
        &self,
        c: &Buf,
        a: &Buf,
        b: &Buf,
        shape: GemmShape,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let single = BatchStrides {
            count: 1,
            stride_a: shape.m * shape.k,
            stride_b: shape.k * shape.n,
            stride_c: shape.m * shape.n,
        };
        self.matmul_strided_batched(c, a, b, shape, single, alpha, beta)
    }

    /// `batch.count` independent row-major products; matrix i of A starts at element
    /// i·stride_a (likewise B, C).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_strided_batched(
        &self,
        c: &Buf,
        a: &Buf,
        b: &Buf,
        shape: GemmShape,
        batch: BatchStrides,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.check_operands(c, a, b)?;
        let GemmShape { m, n, k, .. } = shape;
        ensure(m > 0 && n > 0 && k > 0 && batch.count > 0, "gemm", || {
            format!("empty product m={m} n={n} k={k} batch={}", batch.count)
        })?;
        let last = batch.count - 1;
        let need = |stride: usize, size: usize| last * stride + size;
        for (name, buf, stride, size) in [
            ("A", a, batch.stride_a, m * k),
            ("B", b, batch.stride_b, k * n),
            ("C", c, batch.stride_c, m * n),
        ] {
            ensure(stride >= size || batch.count == 1, "gemm", || {
                format!("{name}: stride {stride} smaller than one matrix ({size}) overlaps")
            })?;
            ensure(need(stride, size) <= buf.len(), "gemm", || {
                format!(
                    "{name} needs {} elements for m={m} n={n} k={k} batch={}, buffer has {}",
                    need(stride, size),
                    batch.count,
                    buf.len()
                )
            })?;
        }
        ensure(!c.overlaps(a) && !c.overlaps(b), "gemm", || {
            "C overlaps A or B".into()
        })?;
        let cm = ColumnMajor::of(shape)?;
        let count = to_int(batch.count, "batch")?;
        let as_ll = |v: usize| c_longlong::try_from(v).unwrap_or(c_longlong::MAX);
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
        // SAFETY: all three ranges were checked to lie inside their arena views (which keep
        // the memory alive); types match the buffers' dtypes; α/β are host f32 as the
        // default pointer mode and CUBLAS_COMPUTE_32F expect; the handle is live.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(cm.trans_first),
                op(cm.trans_second),
                cm.m,
                cm.n,
                cm.k,
                (&alpha as *const f32).cast(),
                b.ptr() as *const c_void,
                data_type(b.dtype())?,
                cm.ld_first,
                as_ll(batch.stride_b),
                a.ptr() as *const c_void,
                data_type(a.dtype())?,
                cm.ld_second,
                as_ll(batch.stride_a),
                (&beta as *const f32).cast(),
                c.ptr() as *mut c_void,
                data_type(c.dtype())?,
                cm.ldc,
                as_ll(batch.stride_c),
                count,
                self.compute_type,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::blas("cublasGemmStridedBatchedEx", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What cublasGemmEx computes (column-major, op per operand), on the CPU.
    fn cublas_emulated(
        cm: &ColumnMajor,
        first: &[f32],
        second: &[f32],
        c: &mut [f32],
        alpha: f32,
        beta: f32,
    ) {
        let (m, n, k) = (cm.m as usize, cm.n as usize, cm.k as usize);
        let (lda, ldb, ldc) = (cm.ld_first as usize, cm.ld_second as usize, cm.ldc as usize);
        let at = |i: usize, p: usize| {
            if cm.trans_first {
                first[p + i * lda]
            } else {
                first[i + p * lda]
            }
        };
        let bt = |p: usize, j: usize| {
            if cm.trans_second {
                second[j + p * ldb]
            } else {
                second[p + j * ldb]
            }
        };
        for i in 0..m {
            for j in 0..n {
                let acc: f32 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                c[i + j * ldc] = alpha * acc + beta * c[i + j * ldc];
            }
        }
    }

    #[test]
    fn row_major_mapping_matches_naive_product_for_all_transposes() {
        let (m, n, k) = (5usize, 3usize, 4usize);
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
                let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
                // op(A)[i][p], op(B)[p][j] from row-major storage.
                let opa = |i: usize, p: usize| if trans_a { a[p * m + i] } else { a[i * k + p] };
                let opb = |p: usize, j: usize| if trans_b { b[j * k + p] } else { b[p * n + j] };
                let mut want = vec![0.0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        want[i * n + j] =
                            (0..k).map(|p| opa(i, p) * opb(p, j)).sum::<f32>() * 2.0 + 1.0;
                    }
                }
                let mut got = vec![1.0f32; m * n];
                let cm = ColumnMajor::of(GemmShape {
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                })
                .unwrap();
                cublas_emulated(&cm, &b, &a, &mut got, 2.0, 1.0);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-5,
                        "trans_a={trans_a} trans_b={trans_b}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }
}
