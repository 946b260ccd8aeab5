"""What a checkpoint says about its own quantization: ``quantization_config.quant_method`` in ``config.json``.

The registry field ``checkpoint_quant_method`` declares it for hub ids (planning never downloads);
a local folder's ``config.json`` is read instead, e.g. for an FP8 checkpoint::

    read_quant_method(Path("models/llama-fp8/config.json"))
    # CheckpointRead(method='compressed-tensors', found=True)

Either way the name is spelled as vLLM spells it:

    >>> normalize_quant_method("Compressed_Tensors")
    'compressed-tensors'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator

#: ``quant_method`` values a checkpoint's ``config.json`` carries, as vLLM 0.32 names them, plus ``none``
#: for an unquantized (16/32-bit) checkpoint. ``bitsandbytes`` is listed so that such a checkpoint can
#: be declared, and refused with a clear message (vLLM 0.32 has no bitsandbytes method).
QuantMethodName = Literal[
    "none",
    "awq",
    "gptq",
    "fp8",
    "compressed-tensors",
    "bitsandbytes",
    "modelopt",
    "modelopt_fp4",
    "mxfp4",
    "quark",
    "torchao",
    "inc",
    "fbgemm_fp8",
]


def normalize_quant_method(value: Any) -> Any:
    """vLLM's own spelling: lower case, ``compressed_tensors`` written ``compressed-tensors``.

    Mirrors ``vllm/transformers_utils/model_arch_config_convertor.py``,
    ``ModelArchConfigConvertorBase._normalize_quantization_config`` (vLLM 0.32).
    """
    if isinstance(value, str):
        return value.strip().lower().replace("compressed_tensors", "compressed-tensors")
    return value


#: The registry field's type: validated strictly, spelled as vLLM spells it.
CheckpointQuantMethod = Annotated[QuantMethodName, BeforeValidator(normalize_quant_method)]


@dataclass(frozen=True)
class CheckpointRead:
    """The outcome of reading a ``config.json``: ``found`` is False when there is none to read."""

    method: str | None  # None: the checkpoint is not quantized
    found: bool


def read_quant_method(config_path: Path) -> CheckpointRead:
    """The checkpoint's ``quant_method``, read the way vLLM reads it.

    vLLM 0.32 takes ``quantization_config`` (else ``compression_config``, the older compressed-tensors
    key), and for multimodal models the one in ``text_config``:
    ``vllm/transformers_utils/model_arch_config_convertor.py``, ``get_quantization_config`` and
    ``_normalize_quantization_config``.
    """
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return CheckpointRead(method=None, found=False)
    if not isinstance(cfg, dict):
        return CheckpointRead(method=None, found=False)
    quant = _quant_config(cfg)
    if quant is None and isinstance(cfg.get("text_config"), dict):
        quant = _quant_config(cfg["text_config"])
    if quant is None:
        return CheckpointRead(method=None, found=True)
    method = normalize_quant_method(str(quant.get("quant_method", "")))
    return CheckpointRead(method=method or None, found=True)


def _quant_config(cfg: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("quantization_config", "compression_config"):
        value = cfg.get(key)
        if isinstance(value, dict):
            return value
    return None
