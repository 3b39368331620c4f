import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union, overload

import numpy as np

class KilnError(Exception): ...
class CompileError(KilnError): ...
class ArtifactError(KilnError): ...
class RunError(KilnError): ...

@dataclass(frozen=True)
class Port:
    name: str
    dtype: str
    shape: Tuple[Union[int, str], ...]
    bounds: Dict[str, int]

def compile(
    spec: Union[str, os.PathLike],
    *,
    weights: Optional[Union[str, os.PathLike]] = ...,
    output: Optional[Union[str, os.PathLike]] = ...,
    target: str = ...,
    cpu: str = ...,
    opt_level: int = ...,
    quantize: Optional[str] = ...,
    calib: Optional[Union[str, os.PathLike]] = ...,
    sparsity: Optional[str] = ...,
    generate: bool = ...,
    set: Optional[Mapping[str, object]] = ...,
    random_weights: Optional[int] = ...,
    tokenizer: Optional[Union[str, os.PathLike]] = ...,
) -> Path: ...

class Model:
    inputs: List[Port]
    outputs: List[Port]
    def __init__(self, path: Union[str, os.PathLike], threads: Optional[int] = ...) -> None: ...
    @overload
    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]: ...
    @overload
    def run(self, output_names: Optional[Sequence[str]], feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]: ...
    @property
    def is_decoder(self) -> bool: ...
    @property
    def level(self) -> str: ...
    @property
    def has_tokenizer(self) -> bool: ...
    @overload
    def embed(self, texts: str, normalize: bool = ...) -> np.ndarray: ...
    @overload
    def embed(self, texts: Sequence[str], normalize: bool = ...) -> np.ndarray: ...
    def generate(
        self,
        prompt: Union[str, Sequence[int], np.ndarray],
        max_new_tokens: int = ...,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        seed: int = ...,
        stop: Union[None, int, str, Sequence[Union[int, str]]] = ...,
    ) -> Generation: ...

class Generation:
    @property
    def tokens(self) -> List[int]: ...
    @property
    def text(self) -> str: ...
    def __iter__(self) -> Iterator[Union[str, int]]: ...
    def __next__(self) -> Union[str, int]: ...
