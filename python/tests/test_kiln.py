"""The Python package against the references PyTorch/transformers produced (tests/data), and its
errors. Run from the repository root: ``pytest python/tests`` (scripts/test does)."""

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import kiln

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
GPT2_TINY = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 256, "max_pos": 64}
LLAMA_TINY = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 256, "eps": "1e-6"}


def minilm_dir() -> Path:
    cache = Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")
    return cache / "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2") / "gpt2.kiln"
    path = kiln.compile(ROOT / "specs/gpt2.ron", weights=DATA / "gpt2_tiny/model.safetensors",
                        set=GPT2_TINY, output=out)
    assert path == out and out.exists()
    return kiln.Model(path)


def test_gpt2_tiny_matches_transformers(gpt2):
    ids = np.load(DATA / "gpt2_tiny/input_ids.npy")
    want = np.load(DATA / "gpt2_tiny/logits.npy")
    got = gpt2.run({"input_ids": ids})["logits"]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_llama_tiny_matches_transformers(tmp_path):
    path = kiln.compile(ROOT / "specs/llama.ron", weights=DATA / "llama_tiny/model.safetensors",
                        set=LLAMA_TINY, output=tmp_path / "llama.kiln")
    ids = np.load(DATA / "llama_tiny/input_ids.npy")
    got = kiln.Model(path).run(["logits"], {"input_ids": ids})[0]
    np.testing.assert_allclose(got, np.load(DATA / "llama_tiny/logits.npy"), atol=1e-4, rtol=0)


