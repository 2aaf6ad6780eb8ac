//! How ranks write what other ranks read in the reductions: plain or streaming stores, chosen by
//! measuring whole calls.
//!
//! With plain stores a slot's lines stay in the writer's cache; a reader on a core that shares
//! that cache gets them from there, but the next write to the slot must first take the lines
//! back from every reader's cache, and where the cores share no cache each of those is a
//! cross-chip round trip. Streaming stores send the lines to memory instead and readers read
//! memory: the same speed in both placements. Measured on the 2-vCPU dev VM (64 MiB all_reduce
//! busbw): with a shared cache plain 4.4 GB/s and streaming 2.8 (4 ranks), 6.7 and 3.5 (2 ranks);
//! without one plain 1.5 and streaming 2.8 (4 ranks), 1.5 and 3.5 (2 ranks). The hypervisor moves
//! vCPUs between those placements within seconds, and real hosts put ranks on different chiplets,
//! so neither can be fixed. Timing a rank's own copies does not tell them apart (the cost lands
//! on the readers), so rank 0 times whole calls: it keeps the recent speed of each kind,
//! publishes the faster for the next call in the segment header, and now and then tries the
//! slower one again (every 8 calls after a change, backing off to every 64). The choice changes
//! only speed (the bytes in the slots are the same either way), so a rank that reads it a call
//! late is harmless.

use std::time::Duration;

use crate::stream::Stores;

/// Calls moving fewer bytes are not timed (too few steps to measure) and reuse the last choice.
pub(super) const TIMED_MIN_BYTES: usize = 4 << 20;
/// Calls between tries of the slower kind of stores: from `PROBE_MIN`, doubled each time a try
/// confirms the choice, up to `PROBE_MAX` (a try costs up to half a call's speed).
const PROBE_MIN: u32 = 8;
const PROBE_MAX: u32 = 64;
/// Recent speeds kept per kind; the estimate is their median, so one call that was slowed by
/// something else (a preemption, the caller's other threads) does not flip the choice.
const WINDOW: usize = 3;

/// The recent speeds of one kind of stores, in bytes per second.
#[derive(Default)]
struct Speeds {
    recent: [f64; WINDOW],
    next: usize,
    filled: usize,
}

impl Speeds {
    fn push(&mut self, speed: f64) {
        self.recent[self.next] = speed;
        self.next = (self.next + 1) % WINDOW;
        self.filled = (self.filled + 1).min(WINDOW);
    }

    /// The median of the recent speeds; None before the first.
    fn estimate(&self) -> Option<f64> {
        let mut v = self.recent;
        let v = &mut v[..self.filled];
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    }
}

/// Rank 0's record of one reduction's calls, and its choice of stores for the next call.
pub(super) struct StoreChooser {
    plain: Speeds,
    streaming: Speeds,
    /// The kind with the higher recent speed, as of the last call.
    faster: Stores,
    /// Calls between tries of the slower kind, and calls left until the next try.
    interval: u32,
    until_try: u32,
}

impl Default for StoreChooser {
    fn default() -> Self {
        Self {
            plain: Speeds::default(),
            streaming: Speeds::default(),
            faster: Stores::Plain,
            interval: PROBE_MIN,
            until_try: PROBE_MIN,
        }
    }
}

fn other(stores: Stores) -> Stores {
    match stores {
        Stores::Plain => Stores::Streaming,
        Stores::Streaming => Stores::Plain,
    }
}

