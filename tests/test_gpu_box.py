"""The GPU box's versions: the Dockerfile's vLLM pin and CUDA base image agree with docs/gpu-box.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOC = ROOT / "docs" / "gpu-box.md"


def arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"no ARG {name}=... in {DOCKERFILE}"
    return match.group(1)


def table_row(what: str) -> str:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith(f"| {what} |")]
    assert len(rows) == 1, f"one '| {what} |' row expected in {DOC}"
    return rows[0]


def test_the_pinned_vllm_is_the_documented_one() -> None:
    pin = arg("VLLM_VERSION")
    assert f"**{pin}** pinned" in table_row("vLLM")
    assert f"pip install vllm=={pin}" in DOC.read_text()  # the systemd install line
    assert f"vllm-{pin}-" in table_row("CUDA of the vLLM wheel")


def test_the_base_image_has_the_wheels_cuda() -> None:
    image = arg("CUDA_IMAGE")
    wheel_cuda = re.search(r"\*\*(\d+\.\d+)\*\*", table_row("CUDA of the vLLM wheel"))
    assert wheel_cuda, "the CUDA row names no **major.minor** version"
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:devel|runtime)-ubuntu\d+\.\d+", image)
    assert match, f"unexpected base image {image}"
    assert f"{match.group(1)}.{match.group(2)}" == wheel_cuda.group(1)
    assert f"`{image}`" in table_row("Docker base image")
