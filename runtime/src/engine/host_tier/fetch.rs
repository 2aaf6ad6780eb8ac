//! Parameter shards off the device on their way to a use: from host memory straight to the
//! device, from NVMe through the fetch ring (read on the fetch queue, then copied on H2D).

use std::sync::Arc;

use super::swap::{key, Class};
use super::{missing, HostTier, ParamHome};
use crate::backend::{Buf, Device, Queue};
use crate::engine::EngineError;

impl HostTier {
    /// Copies this rank's shard of `unit` from its tier into `slot` (its place in a gathered
    /// buffer, X) on the H2D queue, through the fetch ring from NVMe. The H2D queue must already
    /// wait for whatever held `slot` before.
    pub fn fetch_params(
        &mut self,
        dev: &dyn Device,
        unit: usize,
        slot: &Buf,
    ) -> Result<(), EngineError> {
        let xb = self.x.size_bytes();
        for k in self.unit_groups[unit].clone() {
            let group = &self.groups[k];
            let g = group.group;
            let piece = slot.slice(g.start, g.len)?;
            if let Some(e) = &group.param_written {
                dev.wait(Queue::Fetch, e)?;
                dev.wait(Queue::H2d, e)?;
            }
            match &group.params {
                ParamHome::Host(mem) => {
                    // SAFETY: the H2D queue waited for the last write of this buffer (the
                    // optimizer's, `param_written`); the next write waits for this copy (the
                    // optimizer's step waits on the H2D queue before it starts).
                    unsafe { dev.copy_h2d(Queue::H2d, &piece, &mem.bytes()[..g.len * xb])? };
                }
                ParamHome::Nvme => {
                    let fetch = self.fetch.as_mut().ok_or_else(|| missing("fetch ring"))?;
                    let s = fetch.acquire(dev, Queue::Fetch)?;
                    let (mem, shared, name) = (
                        fetch.slot(s).clone(),
                        Arc::clone(&self.shared),
                        key(&g, "param"),
                    );
                    dev.submit_host(
                        Queue::Fetch,
                        "nvme read params",
                        Box::new(move || shared.read(Class::Params, &name, &mem)),
                    )?;
                    dev.wait(Queue::H2d, &dev.record(Queue::Fetch)?)?;
                    let mem = fetch.slot(s);
                    // SAFETY: the H2D queue waited for the read into this slot; the slot is
                    // reused only after the event recorded just below.
                    unsafe { dev.copy_h2d(Queue::H2d, &piece, &mem.bytes()[..g.len * xb])? };
                    fetch.release(s, dev.record(Queue::H2d)?);
                }
                ParamHome::Device(_) => return Err(missing("parameters off the device")),
            }
            self.shared.count_h2d(g.len * xb);
        }
        Ok(())
    }
}
