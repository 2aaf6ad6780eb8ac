//! The schedule of a walk and its memory plan, computed once ("push ifs up"): the ordered uses
//! of the model's stages (forward, head, backward, per micro-batch), which gathered parameter
//! copy and which gradient buffer each use reads and writes, when the host issues each
//! all-gather (ahead of its use, within `zero.prefetch_bytes_max`), and where each transient
//! buffer lives in its pool. The walk only carries the plan out.
//!
//! Transient buffers — gathered parameters of sharded units, full gradients of units whose
//! gradients are sharded — live in two pools. Each buffer occupies its pool over an interval of
//! use indices; buffers whose intervals overlap get disjoint memory (a greedy placement, largest
//! first, at the lowest offset that fits). A buffer that reuses memory waits for the release
//! events of the buffers that held it before (`after`), so queues order the reuse by events
//! alone. Every such wait refers to an event recorded earlier in the host's submission order,
//! so waits cannot form a cycle.

use std::ops::Range;

/// What a use does with its stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UseKind {
    Forward,
    /// The last stage: forward, loss and (when training) its backward in one call.
    Head,
    Backward,
}

/// One call of a stage for one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Use {
    pub micro: usize,
    pub stage: usize,
    pub kind: UseKind,
}

/// A transient buffer in a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transient {
    pub unit: usize,
    /// Uses from `first` to `last` (inclusive) read it.
    pub first: usize,
    pub last: usize,
    /// The host fills it (issues its gather, or zeroes it) before use `start` ≤ `first`.
    pub start: usize,
    /// Elements from this offset of its pool.
    pub offset: usize,
    pub len: usize,
    /// Buffers that held (part of) this memory before: their release events come first.
    pub after: Vec<usize>,
}

impl Transient {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// What the planner needs to know about the model and the partitioning.
pub struct PlanInput<'a> {
    /// Units of each stage (the model's stages).
    pub stage_units: &'a [Vec<usize>],
    /// Padded elements of each unit.
    pub unit_len: &'a [usize],
    /// Units whose parameters are gathered before each use.
    pub gathered: &'a [bool],
    /// Units whose gradients are reduce-scattered (and so need a transient full buffer).
    pub grad_sharded: &'a [bool],
    /// Micro-batches of the walk.
    pub micro: usize,
    /// Training walk (forward, head with backward, backward) or evaluation (forward, head).
    pub train: bool,
    /// Bytes per parameter element (X).
    pub param_bytes: usize,
    /// Data-parallel ranks.
    pub world: usize,
}

/// The knobs the planner trades against the parameter pool's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookahead {
    /// Bytes of gathers issued ahead of the use computing now.
    pub prefetch_bytes: usize,
    /// A gathered copy is kept (not released and gathered again) when the unit's next use
    /// follows within this many uses.
    pub reuse_gap: usize,
}

/// The plan of one walk.
#[derive(Clone, Debug)]
pub struct Plan {
    pub uses: Vec<Use>,
    /// Gathered parameter copies, in the order the host issues them.
    pub gathers: Vec<Transient>,
    /// Per use, per unit of its stage: the gather it reads (None: the unit's whole parameters).
    pub use_gathers: Vec<Vec<Option<usize>>>,
    /// Full gradient buffers of units with sharded gradients, in order of first use.
    pub grad_buffers: Vec<Transient>,
    /// Per use, per unit of its stage: the gradient buffer it writes (None: whole gradients).
    pub use_grads: Vec<Vec<Option<usize>>>,
    /// Per use: the gathers and the gradient buffers whose last use it is.
    pub gathers_ending: Vec<Vec<usize>>,
    pub grads_ending: Vec<Vec<usize>>,
    /// Per use of a training walk: the units of its stage with whole gradients whose last
    /// backward use it is (their gradients are complete after it: all-reduced, taken to the
    /// host optimizer).
    pub whole_grads_done: Vec<Vec<usize>>,
    /// The walk has work for the communication queue (several ranks, gathers or gradient
    /// buffers): the queues meet at its start, and compute waits for the queue at its end.
    pub comm_queue: bool,
    /// Elements of the parameter pool (X) and the gradient pool (f32).
    pub param_pool_len: usize,
    pub grad_pool_len: usize,
}