impl StoreChooser {
    /// Records a call of `bytes` that took `elapsed` with `used`, and returns the stores for the
    /// next call: a kind not yet measured, else the faster recent kind, except that every
    /// `interval` calls it tries the slower one.
    pub(super) fn record(&mut self, used: Stores, bytes: usize, elapsed: Duration) -> Stores {
        let speed = bytes as f64 / elapsed.as_secs_f64().max(1e-9);
        match used {
            Stores::Plain => self.plain.push(speed),
            Stores::Streaming => self.streaming.push(speed),
        }
        let (Some(plain), Some(streaming)) = (self.plain.estimate(), self.streaming.estimate())
        else {
            return other(used);
        };
        let faster = if plain >= streaming {
            Stores::Plain
        } else {
            Stores::Streaming
        };
        if used != self.faster {
            // A try of the slower kind: back off while it confirms the choice.
            self.interval = if faster == self.faster {
                (self.interval * 2).min(PROBE_MAX)
            } else {
                PROBE_MIN
            };
            self.until_try = self.interval;
        } else if faster != self.faster {
            // The kind in use slowed down: look back soon, it may have been a passing spell.
            self.interval = PROBE_MIN;
            self.until_try = PROBE_MIN;
        }
        self.faster = faster;
        self.until_try = self.until_try.saturating_sub(1);
        if self.until_try == 0 {
            other(faster)
        } else {
            faster
        }
    }
}

/// The header word for a choice.
pub(super) fn encode(stores: Stores) -> u32 {
    match stores {
        Stores::Plain => 0,
        Stores::Streaming => 1,
    }
}

/// The choice a header word holds (zero, the segment's initial value, is plain).
pub(super) fn decode(word: u32) -> Stores {
    if word == 1 {
        Stores::Streaming
    } else {
        Stores::Plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `calls` calls at speeds that depend on the stores used, starting with `next`; returns
    /// the stores of each and leaves the choice for the following call in `next`.
    fn run(
        c: &mut StoreChooser,
        next: &mut Stores,
        plain: f64,
        streaming: f64,
        calls: usize,
    ) -> Vec<Stores> {
        (0..calls)
            .map(|_| {
                let used = *next;
                let speed = if used == Stores::Plain {
                    plain
                } else {
                    streaming
                };
                *next = c.record(
                    used,
                    1 << 30,
                    Duration::from_secs_f64((1 << 30) as f64 / speed),
                );
                used
            })
            .collect()
    }

    fn count(v: &[Stores], s: Stores) -> usize {
        v.iter().filter(|&&x| x == s).count()
    }

    #[test]
    fn tries_both_then_keeps_the_faster_and_tries_the_other_ever_less_often() {
        for (plain, streaming, slower) in [
            (6.7e9, 3.5e9, Stores::Streaming),
            (1.5e9, 3.5e9, Stores::Plain),
        ] {
            let (mut c, mut next) = (StoreChooser::default(), Stores::Plain);
            let used = run(&mut c, &mut next, plain, streaming, 200);
            assert_eq!(&used[..2], &[Stores::Plain, Stores::Streaming]);
            // The first measurement, then tries after 8, 16, 32, 64, 64 calls.
            let tries = count(&used, slower);
            assert!((5..=7).contains(&tries), "{tries} calls of the slower kind");
            assert!(used[150..].iter().filter(|&&s| s == slower).count() <= 1);
        }
    }

    #[test]
    fn follows_a_change_of_placement() {
        let (mut c, mut next) = (StoreChooser::default(), Stores::Plain);
        run(&mut c, &mut next, 6.7e9, 3.5e9, 100);
        // Plain stores slow down: two slow calls (a median of three) move the choice.
        run(&mut c, &mut next, 1.5e9, 3.5e9, 2);
        assert_eq!(next, Stores::Streaming);
        // And back, once two tries have seen plain stores fast again.
        let used = run(&mut c, &mut next, 6.7e9, 3.5e9, 3 * PROBE_MIN as usize);
        assert_eq!(next, Stores::Plain);
        assert_eq!(used.last(), Some(&Stores::Plain));
    }

    #[test]
    fn one_slow_call_does_not_flip_the_choice() {
        let (mut c, mut next) = (StoreChooser::default(), Stores::Plain);
        run(&mut c, &mut next, 6.7e9, 3.5e9, 5);
        let next = c.record(Stores::Plain, 1 << 30, Duration::from_secs(10));
        assert_eq!(next, Stores::Plain);
    }

    #[test]
    fn header_words_round_trip() {
        for s in [Stores::Plain, Stores::Streaming] {
            assert_eq!(decode(encode(s)), s);
        }
        assert_eq!(decode(0), Stores::Plain);
    }
}
