//! Bounded pieces of text: no tokenizer sees more than [`PIECE_BYTES_MAX`] bytes at once.
//!
//! BPE merges within a pre-tokenized word cost time quadratic in the word's length in tiktoken (a 16 MB line
//! of one letter took 14 s and 800 MB), and every tokenizer holds per-byte state for its whole input. So a
//! longer text is cut into pieces, each tokenized on its own. A cut is made where the pre-tokenizers of
//! GPT-2, Llama 3 and the SentencePiece family (Metaspace) start a new word anyway, so that the tokens are
//! those of the uncut text:
//! - before a space between two non-space characters (`x| y`): GPT-2's and Llama 3's patterns attach the
//!   space to the next word, and Metaspace turns it into the `▁` that begins the next word; or
//! - after a newline followed by a non-space character (`\n|x`): both patterns end a word at a newline that
//!   is followed by a letter, digit or symbol.
//!
//! The last such place within [`PIECE_BYTES_MAX`] bytes is taken; a run of that many bytes without one (a
//! line of one letter, a base64 blob) is cut at a character boundary, where the tokens may differ from an
//! unbounded tokenizer's. Known difference: a tokenizer that unconditionally prepends `▁` to its input
//! (Llama 2's legacy normalizer) sees one extra `▁` at each `\n|x` cut.

/// The most bytes of text tokenized at once.
pub const PIECE_BYTES_MAX: usize = 64 << 10;

/// The length of the first piece of `text` when pieces have at most `max` bytes (`text.len()` if it fits).
pub fn cut(text: &str, max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    let bytes = text.as_bytes();
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let word = |b: u8| !b.is_ascii_whitespace();
    // p is the first byte of the next piece; it follows or is an ASCII byte, so it is a character boundary.
    for p in (1..=end).rev() {
        let space_between =
            bytes[p] == b' ' && word(bytes[p - 1]) && bytes.get(p + 1).is_some_and(|&b| word(b));
        let after_newline = bytes[p - 1] == b'\n' && word(bytes[p]);
        if space_between || after_newline {
            return p;
        }
    }
    // No word boundary in the window: at least one character, so that every cut makes progress.
    if end == 0 {
        end = text.chars().next().map_or(text.len(), char::len_utf8);
    }
    end
}

/// `text` as pieces of at most `max` bytes (one longer only if a single character is), each with its byte
/// offset in `text`.
pub fn pieces(text: &str, max: usize) -> impl Iterator<Item = (usize, &str)> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        let rest = &text[offset..];
        if rest.is_empty() {
            return None;
        }
        let n = cut(rest, max);
        let piece = (offset, &rest[..n]);
        offset += n;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_word_boundaries_and_bounds_runs() {
        assert_eq!(cut("short", 10), 5);
        // The last "x| y" within 10 bytes: before " dd".
        assert_eq!(cut("aa bb cc dd", 10), 8);
        // After a newline followed by a letter.
        assert_eq!(cut("aaaa.\nbbbbbbbbbb", 10), 6);
        // Not between two spaces, nor before a newline.
        assert_eq!(cut("aaaa  \n  bbbbbbbbb", 10), 10);
        // A run without boundaries: cut at a character boundary (é is 2 bytes: 9 not 10).
        assert_eq!(cut("aaaaaaaaaébbbb", 10), 9);
        let long = "x".repeat(1000);
        let all: Vec<_> = pieces(&long, 64).collect();
        assert_eq!(all.len(), 16);
        assert!(all.iter().all(|(_, p)| p.len() <= 64));
        assert_eq!(all.iter().map(|(_, p)| *p).collect::<String>(), long);
        assert_eq!(all[3].0, 192);
        // A character longer than the bound still makes progress.
        assert_eq!(pieces("😀😀", 2).count(), 2);
    }
}
