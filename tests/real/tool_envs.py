"""The lab's eval tools, each in a venv of its own (cached under ``~/.cache/onecard/``, built once, reused).

Same pattern as :mod:`tests.real.lm_eval_env`: a file lock so concurrent callers install once, one pip
command (torch, if anything asks for it, pinned to the CPU wheel in the machine's local wheel folder), an
offline import check, and a ready marker naming the version::

    from tests.real.tool_envs import ALPACA_EVAL, LIGHTEVAL, LITELLM_PROXY, setup_tool

    python = setup_tool(ALPACA_EVAL)    # ~/.cache/onecard/alpaca-eval/bin/python
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engines.cpu_setup import _child_env, _locked, _run, default_home
from tests.real.lm_eval_env import OFFLINE_ENV, TORCH_CONSTRAINT

#: Offline, and LiteLLM reads its model cost map from its own package instead of fetching it.
TOOL_ENV = {**OFFLINE_ENV, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

READY_MARKER = ".onecard-ready"


@dataclass(frozen=True)
class Tool:
    venv: str  # folder under ~/.cache/onecard
    version: str  # what the ready marker must start with
    requirements: tuple[str, ...]
    verify: str  # python run offline in the venv; its last line must start with ``version``
    prepare: str = ""  # python run in the venv after the install, before the check


ALPACA_EVAL = Tool(
    "alpaca-eval",
    "0.6.6",
    ("alpaca-eval==0.6.6",),
    "import importlib.metadata as m\nimport alpaca_eval.main, alpaca_eval.decoders.openai\n"
    "print(m.version('alpaca_eval'))\n",
)
LIGHTEVAL = Tool(
    "lighteval",
    "0.13.0",
    # lighteval 0.13.0 sets litellm's disk cache, which litellm releases after 1.80 no longer have, and
    # calls HfApi.list_models(model_name=...) while it lists its tasks, which huggingface_hub 1.0 removed,
    # and hashes str with xxhash, which xxhash 4 refuses.
    ("lighteval[litellm]==0.13.0", "litellm==1.80.0", "huggingface_hub<1.0", "xxhash<4"),
    "import importlib.metadata as m\nimport litellm, lighteval.main_endpoint\n"
    "from lighteval.models.endpoints.litellm_model import LiteLLMClient\nprint(m.version('lighteval'))\n",
    # lighteval imports every built-in task to list them, and tiny_benchmarks then downloads its weights file
    # unless it is there (TinyCorpusAggregator.download): an empty one keeps the import offline; the tiny
    # benchmarks themselves cannot run offline anyway.
    prepare=(
        "import importlib.util, pathlib\n"
        "spec = importlib.util.find_spec('lighteval')\n"
        "(pathlib.Path(spec.origin).parent / 'tasks' / 'tasks' / 'tinyBenchmarks.pkl').touch()\n"
    ),
)
LITELLM_PROXY = Tool(
    "litellm-proxy",
    "proxy",
    ("litellm[proxy]",),
    "import litellm.proxy.proxy_server\nprint('proxy')\n",
)


def setup_tool(tool: Tool, home: Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """Make sure ``tool`` is installed in its venv under ``home`` and return the venv's python."""
    home = (home if home is not None else default_home()).expanduser().absolute()
    venv = home / tool.venv
    python = venv / "bin" / "python"
    marker = venv / READY_MARKER

    def ready() -> bool:
        return marker.is_file() and python.is_file() and marker.read_text().startswith(tool.version)

    if ready():
        return python
    with _locked(home / f".{tool.venv}.lock"):
        if ready():
            return python
        started = time.monotonic()
        logfile = home / f"{tool.venv}-setup.log"
        logfile.write_text(f"onecard: setting up {venv}\n")
        marker.unlink(missing_ok=True)
        if venv.exists() and not python.exists():
            shutil.rmtree(venv)
        if not venv.exists():
            _run([sys.executable, "-m", "venv", venv], what="python -m venv", logfile=logfile)
        constraints = home / f"{tool.venv}-constraints.txt"
        constraints.write_text(TORCH_CONSTRAINT + "\n")
        log(f"onecard: pip install {' '.join(tool.requirements)} into {venv}")
        _run(
            [python, "-m", "pip", "install", "--disable-pip-version-check", "-c", constraints, *tool.requirements],
            what=f"pip install {tool.requirements[0]}",
            logfile=logfile,
        )
        # Run in the venv's folder: some tools write caches into the working directory on import.
        in_venv = f"import os\nos.chdir({str(venv)!r})\n"
        if tool.prepare:
            _run([python, "-c", in_venv + tool.prepare], what=f"{tool.venv} preparation", logfile=logfile)
        out = _run(
            [python, "-c", in_venv + tool.verify],
            what=f"{tool.venv} import check",
            logfile=logfile,
            env=_child_env(TOOL_ENV),
        )
        version = out.strip().splitlines()[-1] if out.strip() else ""
        if not version.startswith(tool.version):
            raise RuntimeError(f"{tool.venv} import check printed {version!r}; expected {tool.version}")
        marker.write_text(version + "\n")
        log(f"onecard: {tool.venv} ready at {venv} in {time.monotonic() - started:.0f} s")
        return python
