//! BERT and RoBERTa encoders (sentence-transformers checkpoints such as all-MiniLM-L6-v2) as a
//! spec: post-LN blocks, absolute positions, token types, a padding mask; `last_hidden_state`, and
//! `pooler_output` when the checkpoint has the pooler. RoBERTa differs in its positions: they
//! count only non-padding tokens and start at `pad_token_id + 1`.

use super::{config_block, float, folder, gpt2::activation, prefix, Checkpoint, Config, ImportError};

/// The spec body for a BERT (`model_type` "bert") or RoBERTa ("roberta") folder.
pub fn spec(c: &Config, ck: &Checkpoint, model_type: &str) -> Result<String, ImportError> {
    let act = activation(c, "hidden_act", "gelu")?;
    c.only(
        "position_embedding_type",
        &["absolute".into()],
        "only absolute positions are implemented",
    )?;
    c.only("is_decoder", &[false.into()], "BERT as a decoder is not implemented")?;
    c.only(
        "add_cross_attention",
        &[false.into()],
        "cross-attention is not implemented",
    )?;
    let mut cfg = vec![
        ("vocab", c.int("vocab_size")?.to_string()),
        ("hidden", c.int("hidden_size")?.to_string()),
        ("heads", c.int("num_attention_heads")?.to_string()),
        ("layers", c.int("num_hidden_layers")?.to_string()),
        ("ffn", c.int("intermediate_size")?.to_string()),
        ("max_pos", c.int("max_position_embeddings")?.to_string()),
        ("type_vocab", c.int("type_vocab_size")?.to_string()),
        ("eps", float(c.float_or("layer_norm_eps", 1e-12)?)),
    ];
    c.get("tie_word_embeddings"); // the base model has no LM head to tie
    let positions = if model_type == "roberta" {
        cfg.push(("pad", c.int("pad_token_id")?.to_string()));
        // Positions run from pad + 1: the table holds max_pos - pad - 1 tokens' positions.
        cfg.push(("max_seq", "\"max_pos - pad - 1\"".to_string()));
        r#"Positions(of: "input_ids", padding_idx: "pad")"#
    } else {
        cfg.push(("max_seq", "\"max_pos\"".to_string()));
        r#"Positions(of: "input_ids")"#
    };
    let p = prefix(
        ck,
        folder(ck),
        &["embeddings.word_embeddings.weight"],
        "the word embedding",
    )?;
    // The pooler (dense + tanh over the first token), when the checkpoint has it.
    let pooled = ck.has(&format!("{p}pooler.dense.weight"));
    let ignore = format!("\"{p}embeddings.position_ids\"");
    let (pooler, pooler_output) = if pooled {
        (
            format!(
                r#"        "first": Slice(x: "encoded", axis: 1, start: 0, end: 1),
        "first_token": Reshape(x: "first", shape: ["batch", "hidden"]),
        "pool_dense": Linear(x: "first_token", param: "{p}pooler.dense", in_features: "hidden", out_features: "hidden"),
        "pooler_output": Tanh(x: "pool_dense"),
"#
            ),
            "        \"pooler_output\": \"pooler_output\",\n",
        )
    } else {
        (String::new(), "")
    };
    let l = format!("{p}encoder.layer.{{i}}");
    let layer = post_ln_layer(
        &[
            format!("{l}.attention.self.query"),
            format!("{l}.attention.self.key"),
            format!("{l}.attention.self.value"),
            format!("{l}.attention.output.dense"),
            format!("{l}.attention.output.LayerNorm"),
            format!("{l}.intermediate.dense"),
            format!("{l}.output.dense"),
            format!("{l}.output.LayerNorm"),
        ],
        act,
    );
    Ok(format!(
        r#"Model(
    name: "{model_type}",
    config: {{
{cfg}    }},
    dims: {{ "batch": 64, "seq": "max_seq" }},
    inputs: {{
        "input_ids": (dtype: i64, shape: ["batch", "seq"]),
        // 1 for real tokens, 0 for padding; left out, every token is real.
        "attention_mask": (dtype: i64, shape: ["batch", "seq"], default: 1),
        // Left out, every token is of the first segment.
        "token_type_ids": (dtype: i64, shape: ["batch", "seq"], default: 0),
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
        "pos_ids": {positions},
        "positions": Embedding(ids: "pos_ids", weight: "{p}embeddings.position_embeddings.weight", rows: "max_pos", dim: "hidden"),
        "types": Embedding(ids: "token_type_ids", weight: "{p}embeddings.token_type_embeddings.weight", rows: "type_vocab", dim: "hidden"),
        "wp": Add(a: "words", b: "positions"),
        "emb_sum": Add(a: "wp", b: "types"),
        "emb": LayerNorm(x: "emb_sum", param: "{p}embeddings.LayerNorm", dim: "hidden", eps: "eps"),
        "encoded": Repeat(block: "layer", x: "emb", times: "layers", index: "i"),
{pooler}    }},
    outputs: {{
        "last_hidden_state": "encoded",
{pooler_output}    }},
)
"#,
        cfg = config_block(&cfg)
    ))
}

/// The body of a post-LN encoder layer (BERT's, DistilBERT's) over the carried `x`, with the
/// padding mask `attention_mask`. `params`: the query, key, value and attention-output
/// projections, the attention norm, the MLP's up and down projections, the output norm.
pub(super) fn post_ln_layer(params: &[String; 8], act: &str) -> String {
    let [q, k, v, o, n1, up, down, n2] = params;
    format!(
        r#"                "q": Linear(x: "x", param: "{q}", in_features: "hidden", out_features: "hidden"),
                "k": Linear(x: "x", param: "{k}", in_features: "hidden", out_features: "hidden"),
                "v": Linear(x: "x", param: "{v}", in_features: "hidden", out_features: "hidden"),
                "ctx": Attention(q: "q", k: "k", v: "v", heads: "heads", mask: "attention_mask"),
                "attn_out": Linear(x: "ctx", param: "{o}", in_features: "hidden", out_features: "hidden"),
                "res1": Add(a: "attn_out", b: "x"),
                "h1": LayerNorm(x: "res1", param: "{n1}", dim: "hidden", eps: "eps"),
                "up": Linear(x: "h1", param: "{up}", in_features: "hidden", out_features: "ffn"),
                "act": {act}(x: "up"),
                "down": Linear(x: "act", param: "{down}", in_features: "ffn", out_features: "hidden"),
                "res2": Add(a: "down", b: "h1"),
                "out": LayerNorm(x: "res2", param: "{n2}", dim: "hidden", eps: "eps"),
"#
    )
}
