//! A queue of host work with the ordering rules of a CUDA stream: jobs run one after another on
//! a worker thread, in submission order; a [`Ticket`] marks a point in the queue that the host
//! or another queue can wait on. Every queue of the CPU backend is one of these, and the GPU
//! backend's NVMe I/O queue.
//!
//! Failures: a job that returns an error (or panics) poisons the queue: later jobs are skipped
//! and every wait on a point at or after the failure returns the error, as a CUDA stream's
//! sticky error does. Bounds: at most `JOBS_MAX` jobs wait in a queue (submission blocks beyond
//! that), and a wait fails when the queue it waits on has completed nothing for the stall
//! timeout while work is pending (a deadlock between queues, or a peer that never answers).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::device::{charge, DeviceError, OpTime, Result};

/// Most jobs waiting in one queue before `submit` blocks.
pub const JOBS_MAX: usize = 4096;

/// The name of the job that makes a queue wait for another's event.
pub const WAIT_OP: &str = "wait for event";

/// A unit of work: runs once on the queue's thread.
pub type Job = Box<dyn FnOnce() -> Result<()> + Send>;

struct Pending {
    seq: u64,
    op: &'static str,
    job: Job,
}

struct State {
    jobs: VecDeque<Pending>,
    submitted: u64,
    completed: u64,
    /// The job running now and since when.
    running: Option<(&'static str, Instant)>,
    last_progress: Instant,
    /// The first failure: its sequence number and message.
    error: Option<(u64, String)>,
    closed: bool,
    /// Time per operation while a profile is open.
    profile: Option<Vec<OpTime>>,
    /// Since the queue started: time in jobs, and in waits for other queues' events.
    times: QueueTime,
}

/// Where a queue's thread spent its time since the queue started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueTime {
    /// Running jobs other than waits.
    pub busy: Duration,
    /// Waiting for another queue's event.
    pub waited: Duration,
}

struct Shared {
    name: &'static str,
    stall_timeout: Duration,
    state: Mutex<State>,
    /// Signalled when a job is submitted or the queue closes.
    work: Condvar,
    /// Signalled when a job completes.
    progress: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue_error(&self, message: String) -> DeviceError {
        DeviceError::Queue {
            queue: self.name,
            message,
        }
    }

    /// Blocks until `seq` has completed; errors when a job up to `seq` failed or the queue stalls.
    fn wait_for(&self, seq: u64) -> Result<()> {
        let mut state = self.lock();
        loop {
            if let Some((failed, message)) = &state.error {
                if *failed <= seq {
                    return Err(DeviceError::Failed {
                        queue: self.name,
                        message: message.clone(),
                    });
                }
            }
            if state.completed >= seq {
                return Ok(());
            }
            let idle = state.last_progress.elapsed();
            if idle >= self.stall_timeout {
                let doing = match state.running {
                    Some((op, since)) => {
                        format!("{op} running for {:.1}s", since.elapsed().as_secs_f64())
                    }
                    None => "no job running".into(),
                };
                return Err(self.queue_error(format!(
                    "no progress for {:.0}s ({doing}; {} of {} jobs done): a wait that can never end, or a peer that does not answer",
                    idle.as_secs_f64(),
                    state.completed,
                    state.submitted
                )));
            }
            let slice = (self.stall_timeout - idle).min(Duration::from_millis(500));
            state = self
                .progress
                .wait_timeout(state, slice)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A point in a queue's work.
#[derive(Clone)]
pub struct Ticket {
    shared: Arc<Shared>,
    seq: u64,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({} #{})", self.shared.name, self.seq)
    }
}

impl Ticket {
    /// Blocks until the work before this point has finished.
    pub fn wait(&self) -> Result<()> {
        self.shared.wait_for(self.seq)
    }

    /// Whether the work before this point has finished (non-blocking; errors count as done).
    pub fn is_complete(&self) -> bool {
        let state = self.shared.lock();
        state.completed >= self.seq || state.error.as_ref().is_some_and(|(s, _)| *s <= self.seq)
    }

    /// The queue this ticket belongs to.
    pub fn queue_name(&self) -> &'static str {
        self.shared.name
    }
}

/// One worker thread and its job list.
pub struct HostQueue {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HostQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostQueue({})", self.shared.name)
    }
}

impl HostQueue {
    /// Starts the worker thread `strata-<name>`.
    pub fn new(name: &'static str, stall_timeout: Duration) -> Result<HostQueue> {
        let shared = Arc::new(Shared {
            name,
            stall_timeout,
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                submitted: 0,
                completed: 0,
                running: None,
                last_progress: Instant::now(),
                error: None,
                closed: false,
                profile: None,
                times: QueueTime::default(),
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
        });
        let for_worker = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name(format!("strata-{name}"))
            .spawn(move || run_worker(&for_worker))
            .map_err(|e| DeviceError::Queue {
                queue: name,
                message: format!("cannot start its thread: {e}"),
            })?;
        Ok(HostQueue {
            shared,
            worker: Some(worker),
        })
    }

