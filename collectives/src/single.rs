//! A world of one: no transport, no environment.

use std::time::Duration;

use crate::comm::Communicator;
use crate::elem::DType;
use crate::error::Result;
use crate::Backend;

pub(crate) struct SingleComm {
    timeout: Duration,
}

impl SingleComm {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl Communicator for SingleComm {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> Backend {
        Backend::Single
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn all_gather_bytes(&self, _dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn reduce_scatter_bytes(&self, _dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_reduce_bytes(&self, _dtype: DType, _buf: &mut [u8]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut [u8], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn as_dyn(&self) -> &dyn Communicator {
        self
    }
}
