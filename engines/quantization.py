"""Whether an engine gets ``--quantization``, and why: vLLM 0.32's rule as a pure function.

The registry's ``quantization`` says how the weights are stored (the planner sizes them from it); the
flag is a different matter. vLLM compares the flag with the checkpoint's own
``quantization_config.quant_method`` and refuses a start where they differ, unless a quantization
class registers the flag as an override of that method
(``vllm/config/model.py``, ``ModelConfig._verify_quantization``: "Quantization method specified in
the model config (...) does not match the quantization method specified in the `quantization`
argument (...)"). So the flag is passed only where vLLM takes it:

* an override vLLM registers for the checkpoint's method: ``awq_marlin`` on an AWQ checkpoint
  (``vllm/model_executor/layers/quantization/auto_awq.py``,
  ``AutoAWQConfig.override_quantization_method``: CUDA only, it returns None on the CPU),
  ``gptq_marlin`` on a GPTQ one (``auto_gptq.py``, ``AutoGPTQConfig.override_quantization_method``);
* online quantization of an unquantized checkpoint: ``fp8`` (``vllm/model_executor/model_loader/
  weight_utils.py``, ``get_quant_config``: ``Fp8Config`` has no config file to find, so vLLM quantizes
  at load, as ``fp8_per_tensor``).

Nothing is passed for a checkpoint that is already quantized in the requested format, or in
compressed-tensors (where many published FP8 checkpoints are): vLLM reads the method from
``config.json`` itself, and ``fp8`` there would be refused. Use::

    d = decide(Quantization.FP8, CheckpointInfo("compressed-tensors", FROM_CONFIG), platform=Platform.CUDA)
    d.flag     # None
    d.reason   # 'compressed-tensors checkpoint (config.json): vLLM reads its method from config.json ...'
    decide_for(registry, spec).flag   # the same for a registry entry (reads a local config.json)
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.checkpoints import read_quant_method
from engines.registry import ModelSpec, Platform, Quantization, Registry, is_local

#: Where the checkpoint's method was learned: its config.json, the registry, or nowhere.
FROM_CONFIG = "config.json"
FROM_REGISTRY = "registry"
UNKNOWN = "unknown"

#: Flags vLLM 0.32 registers as overrides of a checkpoint's method, and on which platforms.
#: ``vllm/model_executor/layers/quantization/auto_awq.py`` ``AutoAWQConfig.override_quantization_method``
#: (returns None when ``current_platform.is_cpu()``); ``auto_gptq.py``
#: ``AutoGPTQConfig.override_quantization_method`` (every platform).
OVERRIDES: dict[Quantization, tuple[str, frozenset[Platform]]] = {
    Quantization.AWQ_MARLIN: ("awq", frozenset({Platform.CUDA})),
    Quantization.GPTQ_MARLIN: ("gptq", frozenset({Platform.CUDA, Platform.CPU})),
}

#: Flags that quantize an unquantized checkpoint while it loads (``weight_utils.get_quant_config``:
#: a class with no config file to read, ``Fp8Config.get_config_filenames`` returns ``[]``). AWQ and
#: GPTQ read ``quant_config.json``/``quantize_config.json`` and fail with "Cannot find the config file".
ONLINE: frozenset[Quantization] = frozenset({Quantization.FP8})

#: Which stored format each checkpoint method is, for the planner's ``quantization`` (None, or absent:
#: any format, as compressed-tensors holds FP8, INT8 and 4-bit schemes alike).
CHECKPOINT_FORMAT: dict[str, frozenset[Quantization] | None] = {
    "awq": frozenset({Quantization.AWQ, Quantization.AWQ_MARLIN}),
    "gptq": frozenset({Quantization.GPTQ, Quantization.GPTQ_MARLIN}),
    "fp8": frozenset({Quantization.FP8}),
    "fbgemm_fp8": frozenset({Quantization.FP8}),
    "modelopt": frozenset({Quantization.FP8}),
    "bitsandbytes": frozenset({Quantization.BITSANDBYTES}),
    "compressed-tensors": None,
}

#: Registry values vLLM 0.32 does not know at all (absent from ``QuantizationMethods`` in
#: ``vllm/model_executor/layers/quantization/__init__.py``): passing them fails "Unknown quantization method".
UNKNOWN_TO_VLLM: frozenset[Quantization] = frozenset({Quantization.BITSANDBYTES})


@dataclass(frozen=True)
class CheckpointInfo:
    """The checkpoint's ``quant_method`` (None: unquantized) and where that was learned."""

    method: str | None
    known_from: str  # FROM_CONFIG, FROM_REGISTRY or UNKNOWN


@dataclass(frozen=True)
class QuantDecision:
    """The ``--quantization`` value an engine gets (None: no flag), the reason, and any registry problem.

    ``problem`` is set where the registry asks for something vLLM cannot do with this checkpoint (the
    engine would not run in the format the plan sized); ``warning`` where the plan may be off.
    """

    flag: str | None
    reason: str
    checkpoint: CheckpointInfo
    problem: str | None = None
    warning: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "flag": self.flag,
            "reason": self.reason,
            "checkpoint_quant_method": self.checkpoint.method or "none",
            "checkpoint_known_from": self.checkpoint.known_from,
        }