/// The uses of a walk: for each micro-batch, every stage forward, the head, then (training)
/// every stage but the head backward.
pub fn uses(stages: usize, micro: usize, train: bool) -> Vec<Use> {
    let last = stages - 1;
    let mut out = Vec::new();
    for m in 0..micro {
        let at = |stage, kind| Use {
            micro: m,
            stage,
            kind,
        };
        out.extend((0..last).map(|s| at(s, UseKind::Forward)));
        out.push(at(last, UseKind::Head));
        if train {
            out.extend((0..last).rev().map(|s| at(s, UseKind::Backward)));
        }
    }
    out
}

impl Plan {
    pub fn new(input: &PlanInput<'_>, look: Lookahead) -> Plan {
        let uses = uses(input.stage_units.len(), input.micro, input.train);
        let (mut gathers, use_gathers) = gather_intervals(input, &uses, look.reuse_gap);
        set_issue_points(&mut gathers, input.param_bytes, look.prefetch_bytes);
        let param_pool_len = place(&mut gathers);
        let (mut grad_buffers, use_grads) = grad_intervals(input, &uses);
        let grad_pool_len = place(&mut grad_buffers);
        let ending = |buffers: &[Transient]| {
            let mut at = vec![Vec::new(); uses.len()];
            for (k, b) in buffers.iter().enumerate() {
                at[b.last].push(k);
            }
            at
        };
        Plan {
            gathers_ending: ending(&gathers),
            grads_ending: ending(&grad_buffers),
            whole_grads_done: whole_grads_done(input, &uses),
            comm_queue: input.world > 1 || !gathers.is_empty() || !grad_buffers.is_empty(),
            uses,
            gathers,
            use_gathers,
            grad_buffers,
            use_grads,
            param_pool_len,
            grad_pool_len,
        }
    }
}

/// Per use of a training walk, the units of its stage (in stage order) with whole gradients
/// whose last backward use it is.
fn whole_grads_done(input: &PlanInput<'_>, uses: &[Use]) -> Vec<Vec<usize>> {
    let mut last = vec![None; input.unit_len.len()];
    if input.train {
        for (i, u) in uses.iter().enumerate() {
            if u.kind != UseKind::Forward {
                for &unit in &input.stage_units[u.stage] {
                    last[unit] = Some(i);
                }
            }
        }
    }
    uses.iter()
        .enumerate()
        .map(|(i, u)| {
            input.stage_units[u.stage]
                .iter()
                .copied()
                .filter(|&unit| last[unit] == Some(i) && !input.grad_sharded[unit])
                .collect()
        })
        .collect()
}

/// One gathered copy per run of uses of a unit (a run continues while the next use follows
/// within `reuse_gap` uses).
fn gather_intervals(
    input: &PlanInput<'_>,
    uses: &[Use],
    reuse_gap: usize,
) -> (Vec<Transient>, Vec<Vec<Option<usize>>>) {
    let mut gathers: Vec<Transient> = Vec::new();
    let mut open: Vec<Option<usize>> = vec![None; input.unit_len.len()];
    let mut per_use = Vec::with_capacity(uses.len());
    for (i, u) in uses.iter().enumerate() {
        let mut row = Vec::new();
        for &unit in &input.stage_units[u.stage] {
            if !input.gathered[unit] {
                row.push(None);
                continue;
            }
            // Consecutive uses always share a copy (nothing else is alive in between).
            let g = match open[unit] {
                Some(g) if i - gathers[g].last <= reuse_gap.max(1) => g,
                _ => {
                    gathers.push(Transient {
                        unit,
                        first: i,
                        last: i,
                        start: i,
                        offset: 0,
                        len: input.unit_len[unit],
                        after: Vec::new(),
                    });
                    gathers.len() - 1
                }
            };
            gathers[g].last = i;
            open[unit] = Some(g);
            row.push(Some(g));
        }
        per_use.push(row);
    }
    (gathers, per_use)
}

/// Issue points: with a prefetch budget, a gather is issued at least one use ahead of its first
/// use, and further ahead while the gathers still to come, up to and including it, fit in
/// `prefetch_bytes`; without one, at its first use.
fn set_issue_points(gathers: &mut [Transient], elem_bytes: usize, prefetch_bytes: usize) {
    for k in 0..gathers.len() {
        let first = gathers[k].first;
        let mut start = first;
        // With any prefetch at all, the next unit is gathered while the current one computes.
        if prefetch_bytes > 0 && start > 0 {
            start -= 1;
        }
        while start > 0 {
            // Bytes of the gathers the host would issue ahead at use `start - 1`.
            let ahead: usize = gathers[..=k]
                .iter()
                .filter(|g| g.first > start - 1 && g.first <= first)
                .map(|g| g.len * elem_bytes)
                .sum();
            if ahead > prefetch_bytes {
                break;
            }
            start -= 1;
        }
        // Issue order follows first-use order: never earlier than the previous gather.
        let floor = if k > 0 { gathers[k - 1].start } else { 0 };
        gathers[k].start = start.max(floor);
    }
}

