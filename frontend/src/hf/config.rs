//! A Hugging Face `config.json`, read field by field: every field an import reads is recorded, and
//! at the end any field that was neither read nor known not to change the forward pass is an
//! error naming it — an import never silently builds a different model.

use std::cell::RefCell;
use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::ImportError;

/// Fields that never change what a model computes at inference: bookkeeping, training-only
/// settings (dropout, initialisation), generation defaults and task heads kiln does not build.
const INERT: &[&str] = &[
    "_name_or_path",
    "architectures",
    "transformers_version",
    "model_type",
    "dtype",
    "torch_dtype",
    "use_cache",
    "initializer_range",
    "initializer_factor",
    "gradient_checkpointing",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "id2label",
    "label2id",
    "problem_type",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "torchscript",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "finetuning_task",
    "chunk_size_feed_forward",
    "classifier_dropout",
    "attention_dropout",
    "attention_probs_dropout_prob",
    "hidden_dropout_prob",
    "hidden_dropout",
    "embd_pdrop",
    "attn_pdrop",
    "resid_pdrop",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "pretraining_tp",
    "max_window_layers",
];

/// Fields that change nothing at the value given here (transformers' defaults), as JSON text.
const AT_DEFAULT: &[(&str, &str)] = &[
    ("is_encoder_decoder", "false"),
    ("add_cross_attention", "false"),
    ("tie_encoder_decoder", "false"),
    ("cross_attention_hidden_size", "null"),
    ("pruned_heads", "{}"),
    ("use_bfloat16", "false"),
    ("tf_legacy_loss", "false"),
];

/// `config.json` with a record of what was read.
pub struct Config {
    map: Map<String, Value>,
    read: RefCell<BTreeSet<String>>,
    /// The file, for messages.
    pub file: String,
}

impl Config {
    /// Parses `text` (the contents of `file`).
    pub fn parse(file: &str, text: &str) -> Result<Config, ImportError> {
        let v: Value = serde_json::from_str(text).map_err(|e| ImportError::Json {
            file: file.to_string(),
            msg: e.to_string(),
        })?;
        let Value::Object(map) = v else {
            return Err(ImportError::Json {
                file: file.to_string(),
                msg: "expected a JSON object".into(),
            });
        };
        Ok(Config {
            map,
            read: RefCell::new(BTreeSet::new()),
            file: file.to_string(),
        })
    }

    /// The value of `name`, recorded as read; `None` when absent or null.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.read.borrow_mut().insert(name.to_string());
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn bad(&self, name: &str, v: &Value, want: &str) -> ImportError {
        ImportError::Field {
            file: self.file.clone(),
            field: name.to_string(),
            value: v.to_string(),
            why: format!("expected {want}"),
        }
    }

    /// A non-negative integer field that must be present.
    pub fn int(&self, name: &str) -> Result<u64, ImportError> {
        self.opt_int(name)?.ok_or_else(|| ImportError::Missing {
            file: self.file.clone(),
            field: name.to_string(),
        })
    }

    /// A non-negative integer field, if present.
    pub fn opt_int(&self, name: &str) -> Result<Option<u64>, ImportError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.bad(name, v, "a non-negative integer")),
        }
    }

    /// A number field, or `default` when absent.
    pub fn float_or(&self, name: &str, default: f64) -> Result<f64, ImportError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(name, v, "a number")),
        }
    }

    /// A boolean field, or `default` when absent.
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, ImportError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(name, v, "true or false")),
        }
    }

    /// A string field, or `default` when absent.
    pub fn str_or<'a>(&'a self, name: &str, default: &'a str) -> Result<&'a str, ImportError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.bad(name, v, "a string")),
        }
    }

    /// Fails unless `name` is absent or one of `ok` (compared as JSON); `why` says what kiln
    /// does not implement.
    pub fn only(&self, name: &str, ok: &[Value], why: &str) -> Result<(), ImportError> {
        match self.get(name) {
            Some(v) if !ok.contains(v) => Err(ImportError::Field {
                file: self.file.clone(),
                field: name.to_string(),
                value: v.to_string(),
                why: why.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// An error for `name`'s value.
    pub fn unsupported(&self, name: &str, why: impl Into<String>) -> ImportError {
        let value = self.map.get(name).map_or("(absent)".to_string(), Value::to_string);
        ImportError::Field {
            file: self.file.clone(),
            field: name.to_string(),
            value,
            why: why.into(),
        }
    }

    /// Fails on the first field that was not read and is not inert.
    pub fn finish(&self, model_type: &str) -> Result<(), ImportError> {
        let read = self.read.borrow();
        let left: Vec<&String> = self
            .map
            .keys()
            .filter(|k| !read.contains(*k) && !INERT.contains(&k.as_str()))
            .filter(|k| {
                !AT_DEFAULT
                    .iter()
                    .any(|(f, v)| f == k && serde_json::from_str::<Value>(v).ok().as_ref() == Some(&self.map[*k]))
            })
            .collect();
        match left.first() {
            None => Ok(()),
            Some(k) => Err(ImportError::Field {
                file: self.file.clone(),
                field: k.to_string(),
                value: self.map[*k].to_string(),
                why: format!("kiln's {model_type} import does not implement this field"),
            }),
        }
    }
}