def checkpoint_info(registry: Registry, model: ModelSpec) -> CheckpointInfo:
    """A local folder's ``config.json`` (as read when the registry was loaded) first, then the registry's
    ``checkpoint_quant_method``."""
    if is_local(model.source):
        read = registry.local_quant_methods.get(model.source)
        if read is None:  # a spec the registry did not load
            read = read_quant_method(registry.resolve_path(model.source) / "config.json")
        if read.found:
            return CheckpointInfo(read.method, FROM_CONFIG)
    declared = model.checkpoint_quant_method
    if declared is not None:
        return CheckpointInfo(None if declared == "none" else declared, FROM_REGISTRY)
    return CheckpointInfo(None, UNKNOWN)


def decide(requested: Quantization, checkpoint: CheckpointInfo, *, platform: Platform) -> QuantDecision:
    """The ``--quantization`` decision for one engine. Pure: no files, no vLLM."""
    method = checkpoint.method
    where = "its config.json" if checkpoint.known_from == FROM_CONFIG else "declared in the registry"
    if requested is Quantization.NONE:
        if checkpoint.known_from == UNKNOWN:
            return QuantDecision(None, "none asked; a quantized checkpoint's method vLLM reads itself", checkpoint)
        if method is None:
            return QuantDecision(None, f"unquantized checkpoint ({where}), unquantized weights", checkpoint)
        return QuantDecision(
            None,
            f"the checkpoint is {method}-quantized ({where}); vLLM reads that from its config.json",
            checkpoint,
            warning=f"the checkpoint is {method}-quantized but 'quantization' is none, so the plan sizes "
            "its weights at 16 bit; set 'quantization' to its format",
        )
    if requested in UNKNOWN_TO_VLLM:
        return QuantDecision(
            None,
            f"vLLM 0.32 has no '{requested.value}' quantization method; nothing passed",
            checkpoint,
            problem=f"vLLM 0.32 has no '{requested.value}' quantization (it fails 'Unknown quantization "
            "method'); use an AWQ, GPTQ or FP8 checkpoint instead",
        )
    if checkpoint.known_from == UNKNOWN:
        return QuantDecision(
            requested.value,
            "checkpoint format not known (a hub id without 'checkpoint_quant_method'): passed as written; "
            "vLLM refuses it at start if the checkpoint's quant_method differs",
            checkpoint,
            warning="the checkpoint's quant_method is not known offline; set 'checkpoint_quant_method' "
            "(quantization_config.quant_method in its config.json, or none) so the flag is decided",
        )
    if method is None:
        if requested in ONLINE:
            return QuantDecision(
                requested.value,
                f"unquantized checkpoint ({where}): vLLM quantizes it to {requested.value} while loading",
                checkpoint,
            )
        return QuantDecision(
            None,
            f"unquantized checkpoint ({where}): vLLM cannot quantize to {requested.value} at load; nothing passed",
            checkpoint,
            problem=f"'{requested.value}' needs a checkpoint already quantized that way, but this one is "
            f"unquantized ({where}); use such a checkpoint, or quantization: fp8 (online) or none",
        )
    override = OVERRIDES.get(requested)
    if override is not None and override[0] == method:
        if platform in override[1]:
            return QuantDecision(
                requested.value,
                f"{method} checkpoint ({where}): {requested.value} is vLLM's registered override for {method}",
                checkpoint,
            )
        return QuantDecision(
            None,
            f"{method} checkpoint ({where}): {requested.value} is an override only on CUDA; on "
            f"{platform.value} vLLM picks its own {method} kernel",
            checkpoint,
        )
    if method == requested.value:
        return QuantDecision(
            None,
            f"{method} checkpoint ({where}): vLLM reads the method from the checkpoint; no flag needed",
            checkpoint,
        )
    formats = CHECKPOINT_FORMAT.get(method)  # None: a format the planner cannot tell apart
    reason = (
        f"{method} checkpoint ({where}): vLLM reads the method from the checkpoint and refuses "
        f"--quantization {requested.value} there; nothing passed"
    )
    if formats is not None and requested not in formats:
        return QuantDecision(
            None,
            reason,
            checkpoint,
            problem=f"the checkpoint is {method}-quantized ({where}), not {requested.value}; set "
            "'quantization' to the checkpoint's format (the plan sizes the weights from it)",
        )
    return QuantDecision(None, reason, checkpoint)


def decide_for(registry: Registry, model: ModelSpec, *, platform: Platform | None = None) -> QuantDecision:
    """:func:`decide` for a registry entry, reading a local checkpoint's ``config.json``."""
    return decide(
        model.effective_quantization,
        checkpoint_info(registry, model),
        platform=platform or registry.gpu.platform,
    )


def quantization_findings(registry: Registry) -> tuple[list[str], list[str]]:
    """(problems, warnings) in the registry's message style, for ``onecard check``."""
    problems: list[str] = []
    warnings: list[str] = []
    for spec in registry.models:
        d = decide_for(registry, spec)
        where = f"{registry.path}: model {spec.name!r}: field 'quantization'"
        if d.problem:
            problems.append(f"{where}: {d.problem}")
        if d.warning:
            field = "checkpoint_quant_method" if d.checkpoint.known_from == UNKNOWN else "quantization"
            warnings.append(f"{registry.path}: model {spec.name!r}: field '{field}': {d.warning}")
        declared = spec.checkpoint_quant_method
        if (
            declared is not None
            and d.checkpoint.known_from == FROM_CONFIG
            and declared != (d.checkpoint.method or "none")
        ):
            warnings.append(
                f"{registry.path}: model {spec.name!r}: field 'checkpoint_quant_method': "
                f"{spec.checkpoint_quant_method!r} differs from the local config.json "
                f"({d.checkpoint.method or 'none'}), which wins; remove the field or correct it"
            )
    return problems, warnings
