//! Decoding with a key/value cache: what a model's blocks need to run on new tokens only, the
//! keys and values of the earlier positions kept on the device.
//!
//! A model that decodes says the shape of its cache ([`Model::cache_heads`](super::Model::cache_heads)) and runs each
//! stage with [`Model::forward_cached`](super::Model::forward_cached): the blocks are the training blocks, their attention
//! step (`attend`) writing the new tokens' keys and values into the layer's cache and
//! attending over every cached position instead of over the sequence alone; the positions of
//! the new tokens start at the cache's length (GPT-2's position table, Llama's rotary tables).

use crate::backend::{
    Arena, AttentionActs, AttentionForward, AttentionShape, Buf, CachedAttention, Device,
    DeviceError, KvCacheWrite,
};

/// The attention layers of a model as a cache holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheHeads {
    pub layers: usize,
    /// Key/value heads of each layer.
    pub nkv: usize,
    /// Head size.
    pub hs: usize,
}

/// The keys and values of the positions decoded so far, one (k, v) pair per layer, each
/// (B, NKV, CAP, HS) X.
pub struct KvCache {
    layers: Vec<(Buf, Buf)>,
    heads: CacheHeads,
    capacity: usize,
    len: usize,
}

/// One layer's cache as a block's attention sees it: the position of the first new token.
#[derive(Clone, Copy, Debug)]
pub struct LayerCache<'a> {
    pub k: &'a Buf,
    pub v: &'a Buf,
    pub pos: usize,
    pub capacity: usize,
}

impl KvCache {
    /// An empty cache for `b` sequences of up to `capacity` positions, from `arena`.
    pub fn alloc(
        arena: &Arena,
        heads: CacheHeads,
        b: usize,
        capacity: usize,
        x: crate::backend::DType,
    ) -> Result<KvCache, DeviceError> {
        let len = b * heads.nkv * capacity * heads.hs;
        let layers = (0..heads.layers)
            .map(|_| Ok((arena.alloc(CACHE, x, len)?, arena.alloc(CACHE, x, len)?)))
            .collect::<Result<_, DeviceError>>()?;
        Ok(KvCache {
            layers,
            heads,
            capacity,
            len: 0,
        })
    }

    /// Positions held: the position of the next new token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The cache of attention layer `layer` for new tokens at the cache's length.
    pub fn layer(&self, layer: usize) -> Result<LayerCache<'_>, DeviceError> {
        let (k, v) = self.layers.get(layer).ok_or_else(|| {
            DeviceError::op(
                "kv cache",
                format!("layer {layer} of a cache of {}", self.heads.layers),
            )
        })?;
        Ok(LayerCache {
            k,
            v,
            pos: self.len,
            capacity: self.capacity,
        })
    }

    /// Counts `t` new positions as held (after every layer has written them).
    pub fn advance(&mut self, t: usize) -> Result<(), DeviceError> {
        let end = self.len + t;
        if end > self.capacity {
            return Err(DeviceError::op(
                "kv cache",
                format!(
                    "{t} new positions after {} exceed its {} rows",
                    self.len, self.capacity
                ),
            ));
        }
        self.len = end;
        Ok(())
    }
}

const CACHE: &str = "key/value cache";

/// A block's attention of qkv into `out`: with a cache, the new tokens' keys and values are
/// appended to it and the queries attend over every cached position; without, the training
/// attention over the sequence (filling `acts` for the backward).
pub(crate) fn attend(
    dev: &dyn Device,
    out: &Buf,
    acts: &AttentionActs,
    qkv: &Buf,
    shape: AttentionShape,
    cache: Option<LayerCache<'_>>,
) -> Result<(), DeviceError> {
    let Some(c) = cache else {
        return dev.run(AttentionForward {
            out,
            acts,
            qkv,
            shape,
        });
    };
    dev.run(KvCacheWrite {
        k_cache: c.k,
        v_cache: c.v,
        qkv,
        shape,
        pos: c.pos,
        capacity: c.capacity,
    })?;
    dev.run(CachedAttention {
        out,
        qkv,
        k_cache: c.k,
        v_cache: c.v,
        shape,
        pos: c.pos,
        capacity: c.capacity,
    })
}
