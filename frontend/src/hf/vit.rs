//! ViT image encoders (`ViTModel`, `ViTForImageClassification`) as a spec: a strided `Conv` patch
//! embedding, a `Param` class token joined by `Concat`, a learned position table, pre-LN blocks,
//! a final LayerNorm; then the pooler (dense + activation over the class token) when the
//! checkpoint has one, and `logits` when it has a classifier.

use super::{config_block, float, folder, gpt2::activation, prefix, Checkpoint, Config, ImportError};

/// The spec body for a ViT folder.
pub fn spec(c: &Config, ck: &Checkpoint) -> Result<String, ImportError> {
    let act = activation(c, "hidden_act", "gelu")?;
    let hidden = c.int("hidden_size")?;
    // Only ViTForMaskedImageModeling's decoder reads it.
    c.get("encoder_stride");
    let qkv_bias = c.bool_or("qkv_bias", true)?;
    let image = c.int("image_size")?;
    let patch = c.int("patch_size")?;
    if patch == 0 || image % patch != 0 {
        return Err(c.unsupported(
            "patch_size",
            format!("kiln imports ViTs whose image ({image} pixels) splits into whole patches"),
        ));
    }
    let p = prefix(ck, folder(ck), &["embeddings.cls_token"], "the class token")?;
    let pooled = ck.has(&format!("{p}pooler.dense.weight"));
    let pool_size = c.opt_int("pooler_output_size")?.unwrap_or(hidden);
    let pool_act = match c.str_or("pooler_act", "tanh")? {
        "tanh" => "Tanh",
        _ => activation(c, "pooler_act", "tanh")?,
    };
    let labels = match ck.has("classifier.weight") {
        true => Some(num_labels(c)?),
        false => None,
    };
    let mut cfg = vec![
        ("hidden", hidden.to_string()),
        ("layers", c.int("num_hidden_layers")?.to_string()),
        ("heads", c.int("num_attention_heads")?.to_string()),
        ("ffn", c.int("intermediate_size")?.to_string()),
        ("image", image.to_string()),
        ("patch", patch.to_string()),
        ("channels", c.int("num_channels")?.to_string()),
        ("eps", float(c.float_or("layer_norm_eps", 1e-12)?)),
        ("grid", "\"image / patch\"".to_string()),
        ("num_patches", "\"grid * grid\"".to_string()),
        ("tokens", "\"num_patches + 1\"".to_string()),
    ];
    if pooled {
        cfg.push(("pool_size", pool_size.to_string()));
    }
    if let Some(n) = labels {
        cfg.push(("labels", n.to_string()));
    }
    let l = format!("{p}encoder.layer.{{i}}");
    let bias = if qkv_bias { "" } else { ", bias: false" };
    let (head, outputs) = heads(&p, pooled, pool_act, labels.is_some());
    Ok(format!(
        r#"Model(
    name: "vit",
    config: {{
{cfg}    }},
    dims: {{ "batch": 64 }},
    inputs: {{
        "pixel_values": (dtype: f32, shape: ["batch", "channels", "image", "image"]),
    }},
    blocks: {{
        "layer": (
            input: "x",
            body: {{
                "ln1": LayerNorm(x: "x", param: "{l}.layernorm_before", dim: "hidden", eps: "eps"),
                "q": Linear(x: "ln1", param: "{l}.attention.attention.query", in_features: "hidden", out_features: "hidden"{bias}),
                "k": Linear(x: "ln1", param: "{l}.attention.attention.key", in_features: "hidden", out_features: "hidden"{bias}),
                "v": Linear(x: "ln1", param: "{l}.attention.attention.value", in_features: "hidden", out_features: "hidden"{bias}),
                "ctx": Attention(q: "q", k: "k", v: "v", heads: "heads"),
                "attn_out": Linear(x: "ctx", param: "{l}.attention.output.dense", in_features: "hidden", out_features: "hidden"),
                "h": Add(a: "x", b: "attn_out"),
                "ln2": LayerNorm(x: "h", param: "{l}.layernorm_after", dim: "hidden", eps: "eps"),
                "up": Linear(x: "ln2", param: "{l}.intermediate.dense", in_features: "hidden", out_features: "ffn"),
                "act": {act}(x: "up"),
                "down": Linear(x: "act", param: "{l}.output.dense", in_features: "ffn", out_features: "hidden"),
                "out": Add(a: "h", b: "down"),
            }},
            output: "out",
        ),
    }},
    body: {{
        // [batch, channels, image, image] → [batch, hidden, grid, grid] → [batch, num_patches, hidden]
        "patches": Conv(x: "pixel_values", param: "{p}embeddings.patch_embeddings.projection",
                        in_channels: "channels", out_channels: "hidden", kernel: "patch", stride: "patch"),
        "flat": Reshape(x: "patches", shape: ["batch", "hidden", "num_patches"]),
        "patch_seq": Transpose(x: "flat", perm: [0, 2, 1]),
        "cls": Param(weight: "{p}embeddings.cls_token", shape: [1, 1, "hidden"]),
        "tokens_in": Concat(xs: ["cls", "patch_seq"], axis: 1),
        "positions": Param(weight: "{p}embeddings.position_embeddings", shape: [1, "tokens", "hidden"]),
        "embedded": Add(a: "tokens_in", b: "positions"),
        "encoded": Repeat(block: "layer", x: "embedded", times: "layers"),
        "last_hidden_state": LayerNorm(x: "encoded", param: "{p}layernorm", dim: "hidden", eps: "eps"),
{head}    }},
    outputs: {{
{outputs}    }},
)
"#,
        cfg = config_block(&cfg)
    ))
}

/// The layers over the class token (pooler, classifier) and the output list.
fn heads(p: &str, pooled: bool, pool_act: &str, classifier: bool) -> (String, String) {
    let mut body = String::new();
    let mut outputs = "        \"last_hidden_state\": \"last_hidden_state\",\n".to_string();
    if pooled || classifier {
        body += r#"        "first": Slice(x: "last_hidden_state", axis: 1, start: 0, end: 1),
        "class_token": Reshape(x: "first", shape: ["batch", "hidden"]),
"#;
    }
    if pooled {
        body += &format!(
            r#"        "pool_dense": Linear(x: "class_token", param: "{p}pooler.dense", in_features: "hidden", out_features: "pool_size"),
        "pooler_output": {pool_act}(x: "pool_dense"),
"#
        );
        outputs += "        \"pooler_output\": \"pooler_output\",\n";
    }
    if classifier {
        body += r#"        "logits": Linear(x: "class_token", param: "classifier", in_features: "hidden", out_features: "labels"),
"#;
        outputs += "        \"logits\": \"logits\",\n";
    }
    (body, outputs)
}

/// The classifier's width: the entries of `id2label` (transformers' `num_labels`).
fn num_labels(c: &Config) -> Result<usize, ImportError> {
    match c.get("id2label") {
        Some(serde_json::Value::Object(m)) if !m.is_empty() => Ok(m.len()),
        _ => Err(c.unsupported(
            "id2label",
            "the checkpoint has a classifier, so `id2label` must name its labels",
        )),
    }
}
