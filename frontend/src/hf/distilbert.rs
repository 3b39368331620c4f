//! DistilBERT encoders as a spec: BERT's post-LN blocks without token types (learned positions,
//! a padding mask), `last_hidden_state`. Task heads in the checkpoint (masked-LM projector,
//! classifiers) are not built: their tensors are listed in `ignore_weights`.

use super::bert::post_ln_layer;
use super::{config_block, folder, gpt2::activation, prefix, Checkpoint, Config, ImportError};

/// Task-head tensors of the `DistilBertFor…` classes, relative to the checkpoint's root.
const HEADS: &[&str] = &[
    "vocab_transform.*",
    "vocab_layer_norm.*",
    "vocab_projector.*",
    "pre_classifier.*",
    "classifier.*",
    "qa_outputs.*",
];

/// The spec body for a DistilBERT folder.
pub fn spec(c: &Config, ck: &Checkpoint) -> Result<String, ImportError> {
    let act = activation(c, "activation", "gelu")?;
    c.only(
        "sinusoidal_pos_embds",
        &[false.into()],
        "sinusoidal position embeddings are not implemented",
    )?;
    // Dropouts, and the tie of the masked-LM projector (a head not built here).
    for inert in ["dropout", "qa_dropout", "seq_classif_dropout", "tie_word_embeddings"] {
        c.get(inert);
    }
    let dim = c.int("dim")?;
    let heads = c.int("n_heads")?;
    if heads == 0 || dim % heads != 0 {
        return Err(c.unsupported("n_heads", format!("does not divide dim {dim}")));
    }
    let cfg = [
        ("vocab", c.int("vocab_size")?.to_string()),
        ("hidden", dim.to_string()),
        ("heads", heads.to_string()),
        ("layers", c.int("n_layers")?.to_string()),
        ("ffn", c.int("hidden_dim")?.to_string()),
        ("max_pos", c.int("max_position_embeddings")?.to_string()),
        // transformers' DistilBERT fixes every LayerNorm's epsilon at 1e-12.
        ("eps", "1e-12".to_string()),
    ];
    let p = prefix(
        ck,
        folder(ck),
        &["embeddings.word_embeddings.weight"],
        "the word embedding",
    )?;
    let ignore: Vec<String> = HEADS.iter().map(|h| format!("\"{h}\"")).collect();
    let l = format!("{p}transformer.layer.{{i}}");
    let layer = post_ln_layer(
        &[
            format!("{l}.attention.q_lin"),
            format!("{l}.attention.k_lin"),
            format!("{l}.attention.v_lin"),
            format!("{l}.attention.out_lin"),
            format!("{l}.sa_layer_norm"),
            format!("{l}.ffn.lin1"),
            format!("{l}.ffn.lin2"),
            format!("{l}.output_layer_norm"),
        ],
        act,
    );
    Ok(format!(
        r#"Model(
    name: "distilbert",
    config: {{
{cfg}    }},
    dims: {{ "batch": 64, "seq": "max_pos" }},
    inputs: {{
        "input_ids": (dtype: i64, shape: ["batch", "seq"]),
        // 1 for real tokens, 0 for padding; left out, every token is real.
        "attention_mask": (dtype: i64, shape: ["batch", "seq"], default: 1),
    }},
    ignore_weights: [{ignore}],
    blocks: {{
        "layer": (
            input: "x",
            body: {{
{layer}            }},
            output: "out",
        ),
    }},
    body: {{
        "words": Embedding(ids: "input_ids", weight: "{p}embeddings.word_embeddings.weight", rows: "vocab", dim: "hidden"),
        "pos_ids": Positions(of: "input_ids"),
        "positions": Embedding(ids: "pos_ids", weight: "{p}embeddings.position_embeddings.weight", rows: "max_pos", dim: "hidden"),
        "emb_sum": Add(a: "words", b: "positions"),
        "emb": LayerNorm(x: "emb_sum", param: "{p}embeddings.LayerNorm", dim: "hidden", eps: "eps"),
        "encoded": Repeat(block: "layer", x: "emb", times: "layers", index: "i"),
    }},
    outputs: {{
        "last_hidden_state": "encoded",
    }},
)
"#,
        cfg = config_block(&cfg),
        ignore = ignore.join(", ")
    ))
}