def test_minilm_matches_pytorch(tmp_path):
    weights = minilm_dir() / "model.safetensors"
    if not weights.exists():
        pytest.skip(f"SKIPPED: no MiniLM checkpoint at {weights} (bash scripts/fetch-minilm.sh)")
    m = kiln.Model(kiln.compile(ROOT / "specs/minilm.ron", weights=weights, output=tmp_path / "m.kiln"))
    assert [p.name for p in m.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert m.inputs[0].dtype == "int64" and m.inputs[0].shape[0] == "batch"
    for case in ("single", "padded"):
        feeds = {n: np.load(DATA / f"minilm/{case}_{n}.npy") for n in ("input_ids", "attention_mask", "token_type_ids")}
        out = m.run(feeds)
        want = np.load(DATA / f"minilm/{case}_last_hidden_state.npy")
        np.testing.assert_allclose(out["last_hidden_state"], want, atol=1e-4, rtol=0)
        # ORT's form: every output, in order.
        assert len(m.run(None, feeds)) == len(m.outputs)


def test_four_threads_share_one_model(gpt2):
    ids = np.load(DATA / "gpt2_tiny/input_ids.npy")
    want = gpt2.run({"input_ids": ids})["logits"]
    errors = []

    def work():
        try:
            for _ in range(5):
                np.testing.assert_array_equal(gpt2.run({"input_ids": ids})["logits"], want)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_bad_feeds_name_the_input(gpt2):
    ids = np.load(DATA / "gpt2_tiny/input_ids.npy")
    with pytest.raises(TypeError, match="input `input_ids`: expected int64, got an array of float32"):
        gpt2.run({"input_ids": ids.astype(np.float32)})
    with pytest.raises(ValueError, match="input `input_ids`: expected 2 dims"):
        gpt2.run({"input_ids": ids[0]})
    with pytest.raises(ValueError, match="no input `ids`"):
        gpt2.run({"ids": ids})
    with pytest.raises(kiln.RunError):
        gpt2.run({})
    with pytest.raises(TypeError, match="expected a numpy array"):
        gpt2.run({"input_ids": [[1, 2, 3]]})
    with pytest.raises(ValueError, match="no output 'hidden'"):
        gpt2.run(["hidden"], {"input_ids": ids})


def test_errors_carry_the_command_lines_messages(tmp_path):
    bad = tmp_path / "bad.ron"
    bad.write_text("(name: \"x\", inputs: [")
    with pytest.raises(kiln.CompileError) as e:
        kiln.compile(bad, random_weights=1, output=tmp_path / "x.kiln")
    assert "bad.ron" in str(e.value)
    with pytest.raises(kiln.CompileError, match="give --weights FILE or --random-weights SEED"):
        kiln.compile(ROOT / "specs/mlp.ron", output=tmp_path / "y.kiln")
    junk = tmp_path / "junk.kiln"
    junk.write_bytes(b"not an artifact at all")
    with pytest.raises(kiln.ArtifactError, match="junk.kiln"):
        kiln.Model(junk)
    assert issubclass(kiln.CompileError, kiln.KilnError) and issubclass(kiln.RunError, kiln.KilnError)


@pytest.fixture(scope="module")
def gpt2_decoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2gen") / "gpt2gen.kiln"
    return kiln.Model(kiln.compile(ROOT / "specs/gpt2.ron", weights=DATA / "gpt2_tiny/model.safetensors",
                                   set=GPT2_TINY, output=out, generate=True,
                                   tokenizer=DATA / "byte_tokenizer.json"))


def reference_generation(family):
    import json
    return json.loads((DATA / f"{family}_tiny/generate.json").read_text())


def test_gpt2_tiny_greedy_tokens_match_transformers(gpt2_decoder):
    ref = reference_generation("gpt2")
    for prompt, want in zip(ref["prompts"], ref["greedy"]):
        g = gpt2_decoder.generate(prompt, max_new_tokens=ref["max_new_tokens"], stop=[])
        pieces = list(g)
        assert g.tokens == want
        # The artifact carries a (byte-level) tokenizer, so the stream is text.
        assert all(isinstance(p, str) for p in pieces) and "".join(pieces) == g.text


def test_llama_tiny_greedy_tokens_match_transformers(tmp_path):
    ref = reference_generation("llama")
    m = kiln.Model(kiln.compile(ROOT / "specs/llama.ron", weights=DATA / "llama_tiny/model.safetensors",
                                set=LLAMA_TINY, output=tmp_path / "llama.kiln", generate=True))
    for prompt, want in zip(ref["prompts"], ref["greedy"]):
        got = list(m.generate(np.array(prompt), max_new_tokens=ref["max_new_tokens"]))
        assert got == want  # no tokenizer: token ids


def test_generation_streams_one_token_per_step(gpt2_decoder):
    g = gpt2_decoder.generate([15, 237, 72], max_new_tokens=5, stop=[])
    assert g.tokens == []  # nothing runs before the first next()
    next(g)
    # A text piece comes as soon as its characters are complete (a byte-level tokenizer may
    # need several tokens for one), not at the end.
    assert 1 <= len(g.tokens) < 5
    list(g)
    assert len(g.tokens) == 5
    # Same seed, same samples; the stream stops at a stop token, which it keeps.
    a = gpt2_decoder.generate("ab", max_new_tokens=12, temperature=0.8, top_k=20, seed=7, stop=[])
    b = gpt2_decoder.generate("ab", max_new_tokens=12, temperature=0.8, top_k=20, seed=7, stop=[])
    assert list(a) == list(b) and a.tokens == b.tokens
    first = a.tokens[3]
    c = gpt2_decoder.generate("ab", max_new_tokens=12, temperature=0.8, top_k=20, seed=7, stop=first)
    list(c)
    assert c.tokens == a.tokens[: a.tokens.index(first) + 1]


def test_stop_strings_end_the_text(gpt2_decoder):
    full = gpt2_decoder.generate("hello", max_new_tokens=16, stop=[])
    text = "".join(full)
    cut = text[3:5]
    g = gpt2_decoder.generate("hello", max_new_tokens=16, stop=cut)
    assert "".join(g) == text[: text.find(cut)]


def test_generate_errors(gpt2, gpt2_decoder):
    with pytest.raises(kiln.KilnError, match="cannot generate"):
        gpt2.generate([1, 2, 3])
    with pytest.raises(ValueError, match="exceeds the compiled context of 64"):
        gpt2_decoder.generate(list(range(60)), max_new_tokens=10)
    with pytest.raises(ValueError, match="no tokens"):
        gpt2_decoder.generate([])
    with pytest.raises(kiln.KilnError, match="carries no tokenizer"):
        gpt2.embed("text")


def test_embed_matches_sentence_transformers(tmp_path):
    import json
    folder = minilm_dir()
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"SKIPPED: no MiniLM checkpoint in {folder} (bash scripts/fetch-minilm.sh)")
    m = kiln.Model(kiln.compile(ROOT / "specs/minilm.ron", weights=folder / "model.safetensors",
                                tokenizer=folder / "tokenizer.json", output=tmp_path / "m.kiln"))
    sentences = json.loads((DATA / "minilm/sentences.json").read_text())["padded"]
    got = m.embed(sentences)
    want = np.load(DATA / "minilm/padded_sentence_embedding.npy")
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    one = m.embed(sentences[1])
    np.testing.assert_allclose(one, want[1], atol=1e-4, rtol=0)
    raw = m.embed(sentences, normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), want, atol=1e-4, rtol=0)


