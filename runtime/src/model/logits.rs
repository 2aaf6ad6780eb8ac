//! The LM heads' logits are computed in chunks of rows and each chunk's backward runs at once,
//! so the (B·T × Vp) logits never exist in full, on either backend (for GPT-2 124M at
//! B·T = 4096 they would take 823 MB in f32, for GPT 1.3B at B·T = 8192 824 MB in bf16, for
//! Llama 3's vocabulary of 128,256 at B·T = 8192 2.1 GB in bf16).

/// Bytes of logits held at once.
const LOGITS_CHUNK_BYTES: usize = 256 << 20;
/// Chunks of more rows than this are rounded up to a multiple of it (GEMM-friendly sizes).
const ROW_ALIGN: usize = 64;

/// Rows per chunk for `rows` rows of `vp` logits of `elem_bytes` each: the chunks are of equal
/// size, at most about `LOGITS_CHUNK_BYTES`.
pub fn rows_per_chunk(rows: usize, vp: usize, elem_bytes: usize) -> usize {
    let max_rows = (LOGITS_CHUNK_BYTES / (vp * elem_bytes).max(1)).max(1);
    let chunks = rows.div_ceil(max_rows).max(1);
    let even = rows.div_ceil(chunks);
    if even > ROW_ALIGN {
        even.next_multiple_of(ROW_ALIGN).min(rows)
    } else {
        even
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_even_bounded_and_cover_every_row() {
        // GPT 1.3B on a GPU: 8192 rows of 50304 bf16 logits → four chunks of 2048 rows.
        assert_eq!(rows_per_chunk(8192, 50304, 2), 2048);
        // GPT-2 124M on the CPU: 4096 rows of 50304 f32 → four chunks of 1024.
        assert_eq!(rows_per_chunk(4096, 50304, 4), 1024);
        // Small vocabularies fit in one chunk.
        assert_eq!(rows_per_chunk(1024, 256, 4), 1024);
        for (rows, vp) in [(1000, 50304), (7, 1 << 30), (4097, 50304)] {
            let r = rows_per_chunk(rows, vp, 4);
            assert!(r >= 1 && r <= rows);
            assert!(r * vp * 4 <= LOGITS_CHUNK_BYTES + ROW_ALIGN * vp * 4 || r == 1);
        }
    }
}
