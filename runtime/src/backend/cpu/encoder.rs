//! Token embedding, plus GPT-2's position embedding when there is one.

use rayon::prelude::*;

/// out (B, T, C) = `wte[token]` (+ `wpe[t]` when given).
pub fn encoder_forward(
    out: &mut [f32],
    tokens: &[u32],
    wte: &[f32],
    wpe: Option<&[f32]>,
    t: usize,
    c: usize,
) {
    assert_eq!(out.len(), tokens.len() * c);
    out.par_chunks_mut(c)
        .zip(tokens.par_iter())
        .enumerate()
        .for_each(|(bt, (o, &tok))| {
            let pos = bt % t;
            let e = &wte[tok as usize * c..(tok as usize + 1) * c];
            match wpe {
                Some(wpe) => {
                    let p = &wpe[pos * c..(pos + 1) * c];
                    o.iter_mut()
                        .zip(e.iter().zip(p))
                        .for_each(|(o, (e, p))| *o = e + p);
                }
                None => o.copy_from_slice(e),
            }
        });
}

/// `dwte[token] += dout; dwpe[t] += dout` (when given). Split over channel blocks so threads never
/// write the same element.
pub fn encoder_backward(
    dwte: &mut [f32],
    dwpe: Option<&mut [f32]>,
    dout: &[f32],
    tokens: &[u32],
    t: usize,
    c: usize,
) {
    assert_eq!(dout.len(), tokens.len() * c);
    const BLOCK: usize = 64;
    let blocks = c.div_ceil(BLOCK);
    let vocab = dwte.len() / c;
    let max_t = dwpe.as_ref().map_or(t, |d| d.len() / c);
    // Each task owns the channels [k·BLOCK, (k+1)·BLOCK) of every row of dwte and dwpe.
    let wte_ptr = SendPtr(dwte.as_mut_ptr());
    let wpe_ptr = dwpe.map(|d| SendPtr(d.as_mut_ptr()));
    (0..blocks).into_par_iter().for_each(|k| {
        let lo = k * BLOCK;
        let hi = (lo + BLOCK).min(c);
        for (bt, &tok) in tokens.iter().enumerate() {
            let pos = bt % t;
            assert!((tok as usize) < vocab && pos < max_t);
            let d = &dout[bt * c + lo..bt * c + hi];
            // SAFETY: task k writes only channels lo..hi of each row; tasks have disjoint channel ranges, and
            // the row indices were checked against the buffer lengths just above.
            unsafe {
                let e = std::slice::from_raw_parts_mut(
                    wte_ptr.get().add(tok as usize * c + lo),
                    hi - lo,
                );
                for i in 0..hi - lo {
                    e[i] += d[i];
                }
                if let Some(wpe_ptr) = wpe_ptr {
                    let p =
                        std::slice::from_raw_parts_mut(wpe_ptr.get().add(pos * c + lo), hi - lo);
                    for i in 0..hi - lo {
                        p[i] += d[i];
                    }
                }
            }
        }
    });
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint column ranges of one buffer to rayon tasks (see encoder_backward).
unsafe impl Send for SendPtr {}
// SAFETY: as above; the pointer itself is only read.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
