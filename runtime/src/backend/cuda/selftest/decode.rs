//! Decoding's operations on the GPU against the CPU backend's (`cpu::decode`): the key/value
//! cache write and the attention of new tokens over the cache.

use super::{Harness, Result};
use crate::backend::cpu::decode;
use crate::backend::{AttentionShape, CachedAttention, KvCacheWrite};

/// T = `s.t` new tokens at `pos` into caches of `capacity` rows whose rows below `pos` hold
/// earlier keys and values and whose rows after the new ones hold large values that no query may
/// read (they would swamp its softmax).
pub(super) fn check_decode(
    h: &mut Harness<'_>,
    s: AttentionShape,
    pos: usize,
    capacity: usize,
) -> Result<()> {
    let len = s.b * s.nkv * capacity * s.hs;
    let qkv = h.rand_x(s.qkv_len(), 1.0);
    let cache = |h: &mut Harness<'_>| {
        let earlier = h.rand_x(len, 1.0);
        earlier
            .chunks_exact(s.hs)
            .enumerate()
            .flat_map(|(row, r)| {
                let p = row % capacity;
                let value = if p < pos { None } else { Some(30.0) };
                r.iter().map(move |&x| value.unwrap_or(x))
            })
            .collect::<Vec<f32>>()
    };
    let (mut k, mut v) = (cache(h), cache(h));
    let (d_k, d_v, d_qkv) = (h.put_x(&k)?, h.put_x(&v)?, h.put_x(&qkv)?);
    h.gpu.run(KvCacheWrite {
        k_cache: &d_k,
        v_cache: &d_v,
        qkv: &d_qkv,
        shape: s,
        pos,
        capacity,
    })?;
    decode::kv_cache_write(&mut k, &mut v, &qkv, s, pos, capacity);
    h.compare("kv_cache_write/k_cache", &d_k, &k, 1)?;
    h.compare("kv_cache_write/v_cache", &d_v, &v, 1)?;
    let d_out = h.poisoned(h.gpu.x(), s.out_len())?;
    h.gpu.run(CachedAttention {
        out: &d_out,
        qkv: &d_qkv,
        k_cache: &d_k,
        v_cache: &d_v,
        shape: s,
        pos,
        capacity,
    })?;
    let mut want = vec![0.0; s.out_len()];
    decode::cached_attention(&mut want, &qkv, &k, &v, s, pos, capacity);
    h.compare("cached_attention/out", &d_out, &want, 2)
}
