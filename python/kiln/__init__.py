"""kiln: compile transformer model specs to fast native code and run them on numpy arrays.

    import kiln, numpy as np
    path = kiln.compile("specs/minilm.ron", weights="model.safetensors", output="minilm.kiln")
    m = kiln.Model(path)
    out = m.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    hidden = m.run(["last_hidden_state"], feeds)[0]     # as onnxruntime's InferenceSession.run
    vectors = m.embed(["a sentence", "another"])        # sentence-transformers' mean pooling

    g = kiln.Model(kiln.compile("specs/gpt2.ron", weights="gpt2.safetensors", generate=True,
                                tokenizer="tokenizer.json"))
    for piece in g.generate("The kiln", max_new_tokens=32):
        print(piece, end="", flush=True)

Errors are ``kiln.KilnError`` subclasses carrying the command line's messages; a feed of the wrong
dtype raises ``TypeError`` and one of the wrong rank or name ``ValueError``, naming the input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "ArtifactError", "CompileError", "Generation", "KilnError", "Model", "Port", "RunError", "compile",
]

from ._kiln import ArtifactError, CompileError, KilnError, RunError
from ._kiln import Model as _Model
from ._kiln import compile_args as _compile_args
from ._kiln import embed_texts as _embed_texts
from ._kiln import start_generation as _start_generation

__all__ = [
    "compile", "Model", "Port", "Generation",
    "KilnError", "CompileError", "ArtifactError", "RunError",
]

# End-of-text tokens a generation stops at by default (as `kiln generate` does).
_END_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>")


@dataclass(frozen=True)
class Port:
    """A model input or output: its name, numpy dtype name and shape (numbers, or symbolic dims
    such as ``"seq"`` with their largest value in ``bounds``). An optional input has a
    ``default``: ``run`` may be given no array for it, and every element is then that value
    (``attention_mask`` defaults to 1 and ``token_type_ids`` to 0, as in transformers)."""

    name: str
    dtype: str
    shape: Tuple[Union[int, str], ...]
    bounds: Dict[str, int]
    default: Union[None, int, float, bool] = None

    @property
    def optional(self) -> bool:
        """Whether ``run`` may leave this input out."""
        return self.default is not None


def _dim(d: str) -> Union[int, str]:
    return int(d) if d.isdigit() else d


def compile(
    spec: Union[str, os.PathLike],
    *,
    weights: Optional[Union[str, os.PathLike]] = None,
    output: Optional[Union[str, os.PathLike]] = None,
    target: str = "cpu",
    cpu: str = "native",
    opt_level: int = 2,
    quantize: Optional[str] = None,
    calib: Optional[Union[str, os.PathLike]] = None,
    sparsity: Optional[str] = None,
    generate: bool = False,
    set: Optional[Mapping[str, object]] = None,
    random_weights: Optional[int] = None,
    tokenizer: Optional[Union[str, os.PathLike]] = None,
) -> Path:
    """Compiles ``spec`` as ``kiln compile`` does and returns the artifact's path (``output``, or
    the spec's name with ``.kiln`` in the current directory)."""
    spec = Path(spec)
    out = Path(output) if output is not None else Path.cwd() / (spec.stem + ".kiln")
    args = ["compile", str(spec), "-o", str(out), f"-O{int(opt_level)}", "--target", target, "--cpu", cpu]
    if weights is not None:
        args += ["--weights", str(weights)]
    if random_weights is not None:
        args += ["--random-weights", str(int(random_weights))]
    if quantize is not None:
        args += ["--quantize", quantize]
    if calib is not None:
        args += ["--calib", str(calib)]
    if sparsity is not None:
        args += ["--sparsity", sparsity]
    if tokenizer is not None:
        args += ["--tokenizer", str(tokenizer)]
    if generate:
        args.append("--generate")
    for k, v in (set or {}).items():
        args += ["--set", f"{k}={v}"]
    _compile_args(args)
    return out


