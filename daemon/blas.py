"""Linux only: run MLX's CPU matmuls on the system OpenBLAS when it is installed.

The mlx[cpu] wheel bundles a reference BLAS that is ~35x slower. A library can only be
preloaded before the process starts, so the CLI re-executes itself once with LD_PRELOAD
set. KVTIER_NO_OPENBLAS=1 turns this off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


def openblas_path() -> str | None:
    return next((p for p in CANDIDATES if Path(p).exists()), None)


def with_openblas(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` that preloads OpenBLAS, when this is Linux and it is installed."""
    env = dict(env)
    library = openblas_path()
    if sys.platform.startswith("linux") and library and env.get("KVTIER_NO_OPENBLAS") != "1":
        preload = env.get("LD_PRELOAD", "")
        if "openblas" not in preload:
            env["LD_PRELOAD"] = f"{library} {preload}".strip()
    return env


def reexec_with_openblas() -> None:
    """Re-run this very command with OpenBLAS preloaded, unless it already is."""
    env = with_openblas(os.environ)
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD") and "KVTIER_REEXEC" not in os.environ:
        env["KVTIER_REEXEC"] = "1"
        # Run the same entry point again: `-m daemon.cli`, or the `kvtier` script itself
        # (which keeps the process's recognisable name).
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        entry = ["-m", spec.name] if spec and spec.name else [sys.argv[0]]
        try:
            os.execve(sys.executable, [sys.executable, *entry, *sys.argv[1:]], env)
        except OSError as exc:  # this user may not run the interpreter by its path: go on as is
            print(f"kvtier: could not restart with OpenBLAS ({exc.strerror}); MLX uses its bundled "
                  "BLAS, whose cache entries a daemon on OpenBLAS does not reuse", file=sys.stderr)
