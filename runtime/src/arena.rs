//! Activation arenas kept between runs.
//!
//! A run places every temporary in one 64-byte-aligned arena. Allocating it afresh per run costs
//! page faults and zeroing of megabytes (a tenth of a millisecond per MiB, a fifth of a
//! 1024-row product's time), so a model keeps the arenas of finished runs and hands one to the
//! next run; concurrent runs take different arenas. Arenas are not cleared: every step writes its
//! output before any step reads it. Debug builds fill each arena with NaN bytes before the run,
//! so a kernel that read memory it never wrote shows in the tests.

use crate::kernels::Align64;
use std::sync::Mutex;

/// Arenas of finished runs.
#[derive(Default)]
pub struct Arenas(Mutex<Vec<Vec<Align64>>>);

/// An arena lent to one run; it goes back to its pool when dropped.
pub struct Lent<'a> {
    pool: &'a Arenas,
    buf: Vec<Align64>,
}

impl Arenas {
    /// An arena of at least `bytes` bytes, or `None` if that much memory cannot be allocated.
    pub fn take(&self, bytes: usize) -> Option<Lent<'_>> {
        let mut buf = self.0.lock().map(|mut v| v.pop()).ok().flatten().unwrap_or_default();
        let blocks = bytes.div_ceil(64);
        if buf.len() < blocks {
            buf.try_reserve_exact(blocks - buf.len()).ok()?;
            buf.resize(blocks, Align64::default());
        }
        if cfg!(debug_assertions) {
            buf.fill(Align64::filled(0xff));
        }
        Some(Lent { pool: self, buf })
    }
}

impl Lent<'_> {
    /// The arena's first byte.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr() as *mut u8
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Ok(mut v) = self.pool.0.lock() {
            v.push(std::mem::take(&mut self.buf));
        }
    }
}