def test_hugging_face_folders_compile_directly(tmp_path):
    import json
    folder = minilm_dir()
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"SKIPPED: no MiniLM checkpoint in {folder} (bash scripts/fetch-minilm.sh)")
    # The folder's config, checkpoint and tokenizer.json: no spec, no weights argument.
    m = kiln.Model(kiln.compile(folder, output=tmp_path / "minilm.kiln"))
    assert m.has_tokenizer
    sentences = json.loads((DATA / "minilm/sentences.json").read_text())["padded"]
    want = np.load(DATA / "minilm/padded_sentence_embedding.npy")
    np.testing.assert_allclose(m.embed(sentences), want, atol=1e-4, rtol=0)
    q = kiln.Model(kiln.compile(DATA / "qwen2_tiny", generate=True, output=tmp_path / "qwen2.kiln"))
    ref = json.loads((DATA / "qwen2_tiny/generate.json").read_text())
    got = list(q.generate(ref["prompts"][1], max_new_tokens=len(ref["greedy"][1])))
    assert got == ref["greedy"][1]


def test_optional_inputs_may_be_left_out(tmp_path):
    # Imported BERT: attention_mask and token_type_ids are optional, as in transformers.
    folder = DATA / "bert_tiny"
    m = kiln.Model(kiln.compile(folder, output=tmp_path / "bert.kiln"))
    ports = {p.name: p for p in m.inputs}
    assert not ports["input_ids"].optional and ports["input_ids"].default is None
    assert ports["attention_mask"].default == 1 and ports["token_type_ids"].default == 0
    assert ports["attention_mask"].optional and isinstance(ports["attention_mask"].default, int)
    feeds = {n: np.load(folder / f"{n}.npy") for n in ports}
    for given, prefix in ((feeds, ""), ({"input_ids": feeds["input_ids"]}, "defaults_")):
        out = m.run(given)
        for name in ("last_hidden_state", "pooler_output"):
            want = np.load(folder / f"{prefix}{name}.npy")
            np.testing.assert_allclose(out[name], want, atol=1e-4, rtol=0)
    with pytest.raises(kiln.RunError, match="missing input `input_ids`"):
        m.run({"attention_mask": feeds["attention_mask"]})


def test_arrays_that_are_not_contiguous_are_copied(gpt2):
    ids = np.load(DATA / "gpt2_tiny/input_ids.npy")
    want = gpt2.run({"input_ids": ids})["logits"]
    wide = np.zeros((ids.shape[0], ids.shape[1] * 2), dtype=ids.dtype)
    wide[:, ::2] = ids
    np.testing.assert_array_equal(gpt2.run({"input_ids": wide[:, ::2]})["logits"], want)
    np.testing.assert_array_equal(gpt2.run({"input_ids": np.asfortranarray(ids)})["logits"], want)