    pub fn name(&self) -> &'static str {
        self.shared.name
    }

    /// Enqueues `job` (named `op` in errors and profiles) and returns at once.
    pub fn submit(&self, op: &'static str, job: Job) -> Result<()> {
        let mut state = self.shared.lock();
        let started = Instant::now();
        while state.jobs.len() >= JOBS_MAX {
            if started.elapsed() >= self.shared.stall_timeout {
                return Err(self.shared.queue_error(format!(
                    "{JOBS_MAX} jobs waiting and none finished for {:.0}s",
                    self.shared.stall_timeout.as_secs_f64()
                )));
            }
            state = self
                .shared
                .progress
                .wait_timeout(state, Duration::from_millis(500))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if state.closed {
            return Err(self.shared.queue_error("the queue is shut down".into()));
        }
        if state.jobs.is_empty() && state.completed == state.submitted {
            // An idle queue has not stalled: the stall clock starts with this job.
            state.last_progress = Instant::now();
        }
        state.submitted += 1;
        let seq = state.submitted;
        state.jobs.push_back(Pending { seq, op, job });
        drop(state);
        self.shared.work.notify_one();
        Ok(())
    }

    /// A ticket for all work submitted so far.
    pub fn record(&self) -> Ticket {
        Ticket {
            shared: Arc::clone(&self.shared),
            seq: self.shared.lock().submitted,
        }
    }

    /// Makes later jobs of this queue wait for `ticket` (of any queue).
    pub fn wait_for(&self, ticket: Ticket) -> Result<()> {
        self.submit(WAIT_OP, Box::new(move || ticket.wait()))
    }

    /// Blocks the host until everything submitted so far has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.record().wait()
    }

    /// Time in jobs and in waits since the queue started.
    pub fn times(&self) -> QueueTime {
        self.shared.lock().times
    }

    /// Starts timing every job (wall time on this queue's thread).
    pub fn profile_start(&self) {
        self.shared.lock().profile = Some(Vec::new());
    }

    /// Waits for the queue, closes the profile and returns time per operation, largest first.
    pub fn profile_finish(&self) -> Result<Vec<OpTime>> {
        self.synchronize()?;
        let mut table = self.shared.lock().profile.take().unwrap_or_default();
        table.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(table)
    }
}

