"""Install lm-evaluation-harness in a venv of its own (cached, idempotent, safe to call from several processes).

The lab points lm-eval at onecard (``--model local-completions``); the real-engine tests do the same on the
CPU. lm-eval's pins must not touch the gateway's dependencies, nor vLLM's, so it gets its own venv, the way
``engines/cpu_setup.py`` does it for vLLM::

    from tests.real.lm_eval_env import setup_lm_eval

    lm_eval = setup_lm_eval()   # ~/.cache/onecard/lm-eval/bin/lm_eval (about 1 min and 0.9 GB the first time)

What goes in: ``lm-eval[api]`` (the core plus aiohttp, tenacity, requests, tiktoken for the API models) and
``transformers`` (``tokenizer_backend=huggingface`` loads the model folder's tokenizer with it). No torch: since
0.4.10 lm-eval keeps torch in its ``[hf]`` extra, and ``local-completions`` never imports it. Should a later
release pull it in again, a constraint pins it to ``torch==2.13.0``, the CPU build in the machine's local wheel
folder, so pip never fetches a multi-GB CUDA torch.

At run time set ``OFFLINE_ENV`` (no hub): a task whose ``dataset_path`` is ``json`` with local ``data_files``
needs nothing from the network.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from engines.cpu_setup import _child_env, _locked, _run, default_home

__all__ = ["LM_EVAL_REQUIREMENTS", "LM_EVAL_VERSION", "OFFLINE_ENV", "lm_eval_venv", "setup_lm_eval"]

LM_EVAL_VERSION = "0.4.13"
"""The lm-evaluation-harness release the venv holds (the newest on PyPI in 2026-11)."""

LM_EVAL_REQUIREMENTS: tuple[str, ...] = (f"lm-eval[api]=={LM_EVAL_VERSION}", "transformers>=4.40")
"""What pip installs (one command)."""

TORCH_CONSTRAINT = "torch==2.13.0"
"""Only applies if something asks for torch: then the CPU wheel from the local folder, never a CUDA one."""

OFFLINE_ENV: Mapping[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Environment for running ``lm_eval`` with local tasks and a local tokenizer: nothing from the hub."""

VENV_NAME = "lm-eval"
READY_MARKER = ".onecard-ready"

# Imports what `lm_eval --model local-completions` needs, offline, and prints the versions.
_VERIFY_SNIPPET = (
    "import importlib.metadata as m, importlib.util as u\n"
    "import aiohttp, tenacity, transformers, datasets\n"
    "from lm_eval.models.openai_completions import LocalCompletionsAPI\n"
    "print(m.version('lm_eval'), transformers.__version__, datasets.__version__,"
    " 'torch' if u.find_spec('torch') else 'no-torch')\n"
)


def lm_eval_venv(home: Path | None = None) -> Path:
    """The lm-eval venv's folder under ``home`` (default ``~/.cache/onecard``).

    >>> lm_eval_venv(Path("/tmp/h"))
    PosixPath('/tmp/h/lm-eval')
    """
    return (home if home is not None else default_home()) / VENV_NAME


def _ready(marker: Path, exe: Path) -> bool:
    return marker.is_file() and exe.is_file() and marker.read_text().split()[:1] == [LM_EVAL_VERSION]


def setup_lm_eval(home: Path | None = None, *, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Make sure lm-eval ``LM_EVAL_VERSION`` is installed under ``home`` and return its ``lm_eval`` executable.

    Creates ``home/lm-eval`` with this interpreter's ``python -m venv``, pip-installs ``LM_EVAL_REQUIREMENTS``
    in one command (with ``TORCH_CONSTRAINT``), checks offline that the ``local-completions`` model imports,
    then writes ``home/lm-eval/.onecard-ready`` holding the versions. Once that marker names this version it
    returns at once; another version in it means a reinstall. Concurrent callers serialise on a file lock,
    so only one installs. ``force=True`` deletes the venv first.

    Raises RuntimeError, with the tail of the failing command's output, if any step fails.
    """
    home = (home if home is not None else default_home()).expanduser().absolute()
    venv = lm_eval_venv(home)
    exe = venv / "bin" / "lm_eval"
    marker = venv / READY_MARKER
    if not force and _ready(marker, exe):
        return exe

    with _locked(home / f".{VENV_NAME}.lock"):
        if not force and _ready(marker, exe):  # another process finished meanwhile
            return exe
        started = time.monotonic()
        logfile = home / f"{VENV_NAME}-setup.log"
        logfile.write_text(f"onecard: setting up {venv}\n")
        python = venv / "bin" / "python"
        marker.unlink(missing_ok=True)
        if venv.exists() and (force or not python.exists()):
            log(f"onecard: removing {venv}")
            shutil.rmtree(venv)
        if not venv.exists():
            log(f"onecard: creating venv {venv}")
            _run([sys.executable, "-m", "venv", venv], what="python -m venv", logfile=logfile)

        constraints = home / f"{VENV_NAME}-constraints.txt"
        constraints.write_text(TORCH_CONSTRAINT + "\n")
        log(f"onecard: pip install {' '.join(LM_EVAL_REQUIREMENTS)} (about 1 min and 0.9 GB the first time)")
        _run(
            [python, "-m", "pip", "install", "--disable-pip-version-check", "-c", constraints,
             *LM_EVAL_REQUIREMENTS],
            what=f"pip install {LM_EVAL_REQUIREMENTS[0]}",
            logfile=logfile,
        )

        log("onecard: verifying that lm-eval's local-completions model imports offline")
        out = _run([python, "-c", _VERIFY_SNIPPET], what="lm-eval import check", logfile=logfile,
                   env=_child_env(OFFLINE_ENV))
        versions = out.strip().splitlines()[-1] if out.strip() else ""
        if not versions.startswith(LM_EVAL_VERSION) or not exe.is_file():
            raise RuntimeError(f"lm-eval import check printed {versions!r}; expected {LM_EVAL_VERSION} and {exe}")

        tmp_marker = marker.with_name(f"{READY_MARKER}.tmp")
        tmp_marker.write_text(versions + "\n")
        tmp_marker.replace(marker)
        log(f"onecard: lm-eval ready at {exe} (lm-eval, transformers, datasets, torch: {versions}) "
            f"in {time.monotonic() - started:.0f} s")
        return exe
