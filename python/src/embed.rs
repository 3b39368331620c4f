//! `Model.embed`: sentence embeddings from an encoder artifact that carries its tokenizer, as
//! sentence-transformers computes them (mean of the last hidden states over the attention mask,
//! then L2-normalized).

use std::collections::BTreeMap;

use kiln_ir::{DType, Tensor, TensorData};
use kiln_runtime::plan::Manifest;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::model::Model;
use crate::KilnError;

/// The inputs an encoder may take, as transformers names them.
const TEXT_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];

/// The largest value of axis `axis` of input `name`.
fn bound(m: &Manifest, name: &str, axis: usize) -> Option<usize> {
    let p = m.inputs.iter().find(|p| p.name == name)?;
    let d = m.values[p.value as usize].shape.get(axis)?;
    let b: u64 = d.syms.iter().map(|s| m.dims[*s as usize].1).product();
    Some((d.coeff * b) as usize)
}

/// The tokenizer set to pad to the longest text of a batch and to truncate to `max_len`.
fn batch_tokenizer(t: &Tokenizer, max_len: usize) -> PyResult<Tokenizer> {
    let mut t = t.clone();
    let pad = t.get_padding().cloned().unwrap_or_default();
    t.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        ..pad
    }));
    let trunc = t.get_truncation().cloned().unwrap_or_default();
    let max_length = trunc.max_length.min(max_len);
    t.with_truncation(Some(TruncationParams { max_length, ..trunc }))
        .map_err(|e| KilnError::new_err(format!("the artifact's tokenizer: {e}")))?;
    Ok(t)
}

/// A batch's inputs by name, and each text's attention mask.
type Feeds = (BTreeMap<String, Tensor>, Vec<Vec<u32>>);

/// The model's inputs for one batch of texts.
fn feeds(m: &Manifest, tok: &Tokenizer, texts: &[String]) -> PyResult<Feeds> {
    let enc = tok
        .encode_batch(texts.to_vec(), true)
        .map_err(|e| KilnError::new_err(format!("tokenizing: {e}")))?;
    let seq = enc.first().map_or(0, |e| e.get_ids().len());
    let masks: Vec<Vec<u32>> = enc.iter().map(|e| e.get_attention_mask().to_vec()).collect();
    let mut inputs = BTreeMap::new();
    for p in &m.inputs {
        let column: Vec<u32> = match p.name.as_str() {
            "input_ids" => enc.iter().flat_map(|e| e.get_ids().to_vec()).collect(),
            "attention_mask" => masks.concat(),
            "token_type_ids" => enc.iter().flat_map(|e| e.get_type_ids().to_vec()).collect(),
            other => {
                return Err(PyValueError::new_err(format!(
                    "embed feeds {} only; this model also takes `{other}`",
                    TEXT_INPUTS.join(", ")
                )))
            }
        };
        let data = match m.values[p.value as usize].dtype {
            DType::I64 => TensorData::I64(column.iter().map(|x| *x as i64).collect()),
            DType::I32 => TensorData::I32(column.iter().map(|x| *x as i32).collect()),
            d => {
                return Err(PyValueError::new_err(format!(
                    "embed: input `{}` is {d}, not integer",
                    p.name
                )))
            }
        };
        let t = Tensor::new(vec![texts.len(), seq], data).map_err(|e| PyValueError::new_err(e.to_string()))?;
        inputs.insert(p.name.clone(), t);
    }
    Ok((inputs, masks))
}

/// Mean of `hidden` ([n, seq, h]) over each row's mask, L2-normalized when asked.
fn pool(hidden: &Tensor, masks: &[Vec<u32>], normalize: bool) -> PyResult<Vec<Vec<f32>>> {
    let (TensorData::F32(v), [n, seq, h]) = (hidden.data(), hidden.shape()) else {
        return Err(PyValueError::new_err(format!(
            "embed needs a float32 [batch, seq, hidden] output, got {} {:?}",
            hidden.dtype(),
            hidden.shape()
        )));
    };
    let mut out = Vec::with_capacity(*n);
    for (i, mask) in masks.iter().enumerate().take(*n) {
        let mut sum = vec![0f32; *h];
        for (t, _) in mask.iter().enumerate().take(*seq).filter(|(_, m)| **m != 0) {
            let row = &v[(i * seq + t) * h..][..*h];
            sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
        }
        let count = mask.iter().filter(|m| **m != 0).count().max(1) as f32;
        sum.iter_mut().for_each(|s| *s /= count);
        if normalize {
            let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            sum.iter_mut().for_each(|s| *s /= norm);
        }
        out.push(sum);
    }
    Ok(out)
}

/// The output that holds the last hidden states.
fn hidden_output(outs: Vec<(String, Tensor)>) -> PyResult<Tensor> {
    let names: Vec<String> = outs.iter().map(|o| o.0.clone()).collect();
    let pick = outs
        .iter()
        .position(|o| o.0 == "last_hidden_state")
        .or_else(|| outs.iter().position(|o| o.1.shape().len() == 3));
    match pick {
        Some(i) => Ok(outs.into_iter().nth(i).expect("index from position").1),
        None => Err(PyValueError::new_err(format!(
            "embed needs a `last_hidden_state` output (or one [batch, seq, hidden]); this model's outputs: {}",
            names.join(", ")
        ))),
    }
}

/// Sentence embeddings of `texts`, in batches the model's bounds allow.
pub fn embed(model: &Model, py: Python<'_>, texts: &[String], normalize: bool) -> PyResult<Vec<Vec<f32>>> {
    let m = model.inner.manifest();
    let (Some(batch), Some(seq)) = (bound(m, "input_ids", 0), bound(m, "input_ids", 1)) else {
        return Err(PyValueError::new_err(
            "embed needs a model with an `input_ids` [batch, seq] input",
        ));
    };
    let tok = batch_tokenizer(model.tokenizer()?, seq)?;
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch.max(1)) {
        let (inputs, masks) = feeds(m, &tok, chunk)?;
        let hidden = hidden_output(model.run_tensors(py, &inputs)?)?;
        out.extend(pool(&hidden, &masks, normalize)?);
    }
    Ok(out)
}
