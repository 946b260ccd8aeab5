"""Registry validation: every bad input gets one message naming the file, the model, the field and the fix."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from engines.plan_text import check_registry
from engines.planner import plan_registry
from engines.registry import (
    Architecture,
    Quantization,
    RegistryError,
    checkpoint,
    load_registry,
    model_architecture,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "model_registry.yaml"

SMALL_ARCH = (
    "{num_hidden_layers: 2, hidden_size: 256, intermediate_size: 512, num_attention_heads: 4, "
    "num_key_value_heads: 2, vocab_size: 1000, max_position_embeddings: 8192}"
)


def model(name: str = "small", extra: str = "", *, arch: str = SMALL_ARCH, source: str = "org/small") -> str:
    """One model entry, indented to sit under ``models:``; ``extra`` is added YAML for that entry."""
    lines = [f"- name: {name}", f"  source: {source}", "  max_model_len: 4096"]
    if arch:
        lines.append(f"  architecture: {arch}")
    lines += ["  " + line for line in textwrap.dedent(extra).strip("\n").splitlines()]
    return textwrap.indent("\n".join(lines), "  ") + "\n"


def registry(*models: str, top: str = "") -> str:
    return textwrap.dedent(top).strip("\n") + "\nmodels:\n" + "".join(models)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "reg.yaml"
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    return info.value.problems


# Each case: a registry text with one mistake, and what its one message must say besides the file name.
BAD: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "unknown key (typo)",
        registry(model("small", "max_model_length: 4096")),
        ("model 'small'", "unknown key 'max_model_length'", "did you mean 'max_model_len'?"),
    ),
    (
        "unknown key in a nested block",
        registry(
            model(
                "small",
                arch="{num_hidden_layers: 2, hidden_size: 256, intermediate_size: 512, "
                "num_attention_heads: 4, num_kv_heads: 2, vocab_size: 1000}",
            )
        ),
        ("model 'small'", "'architecture.num_kv_heads'", "did you mean 'num_key_value_heads'?"),
    ),
    (
        "unknown top-level key",
        registry(model(), top="gpus: {budget_gib: 24}"),
        ("top level", "unknown key 'gpus'", "did you mean 'gpu'?"),
    ),
    (
        "key in the wrong block",
        registry(model("small", "head_dim: 64")),
        ("model 'small'", "unknown key 'head_dim'", "move it", "'architecture:'"),
    ),
    (
        "wrong type: number",
        registry(model("small").replace("max_model_len: 4096", "max_model_len: lots")),
        ("model 'small'", "field 'max_model_len'", "(got 'lots')", "write the context length in tokens"),
    ),
    (
        "wrong type: list",
        registry(model("small", "aliases: judge")),
        ("model 'small'", "field 'aliases'", "expected a list", "write a list of names"),
    ),
    (
        "wrong type: adapter as a string",
        registry(model("small", "lora: {enabled: true, adapters: {small-r8: org/small-r8}}")),
        ("model 'small'", "field 'lora.adapters.small-r8'", "expected a mapping",
         "{path: org/small-r8, rank: 16}"),
    ),
    (
        "duplicate model name",
        registry(model("small"), model("small")),
        ("model 'small'", "field 'name'", "already used by another model entry", "rename one"),
    ),
    (
        "duplicate alias across models",
        registry(model("a", "aliases: [judge]"), model("b", "aliases: [judge]")),
        ("model 'b'", "field 'aliases'", "'judge' is already used by aliases of model 'a'", "rename one"),
    ),
    (
        "adapter named like a model",
        registry(
            model("a"),
            model("b", "lora: {enabled: true, adapters: {a: {path: org/a-lora}}}"),
        ),
        ("model 'b'", "field 'lora.adapters'", "'a' is already used by model 'a'", "rename one"),
    ),
    (
        "adapter whose base has no LoRA",
        registry(model("small", "lora: {adapters: {small-r8: {path: org/small-r8}}}")),
        ("model 'small'", "field 'lora.adapters'", "LoRA is not enabled", "set 'lora.enabled: true'"),
    ),
    (
        "adapter rank above max rank",
        registry(model("s", "lora: {enabled: true, max_rank: 8, adapters: {s-r16: {path: o/s, rank: 16}}}")),
        ("model 's'", "field 'lora.adapters.s-r16.rank'", "above the base's 'lora.max_rank' (8)",
         "raise lora.max_rank to at least 16"),
    ),
    (
        "max rank vLLM refuses",
        registry(model("small", "lora: {enabled: true, max_rank: 12}")),
        ("model 'small'", "field 'lora.max_rank'", "vLLM does not accept 12", "(e.g. 16)"),
    ),
    (
        "missing local adapter path",
        registry(model("small", "lora: {enabled: true, adapters: {s-r8: {path: ./adapters/nope}}}")),
        ("model 'small'", "field 'lora.adapters.s-r8.path'", "'./adapters/nope' does not exist",
         "fix the path"),
    ),
    (
        "missing local source",
        registry(model("small", source="./weights/small", arch=SMALL_ARCH)),
        ("model 'small'", "field 'source'", "'./weights/small' does not exist", "use a hub id"),
    ),
    (
        "context above the model's limit",
        registry(model("small").replace("max_model_len: 4096", "max_model_len: 16384")),
        ("model 'small'", "field 'max_model_len'", "above the model's limit (8192", "use at most 8192"),
    ),
    (
        "unknown quantization",
        registry(model("small", "quantization: awq-marlin")),
        ("model 'small'", "field 'quantization'", "'awq-marlin'", "did you mean 'awq_marlin'?", "use one of"),
    ),
    (
        "unknown kv cache dtype",
        registry(model("small", "kv_cache_dtype: int8")),
        ("model 'small'", "field 'kv_cache_dtype'", "'int8'", "use one of 'auto', 'fp8'"),
    ),
    (
        "budget not positive",
        registry(model(), top="gpu: {budget_gib: 0}"),
        ("top level", "field 'gpu.budget_gib'", "greater than 0",
         "use a positive number of GiB (e.g. 24) or 'auto'"),
    ),
    (
        "headroom eats the budget",
        registry(model(), top="gpu: {budget_gib: 8, headroom_gib: 8}"),
        ("top level", "field 'gpu.headroom_gib'", "leaves no room", "lower the headroom or raise the budget"),
    ),
    (
        "empty models list",
        "gpu: {budget_gib: 24}\nmodels: []\n",
        ("top level", "field 'models'", "the list is empty", "add at least one model"),
    ),
    (
        "models written as a mapping",
        "models:\n  small: {source: org/small, max_model_len: 4096}\n",
        ("top level", "field 'models'", "expected a list", "each starting with '- name: ...'"),
    ),
    (
        "entry that is not a mapping",
        "models:\n  - small\n",
        ("model #1", "the entry is not a mapping (got 'small')", "write keys like 'name:'"),
    ),
    (
        "required fields missing",
        registry(model("small", arch="{num_hidden_layers: 2, hidden_size: 256}")),
        ("model 'small'", "field 'architecture' is missing intermediate_size, num_attention_heads",
         "copy them from the model's config.json"),
    ),
    (
        "no figures to plan with",
        registry(model("small", arch="")),
        ("model 'small'", "field 'architecture'", "the planner needs the model's figures",
         "add an 'architecture'"),
    ),
    (
        "KV heads that do not divide heads",
        registry(
            model(
                "small",
                arch="{num_hidden_layers: 2, hidden_size: 256, intermediate_size: 512, "
                "num_attention_heads: 4, num_key_value_heads: 3, vocab_size: 1000}",
            )
        ),
        ("model 'small'", "field 'architecture.num_key_value_heads'", "does not divide", "copy both"),
    ),
    (
        "flag the gateway sets",
        registry(model("small", "extra_args: ['--max-model-len=8192']")),
        ("model 'small'", "field 'extra_args.0'", "--max-model-len is set by the field 'max_model_len'",
         "remove it from extra_args"),
    ),
    (
        "key given twice",
        registry(model("small", "max_model_len: 2048")),
        ("model 'small'", "field 'max_model_len' is given twice", "keep one"),
    ),
    (
        "invalid YAML",
        "models:\n  - name: small\n   source: org/small\n",
        ("not valid YAML at line", "fix the syntax"),
    ),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=i) for i, t, e in BAD])
def test_bad_registry_gets_one_precise_message(tmp_path: Path, text: str, expected: tuple[str, ...]) -> None:
    path = write(tmp_path, text)
    found = problems(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: "), found[0]
    for part in expected:
        assert part in found[0], (part, found[0])


def test_bad_cases_are_distinct() -> None:
    assert len({text for _, text, _ in BAD}) == len(BAD) >= 15


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = registry(
        model("a", "quantization: int4"),
        model("a", "lora: {adapters: {x: {path: org/x}}}"),
        top="gpu: {budget_gib: -2}",
    )
    found = problems(write(tmp_path, text))
    assert len(found) == 2  # the shape errors come first; semantics only run on a well-formed file
    assert any("gpu.budget_gib" in p for p in found)
    assert any("field 'quantization'" in p for p in found)

    text = registry(model("a"), model("a", "lora: {adapters: {x: {path: org/x}}}"))
    found = problems(write(tmp_path, text))
    assert [("field 'name'" in p, "lora.enabled" in p) for p in found] == [(True, False), (False, True)]


def test_missing_file_names_it(tmp_path: Path) -> None:
    found = problems(tmp_path / "absent.yaml")
    assert found == [f"{tmp_path / 'absent.yaml'}: cannot read the registry (No such file or directory); "
                     "pass an existing file"]


def test_never_fits_is_a_check_error(tmp_path: Path) -> None:
    # 2 layers x 2 KV heads x 64 head_dim x 2 bytes x 2 (K and V) = 1 KiB per token; 4096 x 8192 seqs = 32 GiB
    path = write(tmp_path, registry(model("small", "concurrent_seqs: 8192")))
    load_registry(path)  # well-formed: only the plan shows the problem
    found = check_registry(path)
    assert len(found) == 1, found
    for part in (str(path.resolve()), "model 'small'", "field 'max_model_len'", "can never fit",
                 "lower max_model_len to at most 2560 or lower concurrent_seqs"):
        assert part in found[0], (part, found[0])


def test_pinned_models_that_cannot_share_is_a_check_error(tmp_path: Path) -> None:
    # each: 1 KiB/token x 4096 x 3072 seqs = 12 GiB KV + 1.5 GiB runtime; two need 27 of the 23 GiB usable
    pinned = "concurrent_seqs: 3072\npinned: true"
    text = registry(model("a", pinned), model("b", pinned))
    found = check_registry(write(tmp_path, text))
    assert len(found) == 1, found
    assert "models 'a', 'b': field 'pinned'" in found[0] and "unpin some of them" in found[0]


def test_awq_is_accepted_with_a_warning_and_planned_as_marlin(tmp_path: Path) -> None:
    path = write(tmp_path, registry(model("small", "quantization: AWQ")))
    reg = load_registry(path)
    spec = reg.model("small")
    assert spec.quantization is Quantization.AWQ
    assert spec.effective_quantization is Quantization.AWQ_MARLIN
    assert len(reg.warnings) == 1
    assert "model 'small'" in reg.warnings[0] and "'awq_marlin'" in reg.warnings[0]
    assert reg.warnings[0] in plan_registry(reg).warnings


def test_hub_ids_are_not_checked_but_local_paths_are(tmp_path: Path) -> None:
    (tmp_path / "adapters" / "mine").mkdir(parents=True)
    text = registry(
        model(
            "small",
            "lora:\n  enabled: true\n  adapters:\n    hub-r8: {path: org/some-lora, rank: 8}\n"
            "    local-r8: {path: ./adapters/mine, rank: 8}",
        )
    )
    reg = load_registry(write(tmp_path, text))
    assert set(reg.model("small").lora.adapters) == {"hub-r8", "local-r8"}
    assert reg.resolve("local-r8").served_name == "local-r8"
    assert reg.resolve_path("./adapters/mine") == tmp_path.resolve() / "adapters" / "mine"


def test_local_config_json_supplies_the_architecture(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    config = {
        "num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 2048,
        "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    entry = model("small", source="./weights", arch="")
    short = entry.replace("max_model_len: 4096", "max_model_len: 2048")
    reg = load_registry(write(tmp_path, registry(short)))
    arch = model_architecture(reg, reg.model("small"))
    assert arch is not None and arch.num_key_value_heads == 2 and arch.kv_head_dim == 64
    # its limits are enforced like declared ones
    found = problems(write(tmp_path, registry(entry)))
    assert len(found) == 1 and "field 'max_model_len': 4096 is above the model's limit (2048" in found[0]


def test_config_json_is_read_once_at_load_and_replanning_reuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    config = {
        "num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 8192,
    }
    (folder / "config.json").write_text(json.dumps(config))
    declared = model("declared", source="./weights")  # its own architecture wins over config.json
    text = registry(model("local", source="./weights", arch=""), declared)
    reads: list[Path] = []
    real = checkpoint.architecture_from_config

    def counting(config_path: Path) -> Architecture | None:
        reads.append(config_path)
        return real(config_path)

    monkeypatch.setattr(checkpoint, "architecture_from_config", counting)
    reg = load_registry(write(tmp_path, text))
    assert reads == [tmp_path / "weights" / "config.json"]
    first = plan_registry(reg)
    (folder / "config.json").unlink()  # re-planning (after each load measurement) must not need the file
    second = plan_registry(reg, measured_gib={"local": 1.0})
    assert reads == [tmp_path / "weights" / "config.json"]
    assert first.model("local").kv_cache_bytes == second.model("local").kv_cache_bytes > 0
    assert first.model("local").notes == second.model("local").notes
    arch = model_architecture(reg, reg.model("local"))
    assert arch is not None and arch.vocab_size == 1000
    assert model_architecture(reg, reg.model("declared")) == reg.model("declared").architecture


def test_shipped_registry_loads_cleanly() -> None:
    reg = load_registry(SHIPPED)
    assert reg.warnings == ()
    assert len(reg.models) == 8
    assert reg.resolve("judge").model.name == "llama-3.1-70b-awq"
    assert reg.resolve("candidate").model.name == "llama-3.1-8b-fp8"
    assert reg.resolve("workhorse").model.name == "qwen2.5-14b-awq"
    for base in ("llama-3.1-8b-fp8", "qwen2.5-14b-awq"):
        lora = reg.model(base).lora
        assert lora.enabled and lora.adapters
        assert all(a.rank is not None and a.rank <= lora.max_rank for a in lora.adapters.values())
    assert reg.model("llama-3.1-70b-awq").cpu_offload_gib > 0
    nemo = reg.model("mistral-nemo-12b-fp8").architecture
    assert nemo is not None and nemo.kv_head_dim == 128
    assert reg.vllm.executable == "vllm"
    assert check_registry(SHIPPED) == []
