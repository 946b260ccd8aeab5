"""Load and validate ``model_registry.yaml`` into frozen, typed specs.

The registry is the one file a lab edits. Every problem in it is reported as a
:class:`RegistryError` whose message names the file, the model, the field and the fix:

    >>> from pathlib import Path
    >>> root = Path(__file__).resolve().parents[2]     # the repository, which ships a model_registry.yaml
    >>> reg = load_registry(root / "model_registry.yaml")
    >>> reg.resolve("judge").model.name
    'llama-3.1-70b-awq'
    >>> load_registry(root / "missing.yaml")
    Traceback (most recent call last):
    ...
    engines.registry.wording.RegistryError: .../missing.yaml: cannot read the registry ...; pass an existing file

Validation happens in three passes, each reporting every problem it finds:

1. YAML (:mod:`engines.registry.loading`): syntax, and a key given twice in one mapping (plain YAML
   silently keeps the last);
2. pydantic (:mod:`engines.registry.schema`): shapes and types; unknown keys are errors with a "did you
   mean", and :func:`engines.registry.wording.explain_all` folds pydantic's raw errors into one message
   per mistake;
3. :func:`engines.registry.checks.check_semantics`: what spans fields and models (duplicate names,
   adapters on a base without LoRA, ranks, local paths, context limits, vLLM flags the gateway sets
   itself).

A local checkpoint's ``config.json`` supplies the architecture a model does not declare; it is read
once, at load (:mod:`engines.registry.checkpoint`), and planning uses what was read.

Whether each model can fit on the card is the planner's question: ``engines.plan_text.check_plan``
adds those problems (``onecard check`` runs both).
"""

from engines.registry.checkpoint import architecture_from_config, model_architecture
from engines.registry.checks import MANAGED_FLAGS, VLLM_LORA_RANKS
from engines.registry.loading import load_registry, parse_registry
from engines.registry.schema import (
    NAME_PATTERN,
    AdapterSpec,
    Architecture,
    GpuSpec,
    LoraSpec,
    ModelSpec,
    Platform,
    Quantization,
    Registry,
    RegistryFile,
    SchedulerSpec,
    Target,
    VllmSpec,
    is_local,
)
from engines.registry.wording import RegistryError

__all__ = [
    "MANAGED_FLAGS",
    "NAME_PATTERN",
    "VLLM_LORA_RANKS",
    "AdapterSpec",
    "Architecture",
    "GpuSpec",
    "LoraSpec",
    "ModelSpec",
    "Platform",
    "Quantization",
    "Registry",
    "RegistryError",
    "RegistryFile",
    "SchedulerSpec",
    "Target",
    "VllmSpec",
    "architecture_from_config",
    "is_local",
    "load_registry",
    "model_architecture",
    "parse_registry",
]
