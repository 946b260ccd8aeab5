"""The plan in a person's words: the problems ``onecard check`` adds to validation, and the table of
``onecard plan``.

:func:`check_plan` finds, in the registry's message style, what only the plan can see: a model that can
never fit, pinned models that cannot share the card, an offload the entry does not carry, and the
``--quantization`` findings. :func:`check_registry` runs validation and these together:

    >>> check_registry("no-such-registry.yaml")
    ['no-such-registry.yaml: cannot read the registry (...); pass an existing file']
"""

from __future__ import annotations

from pathlib import Path

from engines.planner import Plan, Verdict, never_fits_fix, plan_registry
from engines.quantization import quantization_findings
from engines.registry import Registry, RegistryError, load_registry, model_architecture


def check_plan(registry: Registry, plan: Plan) -> tuple[list[str], list[str]]:
    """Registry problems only the plan can see, as (problems, warnings) in the registry's message style.

    A model that can never fit and pinned models that cannot share the card are problems; an offload
    the entry does not carry (the plan adds it anyway) is a warning. So are the ``--quantization``
    findings of :func:`engines.quantization.quantization_findings`.
    """
    problems: list[str] = []
    warnings: list[str] = []
    path = registry.path
    for spec in registry.models:
        mp = plan.model(spec.name)
        where = f"{path}: model {spec.name!r}"
        if mp.verdict is Verdict.NEVER_FITS:
            arch = model_architecture(registry, spec)
            field_name, fix = never_fits_fix(spec, arch, usable_gib=plan.usable_gib, platform=plan.platform)
            problems.append(
                f"{where}: field '{field_name}': this model can never fit: KV cache ({mp.kv_gib:.1f} GiB for "
                f"{spec.concurrent_seqs} x {spec.max_model_len} tokens) and runtime "
                f"({mp.overhead_gib:.1f} GiB) alone exceed the {plan.usable_gib:g} GiB usable; {fix}"
            )
        elif mp.verdict is Verdict.NEEDS_OFFLOAD and spec.cpu_offload_gib < mp.offload_gib:
            warnings.append(
                f"{where}: field 'cpu_offload_gib': it does not fit on the card; the plan offloads "
                f"{mp.offload_gib:g} GiB of weights to host RAM; write cpu_offload_gib: {mp.offload_gib:g}"
            )
        elif mp.verdict is Verdict.FITS and spec.cpu_offload_gib > 0:
            warnings.append(f"{where}: field 'cpu_offload_gib': ignored, the model fits without offload; remove it")
    quant_problems, quant_warnings = quantization_findings(registry)
    problems += quant_problems
    warnings += quant_warnings
    pinned = [m.name for m in registry.models if m.pinned]
    if len(pinned) > 1 and not plan.can_coreside(set(pinned)):
        need = sum(plan.model(n).resident_gib for n in pinned)
        problems.append(
            f"{path}: models {', '.join(map(repr, pinned))}: field 'pinned': pinned models must all stay on "
            f"the card, but together they need {need:.1f} GiB of the {plan.usable_gib:g} GiB usable; "
            "unpin some of them"
        )
    elif pinned:
        pinned_gib = sum(plan.model(n).resident_gib for n in pinned)
        shut_out = [
            m.name
            for m in plan.models
            if m.name not in pinned
            and m.verdict is not Verdict.NEVER_FITS
            and not plan.can_coreside(set(pinned) | {m.name})
        ]
        if shut_out:
            warnings.append(
                f"{path}: models {', '.join(map(repr, pinned))}: field 'pinned': pinned models hold "
                f"{pinned_gib:.1f} GiB, so {', '.join(shut_out)} can never be loaded while they stay; "
                "unpin them or lease the card when those models are needed"
            )
    return problems, warnings


def check_registry(path: str | Path, *, budget_gib: float | None = None) -> list[str]:
    """Every problem in a registry file: validation, then what the plan shows; empty when it is fine."""
    try:
        registry = load_registry(path)
    except RegistryError as e:
        return list(e.problems)
    problems, _ = check_plan(registry, plan_registry(registry, budget_gib=budget_gib))
    return problems


def format_plan(plan: Plan) -> str:
    """The human table: per model the parts, total and verdict; then the co-residency sets."""
    head = ("model", "weights", "kv", "overhead", "offload", "total", "verdict")
    rows = [head] + [
        (
            m.name,
            f"{m.weights_gib:.2f}",
            f"{m.kv_gib:.2f}",
            f"{m.overhead_gib:.2f}",
            f"-{m.offload_gib:.2f}" if m.offload_gib else "-",
            f"{m.total_gib:.2f}",
            m.verdict.value,
        )
        for m in plan.models
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    left = {0, len(head) - 1}  # names and verdicts read left to right; numbers align on the right

    def line(cells: tuple[str, ...]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        padded = (c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in pairs)
        return "  ".join(padded).rstrip()

    lines = [
        f"GPU budget {plan.budget_gib:g} GiB, headroom {plan.headroom_gib:g} GiB, "
        f"usable {plan.usable_gib:g} GiB ({plan.platform.value}); figures in GiB",
        "",
        line(head),
        "  ".join("-" * w for w in widths),
    ]
    lines += [line(r) for r in rows[1:]]
    lines.append("")
    lines.append("Can share the card:")
    if plan.co_resident_sets:
        for names in plan.co_resident_sets:
            together = sum(plan.model(n).resident_gib for n in names)
            lines.append(f"  {' + '.join(names)}  ({together:.2f})")
    else:
        lines.append("  (none: every model runs alone)")
    notes = [(m.name, n) for m in plan.models if m.verdict is not Verdict.FITS for n in m.notes[1:]]
    if notes:
        lines.append("")
        lines.append("Notes:")
        lines += [f"  {name}: {n}" for name, n in notes]
    if plan.warnings:
        lines.append("")
        lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
