//! Matrix products on the CPU through the `gemm` crate (AVX-512 kernels with the `x86-v4` feature).
//!
//! Weights use the `nn.Linear` layout `(OC, C)`: `out = inp · Wᵀ + bias`.

use gemm::Parallelism;
use rayon::prelude::*;

/// A strided view of a matrix stored in a slice: element (i, j) lives at `offset + i·row_stride + j·col_stride`.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Layout {
    /// A dense row-major `rows × cols` matrix.
    pub fn row_major(rows: usize, cols: usize) -> Layout {
        Layout {
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// The transpose of this view (no data moves).
    pub fn t(self) -> Layout {
        Layout {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
    /// One past the largest element index the view touches.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }
}

/// How many threads a product may use: the whole pool for large products, one inside parallel loops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    All,
    One,
}

/// `c = alpha·a·b + (accumulate ? c : 0)`.
///
/// Panics (a programmer error) when the shapes do not chain or a view reaches past its slice.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    c: &mut [f32],
    lc: Layout,
    a: &[f32],
    la: Layout,
    b: &[f32],
    lb: Layout,
    alpha: f32,
    accumulate: bool,
    threads: Threads,
) {
    assert_eq!(
        la.rows, lc.rows,
        "gemm: a has {} rows, c has {}",
        la.rows, lc.rows
    );
    assert_eq!(
        lb.cols, lc.cols,
        "gemm: b has {} cols, c has {}",
        lb.cols, lc.cols
    );
    assert_eq!(
        la.cols, lb.rows,
        "gemm: inner dims {} vs {}",
        la.cols, lb.rows
    );
    assert!(
        lc.extent() <= c.len() && la.extent() <= a.len() && lb.extent() <= b.len(),
        "gemm: view out of bounds"
    );
    if lc.rows == 0 || lc.cols == 0 {
        return;
    }
    if la.cols == 0 {
        if !accumulate {
            c.iter_mut().for_each(|x| *x = 0.0);
        }
        return;
    }
    let parallelism = match threads {
        Threads::All if rayon::current_num_threads() > 1 => Parallelism::Rayon(0),
        _ => Parallelism::None,
    };
    // SAFETY: the asserts above check that every element (i, j) of each view, at i·row_stride + j·col_stride,
    // lies inside its slice; `c` is borrowed mutably, so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            lc.rows,
            lc.cols,
            la.cols,
            c.as_mut_ptr(),
            lc.col_stride as isize,
            lc.row_stride as isize,
            accumulate,
            a.as_ptr(),
            la.col_stride as isize,
            la.row_stride as isize,
            b.as_ptr(),
            lb.col_stride as isize,
            lb.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// out (N, OC) = inp (N, C) · weight (OC, C)ᵀ + bias (OC).
pub fn matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    assert_eq!(out.len(), n * oc);
    assert_eq!(inp.len(), n * c);
    assert_eq!(weight.len(), oc * c);
    if let Some(bias) = bias {
        assert_eq!(bias.len(), oc);
        out.par_chunks_mut(oc)
            .for_each(|row| row.copy_from_slice(bias));
    }
    gemm(
        out,
        Layout::row_major(n, oc),
        inp,
        Layout::row_major(n, c),
        weight,
        Layout::row_major(oc, c).t(),
        1.0,
        bias.is_some(),
        Threads::All,
    );
}

/// Backward of [`matmul_forward`]: dinp (N, C) = dout · weight (`+=` with `dinp_accumulate`);
/// dweight (OC, C) += doutᵀ · inp; dbias += Σ dout.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: Option<&mut [f32]>,
    dinp_accumulate: bool,
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    n: usize,
    c: usize,
    oc: usize,
) {
    assert_eq!(dout.len(), n * oc);
    assert_eq!(inp.len(), n * c);
    if let Some(dinp) = dinp {
        gemm(
            dinp,
            Layout::row_major(n, c),
            dout,
            Layout::row_major(n, oc),
            weight,
            Layout::row_major(oc, c),
            1.0,
            dinp_accumulate,
            Threads::All,
        );
    }
    gemm(
        dweight,
        Layout::row_major(oc, c),
        dout,
        Layout::row_major(n, oc).t(),
        inp,
        Layout::row_major(n, c),
        1.0,
        true,
        Threads::All,
    );
    if let Some(dbias) = dbias {
        column_sums_into(dbias, dout, oc);
    }
}

/// acc (C) += Σ over rows of x (N, C), split over threads by rows.
pub fn column_sums_into(acc: &mut [f32], x: &[f32], cols: usize) {
    assert_eq!(acc.len(), cols);
    let rows = x.len() / cols.max(1);
    let chunk_rows = rows
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1);
    let partial = x
        .par_chunks(chunk_rows * cols)
        .map(|chunk| {
            let mut sums = vec![0.0f32; cols];
            for row in chunk.chunks_exact(cols) {
                sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sums
        })
        .collect::<Vec<_>>();
    // Partials are added in chunk order, so the result does not depend on thread scheduling.
    for sums in &partial {
        acc.iter_mut().zip(sums).for_each(|(a, p)| *a += p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
        let mut c = vec![0.0; n * m];
        for i in 0..n {
            for j in 0..m {
                c[i * m + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * m + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn forward_and_backward_match_naive_products() {
        let (n, c, oc) = (7, 5, 3);
        let mut rng = Rng::new(3);
        let inp = rng.normal_vec(n * c, 1.0);
        let w = rng.normal_vec(oc * c, 1.0);
        let bias = rng.normal_vec(oc, 1.0);
        let mut out = vec![f32::NAN; n * oc];
        matmul_forward(&mut out, &inp, &w, Some(&bias), n, c, oc);
        let wt: Vec<f32> = (0..c * oc).map(|i| w[(i % oc) * c + i / oc]).collect();
        let want = naive(&inp, &wt, n, c, oc);
        for i in 0..n * oc {
            assert!((out[i] - want[i] - bias[i % oc]).abs() < 1e-5);
        }
        let dout = rng.normal_vec(n * oc, 1.0);
        let mut dinp = vec![1.0; n * c];
        let mut dw = vec![0.0; oc * c];
        let mut db = vec![0.5; oc];
        matmul_backward(
            Some(&mut dinp),
            true,
            &mut dw,
            Some(&mut db),
            &dout,
            &inp,
            &w,
            n,
            c,
            oc,
        );
        let want_dinp = naive(&dout, &w, n, oc, c);
        let doutt: Vec<f32> = (0..n * oc).map(|i| dout[(i % n) * oc + i / n]).collect();
        let want_dw = naive(&doutt, &inp, oc, n, c);
        for i in 0..n * c {
            assert!((dinp[i] - 1.0 - want_dinp[i]).abs() < 1e-5);
        }
        for i in 0..oc * c {
            assert!((dw[i] - want_dw[i]).abs() < 1e-5);
        }
        for j in 0..oc {
            let s: f32 = (0..n).map(|i| dout[i * oc + j]).sum();
            assert!((db[j] - 0.5 - s).abs() < 1e-5);
        }
    }
}
