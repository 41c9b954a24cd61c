"""Print the CPU kernel levels torch can run on this machine, one per line, for `ATEN_CPU_CAPABILITY`.

torch picks its vectorised ATen kernels by CPU (x86: AVX-512 where present, else AVX2, else the baseline), and a
suite that passed at one level has failed at another. `ATEN_CPU_CAPABILITY` forces a level up to what the CPU has;
`make test` runs the equivalence tests once per level printed here, so an AVX2 machine covers two levels and an
AVX-512 one three:

    for level in $(python scripts/kernel_levels.py); do ATEN_CPU_CAPABILITY=$level pytest -m equivalence; done
"""

import argparse
import os
import subprocess
import sys

X86 = ("default", "avx2", "avx512")  # in increasing order; each CPU that runs a level runs the ones before it


def native_level() -> str:
    """torch's own choice on this CPU, read in a child without `ATEN_CPU_CAPABILITY` (set, it is what it reports)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip().lower()


def levels() -> list[str]:
    native = native_level()
    if native in X86:
        return list(X86[: X86.index(native) + 1])
    return ["default"] if native == "default" else ["default", native]  # e.g. aarch64's sve256


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("\n".join(levels()))