class Model:
    """A compiled artifact, loaded: ``run`` takes numpy arrays and returns numpy arrays. The GIL
    is released while the model runs, and several threads may call one model at once."""

    def __init__(self, path: Union[str, os.PathLike], threads: Optional[int] = None):
        self._m = _Model(str(path), threads)
        bounds = dict(self._m.bounds)
        self.inputs: List[Port] = [
            Port(n, d, tuple(_dim(x) for x in s), bounds, v) for n, d, s, v in self._m.inputs
        ]
        self.outputs: List[Port] = [
            Port(n, d, tuple(_dim(x) for x in s), bounds) for n, d, s, _ in self._m.outputs
        ]

    def run(self, *args):
        """``run(feeds)`` returns ``{output name: array}``; ``run(output_names, feeds)`` returns a
        list in the order asked for (every output when ``output_names`` is None), as
        onnxruntime's ``InferenceSession.run`` does."""
        if len(args) == 1:
            return dict(self._m.run(_feeds(args[0])))
        if len(args) != 2:
            raise TypeError("run(feeds) or run(output_names, feeds)")
        names, feeds = args
        out = dict(self._m.run(_feeds(feeds)))
        if names is None:
            return list(out.values())
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"no output {missing[0]!r} (outputs: {', '.join(out)})")
        return [out[n] for n in names]


    @property
    def is_decoder(self) -> bool:
        """Whether the artifact generates (compiled with ``generate=True``)."""
        return self._m.is_decoder

    @property
    def level(self) -> str:
        """The CPU level the kernels run at on this machine (``x86-64-v3``, ``x86-64-v4``, ...)."""
        return self._m.level

    @property
    def has_tokenizer(self) -> bool:
        """Whether the artifact carries a tokenizer (compiled with ``tokenizer=``)."""
        return self._m.has_tokenizer

    def embed(self, texts: Union[str, Sequence[str]], normalize: bool = True) -> np.ndarray:
        """Sentence embeddings as sentence-transformers computes them: the last hidden states
        averaged over each text's tokens, L2-normalized unless ``normalize=False``. Returns
        ``[len(texts), hidden]`` float32 (``[hidden]`` for one string). Needs an encoder artifact
        that carries its tokenizer."""
        if isinstance(texts, str):
            return _embed_texts(self._m, [texts], bool(normalize))[0]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("embed takes a string or a sequence of strings")
        return _embed_texts(self._m, texts, bool(normalize))

    def generate(
        self,
        prompt: Union[str, Sequence[int], np.ndarray],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Union[None, int, str, Sequence[Union[int, str]]] = None,
    ) -> "Generation":
        """Generates from a prompt (text, which needs the artifact's tokenizer, or token ids) and
        returns an iterator that yields each new token as it is produced: text pieces when the
        artifact carries a tokenizer, token ids otherwise. ``temperature=0`` is greedy. ``stop``:
        token ids and strings to stop at (default: the tokenizer's end-of-text token); a stop
        string ends the text before it."""
        if not self._m.is_decoder:
            raise KilnError("this artifact cannot generate (it has no key/value cache); compile with generate=True")
        if isinstance(prompt, str):
            ids = self._m.encode(prompt)
        else:
            ids = [int(x) for x in np.asarray(prompt).reshape(-1)]
        stops = [] if stop is None else [stop] if isinstance(stop, (int, str)) else list(stop)
        stop_ids = [int(s) for s in stops if not isinstance(s, str)]
        stop_texts = [s for s in stops if isinstance(s, str)]
        if stop is None and self._m.has_tokenizer:
            stop_ids = [i for i in (self._m.token_id(t) for t in _END_TOKENS) if i is not None][:1]
        it = _start_generation(self._m, ids, stop_ids, int(max_new_tokens), float(temperature),
                               int(top_k), float(top_p), int(seed))
        return Generation(it, self._m if self._m.has_tokenizer else None, stop_texts)


class Generation:
    """Tokens as a model generates them (``Model.generate``): iterate for text pieces (or token
    ids when the artifact has no tokenizer); ``tokens`` holds the ids generated so far and
    ``text`` their text."""

    def __init__(self, it, tokenizer, stop_texts: List[str]):
        self._it = it
        self._tok = tokenizer
        self._stops = stop_texts
        self._shown = ""
        self._ended = False

    @property
    def tokens(self) -> List[int]:
        return list(self._it.tokens)

    @property
    def text(self) -> str:
        return self._shown

    def __iter__(self) -> Iterator[Union[str, int]]:
        return self

    def __next__(self) -> Union[str, int]:
        while not self._ended:
            t = next(self._it, None)
            if t is None:
                return self._finish()
            if self._tok is None:
                return t
            piece = self._piece()
            if piece:
                return piece
        raise StopIteration

    def _piece(self) -> str:
        """The new text since the last piece; empty while a character is incomplete or the text
        ends in what may become a stop string (text already yielded cannot be taken back)."""
        text = self._tok.decode(self._it.tokens)
        if text.endswith("\ufffd") or not text.startswith(self._shown):
            return ""
        cuts = [text.find(s) for s in self._stops if s in text]
        if cuts:
            self._ended = True
            text = text[: min(cuts)]
        else:
            text = text[: len(text) - self._held(text)]
        piece, self._shown = text[len(self._shown):], max(text, self._shown, key=len)
        return piece

    def _held(self, text: str) -> int:
        """How many characters at the end of ``text`` could begin a stop string."""
        return max((k for s in self._stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def _finish(self) -> str:
        self._ended = True
        if self._tok is not None:
            text = self._tok.decode(self._it.tokens)
            if len(text) > len(self._shown) and text.startswith(self._shown):
                piece, self._shown = text[len(self._shown):], text
                return piece
        raise StopIteration


def _feeds(feeds: Mapping[str, object]) -> dict:
    """The feeds as C-contiguous arrays: ``numpy.ascontiguousarray`` returns an array that
    already is one as it is, so those are read in place."""
    if not isinstance(feeds, Mapping):
        raise TypeError(f"feeds must be a dict of numpy arrays, got {type(feeds).__name__}")
    return {k: np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v for k, v in feeds.items()}
