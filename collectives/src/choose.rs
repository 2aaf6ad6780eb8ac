//! Choosing between two ways to run a long reduction by timing whole calls.
//!
//! Some choices in the backends (shm: plain or streaming stores; tcp: small or large ring blocks)
//! win or lose by twofold depending on whether the ranks' cores share a cache, and that can change
//! while a job runs (a hypervisor moves vCPUs; a scheduler moves ranks). Neither a rank's own
//! copies nor any fixed rule tells the cases apart, so rank 0 times whole calls: it keeps the
//! recent speed of each way, uses the faster for the next call, and now and then tries the slower
//! one again (every 8 calls after a change, backing off to every 64). How the choice reaches the
//! other ranks is the backend's business.

use std::time::Duration;

/// Calls moving fewer bytes are not timed (too few steps to measure) and keep the default way.
pub(crate) const CHOSEN_MIN_BYTES: usize = 4 << 20;
/// Calls between tries of the slower way: from `PROBE_MIN`, doubled each time a try confirms the
/// choice, up to `PROBE_MAX` (a try can cost half a call's speed).
const PROBE_MIN: u32 = 8;
const PROBE_MAX: u32 = 64;
/// Recent speeds kept per way; the estimate is their median, so one call that was slowed by
/// something else (a preemption, the caller's other threads) does not flip the choice.
const WINDOW: usize = 3;

/// The reductions whose way is chosen; each has its own chooser (the value indexes a backend's
/// per-reduction state: choosers, shm's header words).
#[derive(Clone, Copy)]
pub(crate) enum Reduction {
    AllReduce = 0,
    ReduceScatter = 1,
}

/// The recent speeds of one way, in bytes per second.
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

/// Rank 0's record of one reduction's calls, and its choice between two ways for the next call.
pub(crate) struct Chooser<K> {
    ways: [K; 2],
    speeds: [Speeds; 2],
    /// Index of the way with the higher recent speed, as of the last call.
    faster: usize,
    /// Calls between tries of the slower way, and calls left until the next try.
    interval: u32,
    until_try: u32,
    /// The way for the next call, as of the last `record`.
    next: K,
}

impl<K: Copy + PartialEq> Chooser<K> {
    /// A chooser that starts with `first` (the way to use before anything is measured).
    pub(crate) fn new(first: K, second: K) -> Self {
        Self {
            ways: [first, second],
            speeds: Default::default(),
            faster: 0,
            interval: PROBE_MIN,
            until_try: PROBE_MIN,
            next: first,
        }
    }

    /// The way for the next call: the last `record`'s answer (`first` before any).
    pub(crate) fn next(&self) -> K {
        self.next
    }

    /// Records a call of `bytes` that took `elapsed` with `used`, and returns the way for the
    /// next call: a way not yet measured, else the faster recent way, except that every
    /// `interval` calls it tries the slower one. A `used` that is neither way is not recorded.
    pub(crate) fn record(&mut self, used: K, bytes: usize, elapsed: Duration) -> K {
        let Some(used) = self.ways.iter().position(|&w| w == used) else {
            return self.ways[self.faster];
        };
        let speed = bytes as f64 / elapsed.as_secs_f64().max(1e-9);
        self.speeds[used].push(speed);
        let (Some(first), Some(second)) = (self.speeds[0].estimate(), self.speeds[1].estimate())
        else {
            self.next = self.ways[1 - used];
            return self.next;
        };
        let faster = if first >= second { 0 } else { 1 };
        if used != self.faster {
            // A try of the slower way: back off while it confirms the choice.
            self.interval = if faster == self.faster {
                (self.interval * 2).min(PROBE_MAX)
            } else {
                PROBE_MIN
            };
            self.until_try = self.interval;
        } else if faster != self.faster {
            // The way in use slowed down: look back soon, it may have been a passing spell.
            self.interval = PROBE_MIN;
            self.until_try = PROBE_MIN;
        }
        self.faster = faster;
        self.until_try = self.until_try.saturating_sub(1);
        self.next = if self.until_try == 0 {
            self.ways[1 - faster]
        } else {
            self.ways[faster]
        };
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `calls` calls at speeds that depend on the way used (`speed[0]` for way 'a', `speed[1]`
    /// for 'b'), starting with `next`; returns the way of each and leaves the choice for the
    /// following call in `next`.
    fn run(c: &mut Chooser<char>, next: &mut char, speed: [f64; 2], calls: usize) -> Vec<char> {
        (0..calls)
            .map(|_| {
                let used = *next;
                let s = speed[usize::from(used == 'b')];
                *next = c.record(used, 1 << 30, Duration::from_secs_f64((1 << 30) as f64 / s));
                used
            })
            .collect()
    }

    fn count(v: &[char], way: char) -> usize {
        v.iter().filter(|&&x| x == way).count()
    }

    #[test]
    fn tries_both_then_keeps_the_faster_and_tries_the_other_ever_less_often() {
        for (speed, slower) in [([6.7e9, 3.5e9], 'b'), ([1.5e9, 3.5e9], 'a')] {
            let (mut c, mut next) = (Chooser::new('a', 'b'), 'a');
            let used = run(&mut c, &mut next, speed, 200);
            assert_eq!(&used[..2], &['a', 'b']);
            // The first measurement, then tries after 8, 16, 32, 64, 64 calls.
            let tries = count(&used, slower);
            assert!((5..=7).contains(&tries), "{tries} calls of the slower way");
            assert!(count(&used[150..], slower) <= 1);
        }
    }

    #[test]
    fn follows_a_change_of_placement() {
        let (mut c, mut next) = (Chooser::new('a', 'b'), 'a');
        run(&mut c, &mut next, [6.7e9, 3.5e9], 100);
        // 'a' slows down: two slow calls (a median of three) move the choice.
        run(&mut c, &mut next, [1.5e9, 3.5e9], 2);
        assert_eq!(next, 'b');
        // And back, once two tries have seen 'a' fast again.
        let used = run(&mut c, &mut next, [6.7e9, 3.5e9], 3 * PROBE_MIN as usize);
        assert_eq!(next, 'a');
        assert_eq!(c.next(), next);
        assert_eq!(used.last(), Some(&'a'));
    }

    #[test]
    fn one_slow_call_does_not_flip_the_choice() {
        let (mut c, mut next) = (Chooser::new('a', 'b'), 'a');
        run(&mut c, &mut next, [6.7e9, 3.5e9], 5);
        assert_eq!(c.record('a', 1 << 30, Duration::from_secs(10)), 'a');
    }

    #[test]
    fn a_way_it_does_not_know_is_not_recorded() {
        let (mut c, mut next) = (Chooser::new('a', 'b'), 'a');
        run(&mut c, &mut next, [6.7e9, 3.5e9], 20);
        assert_eq!(c.record('z', 1, Duration::from_secs(10)), 'a');
        assert_eq!(c.record('a', 1 << 30, Duration::from_millis(150)), 'a');
    }
}