/// One full gradient buffer per unit with sharded gradients and micro-batch, from its first
/// backward use (the head's, for the tied embedding) to its last.
fn grad_intervals(
    input: &PlanInput<'_>,
    uses: &[Use],
) -> (Vec<Transient>, Vec<Vec<Option<usize>>>) {
    let mut buffers: Vec<Transient> = Vec::new();
    let mut open: Vec<Option<(usize, usize)>> = vec![None; input.unit_len.len()];
    let mut per_use = Vec::with_capacity(uses.len());
    for (i, u) in uses.iter().enumerate() {
        let backward = input.train && u.kind != UseKind::Forward;
        let mut row = Vec::new();
        for &unit in &input.stage_units[u.stage] {
            if !backward || !input.grad_sharded[unit] {
                row.push(None);
                continue;
            }
            let b = match open[unit] {
                Some((micro, b)) if micro == u.micro => b,
                _ => {
                    buffers.push(Transient {
                        unit,
                        first: i,
                        last: i,
                        start: i,
                        offset: 0,
                        len: input.unit_len[unit],
                        after: Vec::new(),
                    });
                    buffers.len() - 1
                }
            };
            buffers[b].last = i;
            open[unit] = Some((u.micro, b));
            row.push(Some(b));
        }
        per_use.push(row);
    }
    (buffers, per_use)
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Places every buffer at the lowest offset free of buffers alive at the same time (largest
/// first), records which earlier buffers held its memory, and returns the pool's length.
fn place(buffers: &mut [Transient]) -> usize {
    let mut order: Vec<usize> = (0..buffers.len()).collect();
    order.sort_by(|&a, &b| {
        buffers[b]
            .len
            .cmp(&buffers[a].len)
            .then(buffers[a].start.cmp(&buffers[b].start))
    });
    let mut placed: Vec<usize> = Vec::new();
    for &k in &order {
        let live = buffers[k].start..buffers[k].last + 1;
        let mut busy: Vec<Range<usize>> = placed
            .iter()
            .filter(|&&p| overlaps(&live, &(buffers[p].start..buffers[p].last + 1)))
            .map(|&p| buffers[p].range())
            .collect();
        busy.sort_by_key(|r| r.start);
        let mut offset = 0;
        for r in &busy {
            if offset + buffers[k].len <= r.start {
                break;
            }
            offset = offset.max(r.end);
        }
        buffers[k].offset = offset;
        placed.push(k);
    }
    // Earlier occupants of each buffer's memory, keeping only the last one over each part.
    for k in 0..buffers.len() {
        let mine = buffers[k].range();
        let mut before: Vec<usize> = (0..buffers.len())
            .filter(|&p| buffers[p].last < buffers[k].start && overlaps(&mine, &buffers[p].range()))
            .collect();
        before.sort_by_key(|&p| std::cmp::Reverse(buffers[p].last));
        let mut covered: Vec<Range<usize>> = Vec::new();
        let mut after = Vec::new();
        for p in before {
            let part = {
                let r = buffers[p].range();
                r.start.max(mine.start)..r.end.min(mine.end)
            };
            if !covered
                .iter()
                .any(|c| c.start <= part.start && part.end <= c.end)
            {
                after.push(p);
                covered.push(part);
            }
        }
        after.sort_unstable();
        buffers[k].after = after;
    }
    buffers.iter().map(|b| b.offset + b.len).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPT-2-like model: embed, L blocks, head (ln_f + the tied embedding).
    fn gpt(l: usize) -> (Vec<Vec<usize>>, Vec<usize>) {
        let mut stages = vec![vec![0]];
        stages.extend((0..l).map(|i| vec![1 + i]));
        stages.push(vec![l + 1, 0]);
        let mut lens = vec![5000];
        lens.extend(std::iter::repeat_n(1000, l));
        lens.push(64);
        (stages, lens)
    }

    fn check(plan: &Plan) {
        for pool in [&plan.gathers, &plan.grad_buffers] {
            for (a, x) in pool.iter().enumerate() {
                assert!(x.start <= x.first && x.first <= x.last);
                for y in pool.iter().skip(a + 1) {
                    let (tx, ty) = (x.start..x.last + 1, y.start..y.last + 1);
                    if overlaps(&tx, &ty) {
                        assert!(
                            !overlaps(&x.range(), &y.range()),
                            "{x:?} and {y:?} share memory while alive"
                        );
                    }
                }
                for &p in &x.after {
                    assert!(pool[p].last < x.start && overlaps(&pool[p].range(), &x.range()));
                }
            }
        }
        // Every gather is issued in order and before its use.
        assert!(plan.gathers.windows(2).all(|w| w[0].start <= w[1].start));
    }

    #[test]
    fn without_prefetch_the_pool_holds_one_stage() {
        let (stages, lens) = gpt(4);
        let all = vec![true; lens.len()];
        let input = PlanInput {
            stage_units: &stages,
            unit_len: &lens,
            gathered: &all,
            grad_sharded: &all,
            micro: 2,
            train: true,
            param_bytes: 2,
            world: 1,
        };
        let plan = Plan::new(
            &input,
            Lookahead {
                prefetch_bytes: 0,
                reuse_gap: 0,
            },
        );
        check(&plan);
        assert_eq!(plan.uses.len(), 2 * (5 + 1 + 5));
        // The head needs ln_f and the embedding at once: the largest stage.
        assert_eq!(plan.param_pool_len, 5000 + 64);
        // The embedding's gradient lives from the head to the end of backward, beside a block's.
        assert_eq!(plan.grad_pool_len, 5000 + 1000);
        // Every use of a gathered unit reads a gather that covers it.
        for (i, row) in plan.use_gathers.iter().enumerate() {
            for (k, g) in row.iter().enumerate() {
                let g = &plan.gathers[g.expect("all gathered")];
                assert_eq!(g.unit, stages[plan.uses[i].stage][k]);
                assert!(g.first <= i && i <= g.last);
            }
        }
    }

    #[test]
    fn prefetch_issues_gathers_ahead_within_its_bytes() {
        let (stages, lens) = gpt(6);
        let all = vec![true; lens.len()];
        let none = vec![false; lens.len()];
        let input = PlanInput {
            stage_units: &stages,
            unit_len: &lens,
            gathered: &all,
            grad_sharded: &none,
            micro: 1,
            train: true,
            param_bytes: 2,
            world: 1,
        };
        let plan = Plan::new(
            &input,
            Lookahead {
                prefetch_bytes: 4000,
                reuse_gap: 2,
            },
        );
        check(&plan);
        // Two blocks (2000 bytes each) ahead: block i+2 is issued at block i's use.
        let block = |b: usize| plan.gathers.iter().position(|g| g.unit == 1 + b).unwrap();
        assert_eq!(plan.gathers[block(3)].start, plan.gathers[block(1)].first);
        let ahead = |i: usize| -> usize {
            plan.gathers
                .iter()
                .filter(|g| g.start <= i && g.first > i)
                .map(|g| g.len * 2)
                .sum()
        };
        // Within the budget, beyond the next use's gathers (always issued one use ahead).
        let next = |i: usize| -> usize {
            let Some(first) = plan
                .gathers
                .iter()
                .map(|g| g.first)
                .filter(|&f| f > i)
                .min()
            else {
                return 0;
            };
            plan.gathers
                .iter()
                .filter(|g| g.first == first)
                .map(|g| g.len * 2)
                .sum()
        };
        assert!((0..plan.uses.len()).all(|i| ahead(i) <= 4000 + next(i)));
        // The last block's copy is kept across the head (its next use is 2 uses later).
        let last_block = plan.gathers.iter().filter(|g| g.unit == 6).count();
        assert_eq!(last_block, 1);
        assert!(plan.param_pool_len > 5064);
        assert!(plan.grad_buffers.is_empty());
    }

    #[test]
    fn whole_units_need_no_transient_buffers() {
        let (stages, lens) = gpt(2);
        let none = vec![false; lens.len()];
        let input = PlanInput {
            stage_units: &stages,
            unit_len: &lens,
            gathered: &none,
            grad_sharded: &none,
            micro: 3,
            train: false,
            param_bytes: 4,
            world: 1,
        };
        let plan = Plan::new(
            &input,
            Lookahead {
                prefetch_bytes: 1 << 20,
                reuse_gap: 2,
            },
        );
        assert_eq!((plan.param_pool_len, plan.grad_pool_len), (0, 0));
        assert_eq!(plan.uses.len(), 3 * 4);
        assert!(plan.use_gathers.iter().flatten().all(Option::is_none));
    }
}
