//! Progress of long compile stages on stderr (calibration samples run, products quantized, kernels
//! measured). Nothing is printed for a stage that ends within `QUIET`; after that, a bar redrawn in
//! place when stderr is a terminal, or a plain line at most every `EVERY` otherwise (logs, CI), and
//! a closing line with the stage's time. `KILN_PROGRESS=off` silences it.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A stage that ends sooner prints nothing.
const QUIET: Duration = Duration::from_millis(1500);
/// Plain lines at most this often.
const EVERY: Duration = Duration::from_secs(2);
/// Terminal redraws at most this often.
const REDRAW: Duration = Duration::from_millis(100);

/// One stage's counter: `tick` as items finish (from any thread).
pub struct Progress {
    what: String,
    total: usize,
    done: AtomicUsize,
    start: Instant,
    /// When a report was last printed; `None` until the first.
    last: Mutex<Option<Instant>>,
    tty: bool,
    enabled: bool,
}

impl Progress {
    /// A stage of `total` items, described by `what` ("quantizing products").
    pub fn new(what: impl Into<String>, total: usize) -> Progress {
        Progress {
            what: what.into(),
            total,
            done: AtomicUsize::new(0),
            start: Instant::now(),
            last: Mutex::new(None),
            tty: std::io::stderr().is_terminal(),
            enabled: std::env::var("KILN_PROGRESS").as_deref() != Ok("off"),
        }
    }

    /// One more item finished.
    pub fn tick(&self) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        if !self.enabled || now - self.start < QUIET {
            return;
        }
        let Ok(mut last) = self.last.lock() else { return };
        let gap = if self.tty { REDRAW } else { EVERY };
        if last.is_some_and(|l| now - l < gap) {
            return;
        }
        *last = Some(now);
        let secs = (now - self.start).as_secs_f64();
        let mut err = std::io::stderr().lock();
        if self.tty {
            let width = 30;
            let filled = (done * width).checked_div(self.total).unwrap_or(width).min(width);
            let bar = format!("{}{}", "#".repeat(filled), ".".repeat(width - filled));
            let _ = write!(err, "\r{} [{bar}] {done}/{} {secs:.1} s", self.what, self.total);
        } else {
            let _ = writeln!(err, "{}: {done}/{} ({secs:.1} s)", self.what, self.total);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let printed = self.last.get_mut().map(|l| l.is_some()).unwrap_or(false);
        if printed {
            let done = *self.done.get_mut();
            let secs = self.start.elapsed().as_secs_f64();
            // On a terminal the line overwrites the bar (and the padding its tail).
            let (start, pad) = if self.tty {
                ("\r", " ".repeat(20))
            } else {
                ("", String::new())
            };
            eprintln!("{start}{}: {done}/{} done in {secs:.1} s{pad}", self.what, self.total);
        }
    }
}
