"""Which PyTorch build `make` installs: the CPU build without an NVIDIA driver, else the newest CUDA build
the driver can run (a plain `pip install torch` brings a CUDA build that an older driver cannot load).

Prints three words for the Makefile: the pip requirement, `--index-url` or `--extra-index-url`, and the
index. Standard library only: it runs before the virtual environment exists.
"""

from __future__ import annotations

import re
import subprocess
import sys

CPU_SPEC = "torch==2.13.0"
PYTORCH_INDEX = "https://download.pytorch.org/whl"
# (lowest driver CUDA version, wheel tag, requirement): PyTorch publishes each release for a few CUDA
# versions; a driver runs builds for its own CUDA version and older ones.
CUDA_BUILDS = (
    ((13, 0), "cu130", "torch>=2.9"),
    ((12, 8), "cu128", "torch>=2.7"),
    ((12, 6), "cu126", "torch>=2.6"),
    ((11, 8), "cu118", "torch>=2.6,<2.8"),
)


def driver_cuda_version(smi_output: str) -> tuple[int, int] | None:
    """The CUDA version the driver supports, from `nvidia-smi`'s banner ("CUDA Version: 12.8")."""
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi_output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def choose(cuda: tuple[int, int] | None) -> tuple[str, str, str]:
    """(requirement, pip index flag, index url) for a driver's CUDA version, or for no GPU."""
    if cuda is None:
        return CPU_SPEC, "--extra-index-url", f"{PYTORCH_INDEX}/cpu"
    for lowest, tag, requirement in CUDA_BUILDS:
        if cuda >= lowest:
            return requirement, "--index-url", f"{PYTORCH_INDEX}/{tag}"
    raise SystemExit(f"tunewiz setup: the NVIDIA driver supports CUDA {cuda[0]}.{cuda[1]}, older than any "
                     "PyTorch build (11.8 or newer is needed). Update the driver, or set TORCH_SPEC and "
                     "TORCH_INDEX to install a build yourself.")


def main() -> None:
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        smi = ""
    print(" ".join(choose(driver_cuda_version(smi))))


if __name__ == "__main__":
    sys.exit(main())
