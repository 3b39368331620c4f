//! `kiln._kiln.Model`: a loaded artifact that runs on numpy arrays with the GIL released, so
//! several Python threads may run one model at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use numpy::PyUntypedArray;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tokenizers::Tokenizer;

use kiln_ir::Literal;

use crate::convert::{dim_text, input_ref, numpy_dtype, output_array};
use crate::{ArtifactError, KilnError, RunError};

/// `(name, dtype, shape, default)` of a port: dims are numbers or symbol expressions such as
/// `"seq"`; `default` is an optional input's element value, `None` for a required one.
type PortInfo = (String, &'static str, Vec<String>, Option<DefaultValue>);

/// An optional input's element value, as the Python number it is.
#[derive(IntoPyObject)]
enum DefaultValue {
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl From<Literal> for DefaultValue {
    fn from(l: Literal) -> DefaultValue {
        match l {
            Literal::Int(v) => DefaultValue::Int(v),
            Literal::Float(_) => DefaultValue::Float(l.as_f64()),
            Literal::Bool(v) => DefaultValue::Bool(v),
        }
    }
}

/// A compiled model, loaded.
#[pyclass(frozen, module = "kiln._kiln")]
pub struct Model {
    pub(crate) inner: Arc<kiln_runtime::Model>,
    path: PathBuf,
    tokenizer: OnceLock<Result<Tokenizer, String>>,
}

impl Model {
    fn ports(&self, ports: &[kiln_runtime::plan::Port]) -> Vec<PortInfo> {
        let m = self.inner.manifest();
        ports
            .iter()
            .map(|p| {
                let v = &m.values[p.value as usize];
                let shape = v.shape.iter().map(|d| dim_text(d, &m.dims)).collect();
                (
                    p.name.clone(),
                    numpy_dtype(v.dtype),
                    shape,
                    p.default.map(DefaultValue::from),
                )
            })
            .collect()
    }

    /// The tokenizer the artifact carries, parsed once.
    pub(crate) fn tokenizer(&self) -> PyResult<&Tokenizer> {
        let t = self.tokenizer.get_or_init(|| {
            let text = self.inner.manifest().tokenizer.as_deref().ok_or_else(|| {
                format!(
                    "{}: the artifact carries no tokenizer (compile with tokenizer=\"tokenizer.json\")",
                    self.path.display()
                )
            })?;
            Tokenizer::from_bytes(text.as_bytes()).map_err(|e| format!("the artifact's tokenizer: {e}"))
        });
        t.as_ref().map_err(|e| KilnError::new_err(e.clone()))
    }

    /// Runs the model on tensors built on the Rust side (embed), with the GIL released.
    pub(crate) fn run_tensors(
        &self,
        py: Python<'_>,
        inputs: &BTreeMap<String, kiln_ir::Tensor>,
    ) -> PyResult<Vec<(String, kiln_ir::Tensor)>> {
        py.detach(|| self.inner.run(inputs))
            .map_err(|e| RunError::new_err(e.to_string()))
    }
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, threads=None))]
    fn new(path: PathBuf, threads: Option<usize>) -> PyResult<Self> {
        let mut inner =
            kiln_runtime::Model::load(&path).map_err(|e| ArtifactError::new_err(format!("{}: {e}", path.display())))?;
        if let Some(t) = threads {
            inner.set_threads(t).map_err(KilnError::new_err)?;
        }
        Ok(Model {
            inner: Arc::new(inner),
            path,
            tokenizer: OnceLock::new(),
        })
    }

    /// `(name, dtype, shape, default)` of every input.
    #[getter]
    fn inputs(&self) -> Vec<PortInfo> {
        self.ports(&self.inner.manifest().inputs)
    }

    /// `(name, dtype, shape, None)` of every output.
    #[getter]
    fn outputs(&self) -> Vec<PortInfo> {
        self.ports(&self.inner.manifest().outputs)
    }

    /// Bounds of the symbolic dims: `{name: largest value}`.
    #[getter]
    fn bounds(&self) -> BTreeMap<String, u64> {
        self.inner.manifest().dims.iter().cloned().collect()
    }

    /// Whether the artifact generates (it keeps a key/value cache).
    #[getter]
    fn is_decoder(&self) -> bool {
        self.inner.is_decoder()
    }

    /// The CPU level the kernels run at here (`x86-64-v3`, `x86-64-v4`, …).
    #[getter]
    fn level(&self) -> String {
        self.inner.level().to_string()
    }

    /// Whether the artifact carries a tokenizer.
    #[getter]
    fn has_tokenizer(&self) -> bool {
        self.inner.manifest().tokenizer.is_some()
    }

    /// Runs the model on `feeds` (`{input name: C-contiguous numpy array}`, read in place);
    /// returns `[(output name, array)]` in the model's output order.
    fn run<'py>(&self, py: Python<'py>, feeds: &Bound<'py, PyDict>) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
        let m = self.inner.manifest();
        let mut arrays = Vec::with_capacity(feeds.len());
        for (k, v) in feeds.iter() {
            let name: String = k
                .extract()
                .map_err(|_| PyTypeError::new_err("feed names must be strings"))?;
            let a = v.cast_into::<PyUntypedArray>().map_err(|e| {
                PyTypeError::new_err(format!(
                    "input `{name}`: expected a numpy array, got {}",
                    e.into_inner().get_type()
                ))
            })?;
            arrays.push((name, a));
        }
        let mut inputs = BTreeMap::new();
        for (name, a) in &arrays {
            inputs.insert(name.clone(), input_ref(m, name, a)?);
        }
        let out = py
            .detach(|| self.inner.run(&inputs))
            .map_err(|e| RunError::new_err(e.to_string()))?;
        out.into_iter().map(|(n, t)| Ok((n, output_array(py, t)?))).collect()
    }

    /// Token ids of `text` by the artifact's tokenizer (special tokens added).
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        let e = self
            .tokenizer()?
            .encode(text, true)
            .map_err(|e| KilnError::new_err(format!("tokenizing {text:?}: {e}")))?;
        Ok(e.get_ids().to_vec())
    }

    /// The text of token ids by the artifact's tokenizer (special tokens skipped).
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        self.tokenizer()?
            .decode(&ids, true)
            .map_err(|e| KilnError::new_err(format!("decoding {ids:?}: {e}")))
    }

    /// The id of a token such as `<|endoftext|>`, if the tokenizer has it.
    fn token_id(&self, token: &str) -> PyResult<Option<u32>> {
        Ok(self.tokenizer()?.token_to_id(token))
    }
}
