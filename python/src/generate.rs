//! `kiln._kiln.Generation`: token-by-token generation with a decoding artifact, one token per
//! `next()` (the prompt's prefill runs on the first), the GIL released while a step runs.

use std::sync::Mutex;

use kiln_runtime::{Decoder, Sampler, Sampling, Session};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::model::Model;
use crate::RunError;

/// Where a generation stands.
struct State {
    session: Session<'static>,
    sampler: Sampler,
    prompt: Vec<i64>,
    stop: Vec<i64>,
    left: usize,
    tokens: Vec<i64>,
    done: bool,
}

impl State {
    /// Samples the next token: prefill on the first call, one decode step after.
    fn next(&mut self) -> Result<Option<i64>, String> {
        if self.done || self.left == 0 {
            self.done = true;
            return Ok(None);
        }
        let logits = match self.tokens.last() {
            None => self.session.prefill(std::slice::from_ref(&self.prompt)),
            Some(t) => self.session.step(&[*t]),
        }
        .map_err(|e| {
            self.done = true;
            e.to_string()
        })?;
        let t = self.sampler.pick(&logits[0]);
        self.tokens.push(t);
        self.left -= 1;
        self.done = self.stop.contains(&t);
        Ok(Some(t))
    }
}

/// An iterator over generated token ids.
#[pyclass(frozen, module = "kiln._kiln")]
pub struct Generation {
    state: Mutex<State>,
}

/// The sampling settings of `Model.generate`.
pub struct Settings {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl Generation {
    /// Starts generating from `prompt` token ids; stops after `stop` ids or `max_new_tokens`.
    pub fn start(model: &Model, prompt: Vec<i64>, stop: Vec<i64>, s: Settings) -> PyResult<Generation> {
        if prompt.is_empty() {
            return Err(PyValueError::new_err("the prompt has no tokens"));
        }
        if !(s.temperature >= 0.0 && s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(PyValueError::new_err(format!(
                "temperature must be >= 0 and top_p in (0, 1], got temperature={} top_p={}",
                s.temperature, s.top_p
            )));
        }
        let session =
            kiln_runtime::Model::shared_session(model.inner.clone()).map_err(|e| RunError::new_err(e.to_string()))?;
        let capacity = session.capacity();
        if prompt.len() + s.max_new_tokens.saturating_sub(1) > capacity {
            return Err(PyValueError::new_err(format!(
                "a {}-token prompt plus {} new tokens exceeds the compiled context of {capacity}",
                prompt.len(),
                s.max_new_tokens
            )));
        }
        let sampler = Sampler::new(Sampling {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
        });
        let state = State {
            session,
            sampler,
            prompt,
            stop,
            left: s.max_new_tokens,
            tokens: Vec::new(),
            done: false,
        };
        Ok(Generation {
            state: Mutex::new(state),
        })
    }
}

#[pymethods]
impl Generation {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<i64>> {
        py.detach(|| {
            let mut s = self.state.lock().map_err(|_| "an earlier step panicked".to_string())?;
            s.next()
        })
        .map_err(RunError::new_err)
    }

    /// The tokens generated so far.
    #[getter]
    fn tokens(&self) -> PyResult<Vec<i64>> {
        let s = self
            .state
            .lock()
            .map_err(|_| PyRuntimeError::new_err("an earlier step panicked"))?;
        Ok(s.tokens.clone())
    }

    /// The prompt's token ids.
    #[getter]
    fn prompt(&self) -> PyResult<Vec<i64>> {
        let s = self
            .state
            .lock()
            .map_err(|_| PyRuntimeError::new_err("an earlier step panicked"))?;
        Ok(s.prompt.clone())
    }
}
