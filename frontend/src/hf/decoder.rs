//! Llama-family decoders — `llama`, `mistral`, `qwen2`, `phi3`, `mixtral` — as a spec: RMSNorm,
//! rotary positions (rotate-half), grouped-query attention, SwiGLU MLP. What differs comes from the
//! config: biases (Qwen2's q/k/v, Llama's `attention_bias` and `mlp_bias`), Mistral's, Phi-3's and
//! Mixtral's sliding window, Phi-3's fused qkv and gate/up projections (split after one product
//! each), Mixtral's mixture of experts in place of the MLP, a tied or untied head (found from the
//! checkpoint), head_dim, partial rotary.

use serde_json::Value;

use super::{config_block, float, folder, prefix, Checkpoint, Config, ImportError};

/// Rotary settings: base and the rotated fraction of each head.
pub(super) fn rope(c: &Config) -> Result<(f64, f64), ImportError> {
    let (mut theta, mut partial) = (None, None);
    if let Some(rp) = c.get("rope_parameters") {
        let obj = rp
            .as_object()
            .ok_or_else(|| c.unsupported("rope_parameters", "expected an object"))?;
        if let Some(t) = obj.get("rope_type").filter(|t| *t != "default") {
            return Err(c.unsupported(
                "rope_parameters",
                format!("rope_type {t} is not implemented (only \"default\" rotary embeddings)"),
            ));
        }
        for (k, v) in obj {
            match (k.as_str(), v) {
                ("rope_type", _) => {}
                ("rope_theta", v) if v.is_number() => theta = v.as_f64(),
                ("partial_rotary_factor", v) if v.is_number() => partial = v.as_f64(),
                _ => return Err(c.unsupported("rope_parameters", format!("`{k}` is not implemented"))),
            }
        }
    }
    if c.get("rope_scaling").is_some() {
        return Err(c.unsupported("rope_scaling", "rotary scaling is not implemented"));
    }
    let top = c.float_or("rope_theta", theta.unwrap_or(10000.0))?;
    if theta.is_some_and(|t| t != top) {
        return Err(c.unsupported("rope_theta", "disagrees with rope_parameters.rope_theta"));
    }
    let fraction = c.float_or("partial_rotary_factor", partial.unwrap_or(1.0))?;
    if partial.is_some_and(|p| p != fraction) {
        return Err(c.unsupported(
            "partial_rotary_factor",
            "disagrees with rope_parameters.partial_rotary_factor",
        ));
    }
    Ok((top, fraction))
}

