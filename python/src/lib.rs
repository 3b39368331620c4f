//! kiln's Python extension module, `kiln._kiln` (the package `kiln` wraps it, `python/kiln/`):
//! `compile_args` runs `kiln compile` in this process, [`model::Model`] loads an artifact and runs
//! it on numpy arrays, [`generate::Generation`] streams generated tokens, [`embed`] pools
//! sentence embeddings.

mod convert;
mod embed;
mod generate;
mod model;

use numpy::{PyArray2, PyArrayMethods};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use generate::{Generation, Settings};
use model::Model;

pyo3::create_exception!(_kiln, KilnError, PyException, "Every error kiln raises.");
pyo3::create_exception!(
    _kiln,
    CompileError,
    KilnError,
    "A spec, its weights or an option was refused."
);
pyo3::create_exception!(_kiln, ArtifactError, KilnError, "An artifact could not be loaded.");
pyo3::create_exception!(_kiln, RunError, KilnError, "A model failed while running.");

/// `kiln compile ARGS…` in this process; the error text is the command line's.
#[pyfunction]
fn compile_args(py: Python<'_>, args: Vec<String>) -> PyResult<()> {
    py.detach(|| kiln::execute(&args)).map_err(CompileError::new_err)
}

/// Starts generating from token ids (`Model.generate` in Python handles text and stop strings).
#[pyfunction]
#[pyo3(signature = (model, prompt, stop, max_new_tokens, temperature, top_k, top_p, seed))]
#[allow(clippy::too_many_arguments)]
fn start_generation(
    model: &Bound<'_, Model>,
    prompt: Vec<i64>,
    stop: Vec<i64>,
    max_new_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u64,
) -> PyResult<Generation> {
    let s = Settings {
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
    };
    Generation::start(model.get(), prompt, stop, s)
}

/// Sentence embeddings `[len(texts), hidden]` of an encoder that carries its tokenizer.
#[pyfunction]
fn embed_texts<'py>(
    py: Python<'py>,
    model: &Bound<'py, Model>,
    texts: Vec<String>,
    normalize: bool,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    if texts.is_empty() {
        return Err(pyo3::exceptions::PyValueError::new_err("embed: no texts"));
    }
    let rows = embed::embed(model.get(), py, &texts, normalize)?;
    let h = rows[0].len();
    let flat: Vec<f32> = rows.concat();
    numpy::IntoPyArray::into_pyarray(flat, py).reshape([texts.len(), h])
}

#[pymodule]
fn _kiln(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compile_args, m)?)?;
    m.add_function(wrap_pyfunction!(start_generation, m)?)?;
    m.add_function(wrap_pyfunction!(embed_texts, m)?)?;
    m.add_class::<Model>()?;
    m.add_class::<Generation>()?;
    let py = m.py();
    m.add("KilnError", py.get_type::<KilnError>())?;
    m.add("CompileError", py.get_type::<CompileError>())?;
    m.add("ArtifactError", py.get_type::<ArtifactError>())?;
    m.add("RunError", py.get_type::<RunError>())?;
    Ok(())
}
