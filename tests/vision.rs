//! Vision layers against PyTorch (scripts/make-encoder-references.py): `Conv` (1-D and 2-D;
//! stride, padding, groups) against `torch.nn.functional.convNd`, and `specs/vit.ron` (Conv patch
//! embedding, `Param` class token and position table, `Concat`) against transformers' ViTModel,
//! through the interpreter and compiled.

mod common;

use std::collections::BTreeMap;

use common::*;
use kiln_frontend::Options;
use kiln_ir::{DType, Tensor};
use safetensors::SafeTensors;

const CONV_CASES: &[&str] = &["patch2d", "grouped2d", "rect2d", "depthwise1d", "strided1d"];

/// The tensors and metadata of one reference file.
fn reference(rel: &str) -> (BTreeMap<String, Tensor>, BTreeMap<String, String>) {
    let bytes = std::fs::read(data(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let t = Tensor::from_le_bytes(DType::F32, v.shape().to_vec(), v.data()).unwrap();
            (name, t)
        })
        .collect();
    (
        tensors,
        meta.metadata().clone().unwrap_or_default().into_iter().collect(),
    )
}

/// A one-layer spec: `y = Conv(x)` with the case's fields (RON, from the file's metadata), batch
/// symbolic.
fn conv_spec(x: &[usize], fields: &str) -> String {
    let spatial: Vec<String> = x[2..].iter().map(|d| d.to_string()).collect();
    format!(
        r#"Model(
    name: "conv",
    dims: {{ "batch": 4 }},
    inputs: {{ "x": (dtype: f32, shape: ["batch", {}, {}]) }},
    ignore_weights: ["x", "y"],
    body: {{ "y": Conv(x: "x", weight: "weight", bias: "bias", {fields}) }},
    outputs: {{ "y": "y" }},
)"#,
        x[1],
        spatial.join(", "),
    )
}

#[test]
fn conv_matches_pytorch() {
    for case in CONV_CASES {
        let (t, meta) = reference(&format!("conv/{case}.safetensors"));
        let src = conv_spec(t["x"].shape(), &meta["conv"]);
        let l = kiln_frontend::lower_source("conv.ron", &src, &Options::default())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let w: BTreeMap<String, Tensor> = ["weight", "bias"]
            .iter()
            .map(|k| (k.to_string(), t[*k].clone()))
            .collect();
        let out = run(&l, &w, &[("x", t["x"].clone())]);
        assert_close(&format!("conv {case} interpreter"), &out["y"], &t["y"], 1e-5);
        let m = compile_o2(l, &w);
        let feed: BTreeMap<String, Tensor> = [("x".to_string(), t["x"].clone())].into_iter().collect();
        let got = m.run(&feed).unwrap_or_else(|e| panic!("{case}: {e}")).remove(0).1;
        assert_close(&format!("conv {case} compiled"), &got, &t["y"], 1e-5);
    }
}

const VIT_TINY: &[(&str, &str)] = &[
    ("hidden", "64"),
    ("layers", "2"),
    ("heads", "4"),
    ("ffn", "128"),
    ("image", "32"),
    ("patch", "8"),
];

#[test]
fn vit_matches_transformers() {
    let l = spec("vit.ron", VIT_TINY);
    let w = kiln_frontend::weights::load_safetensors(&l, &data("vit_tiny/model.safetensors"))
        .unwrap_or_else(|e| panic!("{e}"));
    let pixels = npy("vit_tiny/pixel_values.npy");
    let want_h = npy("vit_tiny/last_hidden_state.npy");
    let want_p = npy("vit_tiny/pooler_output.npy");
    let out = run(&l, &w, &[("pixel_values", pixels.clone())]);
    assert_close(
        "vit interpreter last_hidden_state",
        &out["last_hidden_state"],
        &want_h,
        1e-4,
    );
    assert_close("vit interpreter pooler_output", &out["pooler_output"], &want_p, 1e-4);
    let m = compile_o2(l, &w);
    let feed: BTreeMap<String, Tensor> = [("pixel_values".to_string(), pixels)].into_iter().collect();
    let got: BTreeMap<String, Tensor> = m.run(&feed).unwrap_or_else(|e| panic!("{e}")).into_iter().collect();
    assert_close(
        "vit compiled last_hidden_state",
        &got["last_hidden_state"],
        &want_h,
        1e-4,
    );
    assert_close("vit compiled pooler_output", &got["pooler_output"], &want_p, 1e-4);
}

#[test]
fn conv_with_a_stride_longer_than_the_input_reads_one_window() {
    // One window per axis whatever the stride: the first window of the strided reference.
    let (t, meta) = reference("conv/strided1d.safetensors");
    let fields = meta["conv"].replace("stride: [2]", "stride: [1000000000000]");
    assert_ne!(fields, meta["conv"], "case does not apply");
    let l = kiln_frontend::lower_source("conv.ron", &conv_spec(t["x"].shape(), &fields), &Options::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let w: BTreeMap<String, Tensor> = ["weight", "bias"]
        .iter()
        .map(|k| (k.to_string(), t[*k].clone()))
        .collect();
    let y = &t["y"];
    let first: Vec<f64> = y.to_f64_vec().chunks(y.shape()[2]).map(|row| row[0]).collect();
    let want = Tensor::from_f64(DType::F32, vec![y.shape()[0], y.shape()[1], 1], &first).unwrap();
    let m = compile_o2(l, &w);
    let feed: BTreeMap<String, Tensor> = [("x".to_string(), t["x"].clone())].into_iter().collect();
    let got = m.run(&feed).unwrap_or_else(|e| panic!("{e}")).remove(0).1;
    assert_close("conv with a stride of 10^12, compiled", &got, &want, 1e-5);
}
