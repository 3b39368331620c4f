//! GPT-2 as a spec: pre-LN causal decoder, learned positions, Conv1D (`[in, out]`) weights, head
//! tied to the token embedding unless the checkpoint has its own `lm_head`.

use super::{config_block, float, folder, prefix, Checkpoint, Config, ImportError};

/// The activation layer for GPT-2's `activation_function`.
pub(super) fn activation(c: &Config, field: &str, default: &str) -> Result<&'static str, ImportError> {
    match c.str_or(field, default)? {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok("GeluTanh"),
        "gelu" => Ok("Gelu"),
        "relu" => Ok("Relu"),
        "silu" | "swish" => Ok("Silu"),
        other => Err(c.unsupported(field, format!("activation `{other}` is not implemented"))),
    }
}

/// The spec body for a GPT-2 folder.
pub fn spec(c: &Config, ck: &Checkpoint) -> Result<String, ImportError> {
    let act = activation(c, "activation_function", "gelu_new")?;
    c.only(
        "add_cross_attention",
        &[false.into()],
        "cross-attention is not implemented",
    )?;
    c.only(
        "scale_attn_weights",
        &[true.into()],
        "unscaled attention is not implemented",
    )?;
    c.only(
        "scale_attn_by_inverse_layer_idx",
        &[false.into()],
        "per-layer attention scaling is not implemented",
    )?;
    // Upcasting and reordering only change float16 arithmetic; kiln computes in f32.
    c.get("reorder_and_upcast_attn");
    c.bool_or("tie_word_embeddings", true)?;
    let hidden = c.int("n_embd")?;
    let positions = c.int("n_positions")?;
    if let Some(n) = c.opt_int("n_ctx")? {
        if n != positions {
            return Err(c.unsupported("n_ctx", format!("differs from n_positions = {positions}")));
        }
    }
    let ffn = match c.opt_int("n_inner")? {
        Some(f) => f.to_string(),
        None => "\"4 * hidden\"".to_string(),
    };
    let cfg = [
        ("vocab", c.int("vocab_size")?.to_string()),
        ("max_pos", positions.to_string()),
        ("hidden", hidden.to_string()),
        ("heads", c.int("n_head")?.to_string()),
        ("layers", c.int("n_layer")?.to_string()),
        ("ffn", ffn),
        ("eps", float(c.float_or("layer_norm_epsilon", 1e-5)?)),
    ];
    let p = prefix(ck, folder(ck), &["wte.weight"], "the token embedding")?;
    let head = if ck.has("lm_head.weight") {
        "lm_head.weight".to_string()
    } else {
        format!("{p}wte.weight")
    };
    let l = format!("{p}h.{{i}}");
    Ok(format!(
        r#"Model(
    name: "gpt2",
    config: {{
{cfg}    }},
    dims: {{ "batch": 64, "seq": "max_pos" }},
    inputs: {{
        "input_ids": (dtype: i64, shape: ["batch", "seq"]),
        // 1 for real tokens, 0 for padding; left out, every token is real.
        "attention_mask": (dtype: i64, shape: ["batch", "seq"], default: 1),
    }},
    ignore_weights: ["{l}.attn.bias", "{l}.attn.masked_bias"],
    blocks: {{
        "block": (
            input: "x",
            body: {{
                "ln1": LayerNorm(x: "x", param: "{l}.ln_1", dim: "hidden", eps: "eps"),
                "qkv": Linear(x: "ln1", param: "{l}.attn.c_attn", in_features: "hidden", out_features: "3 * hidden", layout: InOut),
                "parts": Split(x: "qkv", parts: 3),
                "ctx": Attention(q: "parts.0", k: "parts.1", v: "parts.2", heads: "heads", causal: true, mask: "attention_mask"),
                "proj": Linear(x: "ctx", param: "{l}.attn.c_proj", in_features: "hidden", out_features: "hidden", layout: InOut),
                "res1": Add(a: "x", b: "proj"),
                "ln2": LayerNorm(x: "res1", param: "{l}.ln_2", dim: "hidden", eps: "eps"),
                "fc": Linear(x: "ln2", param: "{l}.mlp.c_fc", in_features: "hidden", out_features: "ffn", layout: InOut),
                "act": {act}(x: "fc"),
                "mlp": Linear(x: "act", param: "{l}.mlp.c_proj", in_features: "ffn", out_features: "hidden", layout: InOut),
                "out": Add(a: "res1", b: "mlp"),
            }},
            output: "out",
        ),
    }},
    body: {{
        "tok": Embedding(ids: "input_ids", weight: "{p}wte.weight", rows: "vocab", dim: "hidden"),
        "pos_ids": Positions(of: "input_ids"),
        "pos": Embedding(ids: "pos_ids", weight: "{p}wpe.weight", rows: "max_pos", dim: "hidden"),
        "emb": Add(a: "tok", b: "pos"),
        "h": Repeat(block: "block", x: "emb", times: "layers"),
        "hf": LayerNorm(x: "h", param: "{p}ln_f", dim: "hidden", eps: "eps"),
        "logits": Linear(x: "hf", weight: "{head}", in_features: "hidden", out_features: "vocab"),
    }},
    outputs: {{ "logits": "logits" }},
)
"#,
        cfg = config_block(&cfg)
    ))
}