/// The sliding window, if the family and config have one.
fn window(c: &Config, model_type: &str) -> Result<Option<u64>, ImportError> {
    match model_type {
        "mistral" | "phi3" | "mixtral" => c.opt_int("sliding_window"),
        "qwen2" => {
            c.get("sliding_window");
            if c.bool_or("use_sliding_window", false)? {
                return Err(c.unsupported("use_sliding_window", "Qwen2's per-layer windows are not implemented"));
            }
            if let Some(t) = c.get("layer_types").and_then(Value::as_array) {
                if t.iter().any(|x| x != "full_attention") {
                    return Err(c.unsupported("layer_types", "only full_attention layers are implemented"));
                }
            }
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// The spec body for a Llama-family folder.
pub fn spec(c: &Config, ck: &Checkpoint, model_type: &str) -> Result<String, ImportError> {
    c.only("hidden_act", &["silu".into()], "only SiLU-gated MLPs are implemented")?;
    let hidden = c.int("hidden_size")?;
    let heads = c.int("num_attention_heads")?;
    let head_dim = match c.opt_int("head_dim")? {
        Some(d) => d,
        None if heads > 0 && hidden % heads == 0 => hidden / heads,
        None => return Err(c.unsupported("num_attention_heads", format!("does not divide hidden_size {hidden}"))),
    };
    let (theta, partial) = rope(c)?;
    let rope_dim = (head_dim as f64 * partial).round() as u64;
    let (qkv_bias, o_bias) = match model_type {
        "qwen2" => (true, false),
        "llama" => {
            let b = c.bool_or("attention_bias", false)?;
            (b, b)
        }
        _ => (false, false),
    };
    let mlp_bias = model_type == "llama" && c.bool_or("mlp_bias", false)?;
    let window = window(c, model_type)?;
    let p = prefix(ck, folder(ck), &["embed_tokens.weight"], "the token embedding")?;
    let mut cfg = vec![
        ("vocab", c.int("vocab_size")?.to_string()),
        ("hidden", hidden.to_string()),
        ("heads", heads.to_string()),
        (
            "kv_heads",
            c.opt_int("num_key_value_heads")?.unwrap_or(heads).to_string(),
        ),
        ("head_dim", head_dim.to_string()),
        ("layers", c.int("num_hidden_layers")?.to_string()),
        ("ffn", c.int("intermediate_size")?.to_string()),
        ("max_pos", c.int("max_position_embeddings")?.to_string()),
        ("eps", float(c.float_or("rms_norm_eps", 1e-6)?)),
        ("rope_theta", float(theta)),
    ];
    if rope_dim != head_dim {
        cfg.push(("rope_dim", rope_dim.to_string()));
    }
    let attn_window = match window {
        Some(w) => {
            cfg.push(("window", w.to_string()));
            ", window: \"window\""
        }
        None => "",
    };
    let rope = if rope_dim != head_dim {
        "rope: (theta: \"rope_theta\", dim: \"rope_dim\")"
    } else {
        "rope: (theta: \"rope_theta\")"
    };
    let (head, outputs) = head(c, ck, &p)?;
    let l = format!("{p}layers.{{i}}");
    let lin = |name: &str, param: &str, bias: bool, inf: &str, outf: &str| {
        format!(
            "                \"{name}\": Linear(x: \"{{X}}\", param: \"{l}.{param}\", bias: {bias}, in_features: \"{inf}\", out_features: \"{outf}\"),\n"
        )
    };
    let ctx = format!("                \"ctx\": Attention(q: \"q\", k: \"k\", v: \"v\", heads: \"heads\", kv_heads: \"kv_heads\", causal: true, mask: \"attention_mask\"{attn_window}, {rope}),\n");
    if model_type == "mixtral" {
        cfg.extend(experts(c)?);
    }
    let (qkv, gate_up) = if model_type == "phi3" {
        // Phi-3 fuses the projections: one product for q/k/v, one for the gate and up halves.
        c.get("original_max_position_embeddings"); // read by longrope scaling only (refused above)
        (
            lin("qkv", "self_attn.qkv_proj", false, "hidden", "(heads + 2 * kv_heads) * head_dim").replace("{X}", "n1")
                + "                \"qkv_parts\": Split(x: \"qkv\", sizes: [\"heads * head_dim\", \"kv_heads * head_dim\", \"kv_heads * head_dim\"]),\n"
                + &ctx.replace("q: \"q\", k: \"k\", v: \"v\"", "q: \"qkv_parts.0\", k: \"qkv_parts.1\", v: \"qkv_parts.2\""),
            lin("gate_up", "mlp.gate_up_proj", false, "hidden", "2 * ffn").replace("{X}", "n2")
                + "                \"halves\": Split(x: \"gate_up\", parts: 2),\n                \"act\": Silu(x: \"halves.0\"),\n                \"glu\": Mul(a: \"act\", b: \"halves.1\"),\n",
        )
    } else {
        (
            [
                lin("q", "self_attn.q_proj", qkv_bias, "hidden", "heads * head_dim").replace("{X}", "n1"),
                lin("k", "self_attn.k_proj", qkv_bias, "hidden", "kv_heads * head_dim").replace("{X}", "n1"),
                lin("v", "self_attn.v_proj", qkv_bias, "hidden", "kv_heads * head_dim").replace("{X}", "n1"),
                ctx,
            ]
            .concat(),
            [
                lin("gate", "mlp.gate_proj", mlp_bias, "hidden", "ffn").replace("{X}", "n2"),
                lin("up", "mlp.up_proj", mlp_bias, "hidden", "ffn").replace("{X}", "n2"),
                "                \"act\": Silu(x: \"gate\"),\n                \"glu\": Mul(a: \"act\", b: \"up\"),\n"
                    .to_string(),
            ]
            .concat(),
        )
    };
    let (mlp, mlp_out) = if model_type == "mixtral" {
        (moe_lines(&l), "moe")
    } else {
        (
            gate_up + &lin("down", "mlp.down_proj", mlp_bias, "ffn", "hidden").replace("{X}", "glu"),
            "down",
        )
    };
    let block = [
        format!("                \"n1\": RMSNorm(x: \"x\", param: \"{l}.input_layernorm\", dim: \"hidden\", eps: \"eps\"),\n"),
        qkv,
        lin("o", "self_attn.o_proj", o_bias, "heads * head_dim", "hidden").replace("{X}", "ctx"),
        "                \"r1\": Add(a: \"x\", b: \"o\"),\n".to_string(),
        format!("                \"n2\": RMSNorm(x: \"r1\", param: \"{l}.post_attention_layernorm\", dim: \"hidden\", eps: \"eps\"),\n"),
        mlp,
        format!("                \"out\": Add(a: \"r1\", b: \"{mlp_out}\"),\n"),
    ]
    .concat();
    Ok(format!(
        "Model(
    name: \"{model_type}\",
    config: {{
{cfg}    }},
    dims: {{ \"batch\": 64, \"seq\": \"max_pos\" }},
    inputs: {{
        \"input_ids\": (dtype: i64, shape: [\"batch\", \"seq\"]),
        // 1 for real tokens, 0 for padding; left out, every token is real.
        \"attention_mask\": (dtype: i64, shape: [\"batch\", \"seq\"], default: 1),
    }},
    blocks: {{
        \"decoder\": (
            input: \"x\",
            body: {{
{block}            }},
            output: \"out\",
        ),
    }},
    body: {{
        \"emb\": Embedding(ids: \"input_ids\", weight: \"{p}embed_tokens.weight\", rows: \"vocab\", dim: \"hidden\"),
        \"h\": Repeat(block: \"decoder\", x: \"emb\", times: \"layers\"),
        \"hn\": RMSNorm(x: \"h\", param: \"{p}norm\", dim: \"hidden\", eps: \"eps\"),
{head}    }},
    outputs: {{ {outputs} }},
)
",
        cfg = config_block(&cfg)
    ))
}

/// Mixtral's expert settings: how many, and how many each token uses. The router's jitter noise
/// and auxiliary loss act in training only.
fn experts(c: &Config) -> Result<Vec<(&'static str, String)>, ImportError> {
    for training_only in ["router_aux_loss_coef", "output_router_logits", "router_jitter_noise"] {
        c.get(training_only);
    }
    let n = c.int("num_local_experts")?;
    let k = c.int("num_experts_per_tok")?;
    if n == 0 || k == 0 || k > n {
        return Err(c.unsupported(
            "num_experts_per_tok",
            format!("{k} experts per token out of {n} (must be between 1 and num_local_experts)"),
        ));
    }
    Ok(vec![("experts", n.to_string()), ("top_k", k.to_string())])
}

/// Mixtral's block in place of the MLP: the router's logits, then the experts.
fn moe_lines(l: &str) -> String {
    let m = format!("{l}.block_sparse_moe");
    format!(
        "                \"router\": Linear(x: \"n2\", param: \"{m}.gate\", bias: false, in_features: \"hidden\", out_features: \"experts\"),
                \"moe\": Moe(
                    x: \"n2\", logits: \"router\", experts: \"experts\", top_k: \"top_k\", dim: \"hidden\", ffn: \"ffn\",
                    gate: \"{m}.experts.{{e}}.w1.weight\",
                    up: \"{m}.experts.{{e}}.w3.weight\",
                    down: \"{m}.experts.{{e}}.w2.weight\",
                ),
"
    )
}

/// The LM head's line and the outputs: an untied `lm_head`, the embedding when tied, or the
/// hidden states of a checkpoint without a head.
fn head(c: &Config, ck: &Checkpoint, p: &str) -> Result<(String, String), ImportError> {
    let tied = c.bool_or("tie_word_embeddings", false)?;
    let line = if ck.has("lm_head.weight") {
        "        \"logits\": Linear(x: \"hn\", param: \"lm_head\", bias: false, in_features: \"hidden\", out_features: \"vocab\"),\n".to_string()
    } else if tied {
        format!("        // Tied head: the token embedding table, used as an [out, in] matrix.\n        \"logits\": Linear(x: \"hn\", weight: \"{p}embed_tokens.weight\", in_features: \"hidden\", out_features: \"vocab\"),\n")
    } else {
        return Ok((String::new(), "\"last_hidden_state\": \"hn\"".into()));
    };
    Ok((line, "\"logits\": \"logits\"".into()))
}
