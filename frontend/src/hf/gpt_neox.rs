//! GPT-NeoX decoders (Pythia) as a spec: LayerNorm with biases, one `query_key_value` product
//! whose rows are interleaved per head, rotary positions on a fraction of each head, parallel or
//! sequential residual (`use_parallel_residual`), an untied `embed_out` head.

use super::decoder::rope;
use super::{config_block, float, folder, gpt2::activation, prefix, Checkpoint, Config, ImportError};

/// Rotary base and rotated fraction: `rope_parameters` (transformers 5) or the older
/// `rotary_emb_base` / `rotary_pct` fields.
fn neox_rope(c: &Config) -> Result<(f64, f64), ImportError> {
    let (mut theta, mut partial) = rope(c)?;
    if let Some(b) = c.get("rotary_emb_base") {
        theta = b
            .as_f64()
            .ok_or_else(|| c.unsupported("rotary_emb_base", "expected a number"))?;
    }
    if let Some(p) = c.get("rotary_pct") {
        partial = p
            .as_f64()
            .ok_or_else(|| c.unsupported("rotary_pct", "expected a number"))?;
    }
    Ok((theta, partial))
}

/// The spec body for a GPT-NeoX folder.
pub fn spec(c: &Config, ck: &Checkpoint) -> Result<String, ImportError> {
    let act = activation(c, "hidden_act", "gelu")?;
    c.get("is_decoder");
    let hidden = c.int("hidden_size")?;
    let heads = c.int("num_attention_heads")?;
    if heads == 0 || hidden % heads != 0 {
        return Err(c.unsupported("num_attention_heads", format!("does not divide hidden_size {hidden}")));
    }
    let (theta, partial) = neox_rope(c)?;
    // transformers truncates: int(head_dim * rotary_pct).
    let rotary = ((hidden / heads) as f64 * partial) as u64;
    let bias = c.bool_or("attention_bias", true)?;
    let parallel = c.bool_or("use_parallel_residual", true)?;
    if c.bool_or("tie_word_embeddings", false)? {
        return Err(c.unsupported("tie_word_embeddings", "GPT-NeoX with a tied head is not implemented"));
    }
    let p = prefix(ck, folder(ck), &["embed_in.weight"], "the token embedding")?;
    let head = if ck.has("embed_out.weight") {
        "embed_out"
    } else {
        "lm_head"
    };
    let cfg = [
        ("vocab", c.int("vocab_size")?.to_string()),
        ("hidden", hidden.to_string()),
        ("heads", heads.to_string()),
        ("head_dim", "\"hidden / heads\"".to_string()),
        ("rotary_dim", rotary.to_string()),
        ("layers", c.int("num_hidden_layers")?.to_string()),
        ("ffn", c.int("intermediate_size")?.to_string()),
        ("max_pos", c.int("max_position_embeddings")?.to_string()),
        ("eps", float(c.float_or("layer_norm_eps", 1e-5)?)),
        ("rope_theta", float(theta)),
    ];
    let l = format!("{p}layers.{{i}}");
    // Parallel residual: the MLP reads the block's input; sequential: the attention's output.
    let (mlp_in, comment) = match parallel {
        true => (
            "x",
            "                // Parallel residual: the MLP reads the block's input too.\n",
        ),
        false => ("with_attn", ""),
    };
    Ok(format!(
        r#"Model(
    name: "gpt_neox",
    config: {{
{cfg}    }},
    dims: {{ "batch": 64, "seq": "max_pos" }},
    inputs: {{
        "input_ids": (dtype: i64, shape: ["batch", "seq"]),
        // 1 for real tokens, 0 for padding; left out, every token is real.
        "attention_mask": (dtype: i64, shape: ["batch", "seq"], default: 1),
    }},
    blocks: {{
        "decoder": (
            input: "x",
            body: {{
                "n1": LayerNorm(x: "x", param: "{l}.input_layernorm", dim: "hidden", eps: "eps"),
                // Rows interleaved per head: [heads, 3, head_dim].
                "qkv": Linear(x: "n1", param: "{l}.attention.query_key_value", bias: {bias}, in_features: "hidden", out_features: "3 * hidden"),
                "per_head": Reshape(x: "qkv", shape: ["batch", "seq", "heads", "3 * head_dim"]),
                "parts": Split(x: "per_head", parts: 3),
                "q": Reshape(x: "parts.0", shape: ["batch", "seq", "hidden"]),
                "k": Reshape(x: "parts.1", shape: ["batch", "seq", "hidden"]),
                "v": Reshape(x: "parts.2", shape: ["batch", "seq", "hidden"]),
                "ctx": Attention(q: "q", k: "k", v: "v", heads: "heads", causal: true, mask: "attention_mask", rope: (theta: "rope_theta", dim: "rotary_dim")),
                "attn": Linear(x: "ctx", param: "{l}.attention.dense", bias: {bias}, in_features: "hidden", out_features: "hidden"),
                "with_attn": Add(a: "x", b: "attn"),
{comment}                "n2": LayerNorm(x: "{mlp_in}", param: "{l}.post_attention_layernorm", dim: "hidden", eps: "eps"),
                "up": Linear(x: "n2", param: "{l}.mlp.dense_h_to_4h", in_features: "hidden", out_features: "ffn"),
                "act": {act}(x: "up"),
                "mlp": Linear(x: "act", param: "{l}.mlp.dense_4h_to_h", in_features: "ffn", out_features: "hidden"),
                "out": Add(a: "with_attn", b: "mlp"),
            }},
            output: "out",
        ),
    }},
    body: {{
        "emb": Embedding(ids: "input_ids", weight: "{p}embed_in.weight", rows: "vocab", dim: "hidden"),
        "h": Repeat(block: "decoder", x: "emb", times: "layers"),
        "hn": LayerNorm(x: "h", param: "{p}final_layer_norm", dim: "hidden", eps: "eps"),
        "logits": Linear(x: "hn", param: "{head}", bias: false, in_features: "hidden", out_features: "vocab"),
    }},
    outputs: {{ "logits": "logits" }},
)
"#,
        cfg = config_block(&cfg)
    ))
}
