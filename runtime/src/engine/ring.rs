//! A ring of staging buffers shared by queues: the host tier's host buffers (gradient intake,
//! updated parameters, parameter fetch) and the walk's reduce targets on the device. Slot k is
//! handed out again only after the event that released it (recorded by the queue that consumed
//! it), which the next user's queue waits for: the host never waits.

use crate::backend::{Device, DeviceError, Event, Queue};

pub struct Ring<T> {
    slots: Vec<T>,
    /// Per slot: when its last consumer is done with it (None: free).
    released: Vec<Option<Event>>,
    next: usize,
}

impl<T> Ring<T> {
    /// A ring over `slots` (at least one).
    pub fn new(slots: Vec<T>) -> Ring<T> {
        assert!(!slots.is_empty(), "a ring needs at least one slot");
        Ring {
            released: (0..slots.len()).map(|_| None).collect(),
            slots,
            next: 0,
        }
    }

    /// The next slot, round-robin; `queue` waits for its previous consumer first.
    pub fn acquire(&mut self, dev: &dyn Device, queue: Queue) -> Result<usize, DeviceError> {
        let k = self.next;
        self.next = (k + 1) % self.slots.len();
        if let Some(e) = self.released[k].take() {
            dev.wait(queue, &e)?;
        }
        Ok(k)
    }

    pub fn slot(&self, k: usize) -> &T {
        &self.slots[k]
    }

    /// Slot `k` may be reused after `event`.
    pub fn release(&mut self, k: usize, event: Event) {
        self.released[k] = Some(event);
    }
}
