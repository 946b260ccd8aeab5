"""Checks that span fields and models, run once the schema has accepted the file.

Duplicate names, adapters on a base without LoRA, LoRA ranks vLLM refuses, local paths that do not
exist, context limits, and vLLM flags in ``extra_args`` that the gateway sets itself::

    >>> MANAGED_FLAGS["--max-model-len"]
    'max_model_len'
    >>> _owner_words(MANAGED_FLAGS["--port"])
    'the gateway (it picks a free port)'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from engines.registry.checkpoint import local_path
from engines.registry.schema import NAME_PATTERN, Architecture, ModelSpec, Quantization, RegistryFile, is_local

#: The LoRA ranks vLLM accepts for ``--max-lora-rank``.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

#: vLLM flags the gateway sets itself, and the registry field (or component) that owns each.
MANAGED_FLAGS: dict[str, str] = {
    "--model": "source",
    "--served-model-name": "name",
    "--revision": "revision",
    "--quantization": "quantization",
    "-q": "quantization",
    "--dtype": "dtype",
    "--kv-cache-dtype": "kv_cache_dtype",
    "--max-model-len": "max_model_len",
    "--cpu-offload-gb": "cpu_offload_gib",
    "--enable-prefix-caching": "enable_prefix_caching",
    "--no-enable-prefix-caching": "enable_prefix_caching",
    "--enable-lora": "lora.enabled",
    "--max-lora-rank": "lora.max_rank",
    "--max-loras": "lora.max_loras",
    "--lora-modules": "lora.adapters",
    "--enable-sleep-mode": "sleep_level",
    "--gpu-memory-utilization": "the planner (gpu.budget_gib, max_model_len, concurrent_seqs)",
    "--kv-cache-memory-bytes": "the planner (max_model_len x concurrent_seqs)",
    "--host": "the gateway",
    "--port": "the gateway (it picks a free port)",
}

def check_semantics(
    path: Path, reg: RegistryFile, local_architectures: Mapping[str, Architecture | None]
) -> tuple[list[str], list[str]]:
    """What spans fields and models; returns (problems, warnings).

    ``local_architectures`` holds, by source, what local checkpoints' ``config.json`` files say.
    """
    problems: list[str] = []
    warnings: list[str] = []
    owner: dict[str, str] = {}

    def claim(name: str, who: str, field: str) -> None:
        if name in owner:
            by = "another model entry" if owner[name] == f"model {who!r}" else owner[name]
            problems.append(
                f"{path}: model {who!r}: field '{field}': the name {name!r} is already used by "
                f"{by}; rename one (every model, alias and adapter name must be unique)"
            )
        else:
            owner[name] = f"model {who!r}" if field == "name" else f"{field} of model {who!r}"

    if not reg.models:
        problems.append(
            f"{path}: top level: field 'models': the list is empty; add at least one model "
            "(see the comments in the shipped model_registry.yaml)"
        )
    for m in reg.models:
        claim(m.name, m.name, "name")
    for m in reg.models:
        for a in m.aliases:
            claim(a, m.name, "aliases")
        for ad in m.lora.adapters:
            if not re.fullmatch(NAME_PATTERN, ad):
                problems.append(
                    f"{path}: model {m.name!r}: field 'lora.adapters': adapter name {ad!r} is not valid; "
                    "use letters, digits and . _ : - (no slashes)"
                )
            claim(ad, m.name, "lora.adapters")

    if reg.gpu.budget_gib != "auto" and reg.gpu.headroom_gib >= reg.gpu.budget_gib:
        problems.append(
            f"{path}: top level: field 'gpu.headroom_gib' ({reg.gpu.headroom_gib}) leaves no room in "
            f"'gpu.budget_gib' ({reg.gpu.budget_gib}); lower the headroom or raise the budget"
        )
    if is_local(reg.vllm.executable) and not local_path(path, reg.vllm.executable).exists():
        warnings.append(
            f"{path}: top level: field 'vllm.executable': {reg.vllm.executable!r} does not exist here; "
            "engines cannot start on this machine until it does (point it at your vLLM venv's bin/vllm)"
        )

    for m in reg.models:
        problems += _check_model(path, m, warnings, local_architectures)
    return problems, warnings


def _check_model(
    path: Path, m: ModelSpec, warnings: list[str], local_architectures: Mapping[str, Architecture | None]
) -> list[str]:
    where = f"{path}: model {m.name!r}"
    problems: list[str] = []
    if m.quantization is Quantization.AWQ:
        warnings.append(
            f"{where}: field 'quantization': 'awq' is planned and launched as 'awq_marlin' "
            "(the legacy AWQ kernel halves throughput on Ada); write awq_marlin to silence this"
        )
    if m.lora.adapters and not m.lora.enabled:
        problems.append(
            f"{where}: field 'lora.adapters': adapters are listed but LoRA is not enabled on this base; "
            "set 'lora.enabled: true'"
        )
    if m.lora.enabled and m.lora.max_rank not in VLLM_LORA_RANKS:
        up = next((r for r in VLLM_LORA_RANKS if r >= m.lora.max_rank), VLLM_LORA_RANKS[-1])
        problems.append(
            f"{where}: field 'lora.max_rank': vLLM does not accept {m.lora.max_rank}; use one of "
            f"{', '.join(map(str, VLLM_LORA_RANKS))} (e.g. {up})"
        )
    for ad_name, adapter in m.lora.adapters.items():
        if adapter.rank is not None and adapter.rank > m.lora.max_rank:
            problems.append(
                f"{where}: field 'lora.adapters.{ad_name}.rank': rank {adapter.rank} is above the base's "
                f"'lora.max_rank' ({m.lora.max_rank}); raise lora.max_rank to at least {adapter.rank}"
            )
        if is_local(adapter.path) and not local_path(path, adapter.path).exists():
            problems.append(
                f"{where}: field 'lora.adapters.{ad_name}.path': {adapter.path!r} does not exist; "
                "fix the path (relative paths start from the registry's folder) or remove the adapter"
            )
    if is_local(m.source) and not local_path(path, m.source).exists():
        problems.append(
            f"{where}: field 'source': local path {m.source!r} does not exist; "
            "fix the path or use a hub id like 'org/model'"
        )
    for i, arg in enumerate(m.extra_args):
        flag = arg.split("=", 1)[0]
        flag = "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag
        if flag in MANAGED_FLAGS:
            problems.append(
                f"{where}: field 'extra_args.{i}': {flag} is set by {_owner_words(MANAGED_FLAGS[flag])}; "
                "remove it from extra_args"
            )
    arch = m.architecture or local_architectures.get(m.source)
    if arch is None and m.params_b is None:
        problems.append(
            f"{where}: field 'architecture': the planner needs the model's figures; add an 'architecture' "
            "block (from its config.json) or 'params_b', or point 'source' at a local folder"
        )
    if arch is None:
        return problems
    limit = arch.max_position_embeddings
    if limit and m.max_model_len > limit:
        problems.append(
            f"{where}: field 'max_model_len': {m.max_model_len} is above the model's limit "
            f"({limit}, architecture.max_position_embeddings); use at most {limit}"
        )
    if arch.num_attention_heads % arch.num_key_value_heads:
        problems.append(
            f"{where}: field 'architecture.num_key_value_heads': {arch.num_key_value_heads} does not "
            f"divide num_attention_heads ({arch.num_attention_heads}); copy both from config.json"
        )
    if arch.head_dim is None and arch.hidden_size % arch.num_attention_heads:
        problems.append(
            f"{where}: field 'architecture.head_dim': hidden_size ({arch.hidden_size}) is not a multiple "
            f"of num_attention_heads ({arch.num_attention_heads}); add head_dim from config.json"
        )
    return problems


def _owner_words(owner: str) -> str:
    return owner if owner.startswith("the ") else f"the field '{owner}'"