fn run_worker(shared: &Shared) {
    loop {
        let (pending, skip) = {
            let mut state = shared.lock();
            loop {
                if let Some(p) = state.jobs.pop_front() {
                    state.running = Some((p.op, Instant::now()));
                    let skip = state.error.is_some();
                    break (p, skip);
                }
                if state.closed {
                    return;
                }
                state = shared
                    .work
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let Pending { seq, op, job } = pending;
        let started = Instant::now();
        let outcome = if skip {
            Ok(())
        } else {
            // The job on this queue's track of a `--trace` timeline (the rank is the trace's pid).
            let _span = tracing::trace_span!("job", queue = shared.name, op).entered();
            match std::panic::catch_unwind(AssertUnwindSafe(job)) {
                // A wait fails with the failure it waited on, already complete: it is passed on
                // as it is (the first failure is the one reported, not each queue on the way).
                Ok(result) if op == WAIT_OP => result.map_err(|e| e.to_string()),
                Ok(result) => result.map_err(|e| format!("{} queue: {op}: {e}", shared.name)),
                Err(panic) => Err(format!(
                    "{} queue: {op} panicked: {}",
                    shared.name,
                    panic_message(&panic)
                )),
            }
        };
        let took = started.elapsed();
        let ms = took.as_secs_f64() * 1e3;
        let mut state = shared.lock();
        if op == WAIT_OP {
            state.times.waited += took;
        } else {
            state.times.busy += took;
        }
        state.completed = seq;
        state.running = None;
        state.last_progress = Instant::now();
        if let Err(message) = outcome {
            tracing::debug!(queue = shared.name, %message, "queue job failed");
            state.error.get_or_insert((seq, message));
        }
        if let (Some(table), false) = (state.profile.as_mut(), skip) {
            if op != WAIT_OP {
                charge(table, op, ms);
            }
        }
        drop(state);
        shared.progress.notify_all();
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

impl Drop for HostQueue {
    fn drop(&mut self) {
        // The worker drains what was submitted (those jobs may still use their buffers), then
        // exits. Drop never panics: a worker that panicked outside a job is only logged.
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::warn!(queue = self.shared.name, "queue worker ended with a panic");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn jobs_run_in_order_and_tickets_order_queues() {
        let a = HostQueue::new("a", Duration::from_secs(10)).unwrap();
        let b = HostQueue::new("b", Duration::from_secs(10)).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&log);
        a.submit(
            "slow",
            Box::new(move || {
                std::thread::sleep(Duration::from_millis(100));
                l.lock().unwrap().push("a1");
                Ok(())
            }),
        )
        .unwrap();
        b.wait_for(a.record()).unwrap();
        let l = Arc::clone(&log);
        b.submit(
            "after",
            Box::new(move || {
                l.lock().unwrap().push("b1");
                Ok(())
            }),
        )
        .unwrap();
        b.synchronize().unwrap();
        assert_eq!(*log.lock().unwrap(), vec!["a1", "b1"]);
    }

    #[test]
    fn a_failure_poisons_later_points_but_not_earlier_ones() {
        let q = HostQueue::new("q", Duration::from_secs(10)).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&ran);
        q.submit(
            "ok",
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
        )
        .unwrap();
        let before = q.record();
        q.submit("boom", Box::new(|| panic!("kernel assert")))
            .unwrap();
        let r = Arc::clone(&ran);
        q.submit(
            "skipped",
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
        )
        .unwrap();
        let err = q.synchronize().unwrap_err().to_string();
        assert!(
            err.contains("boom panicked") && err.contains("kernel assert"),
            "{err}"
        );
        assert!(before.wait().is_ok());
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wait_that_cannot_end_times_out_naming_the_queue() {
        let a = HostQueue::new("a", Duration::from_millis(300)).unwrap();
        let b = HostQueue::new("b", Duration::from_millis(300)).unwrap();
        // a waits for b's job, which waits for a's later point: a cycle.
        b.submit("block", Box::new(|| Ok(()))).unwrap();
        a.wait_for(b.record()).unwrap();
        let a_later = Ticket {
            shared: Arc::clone(&a.shared),
            seq: a.shared.lock().submitted + 1,
        };
        b.submit("cycle", Box::new(move || a_later.wait())).unwrap();
        let started = Instant::now();
        let err = b.synchronize().unwrap_err().to_string();
        assert!(err.contains("no progress"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
