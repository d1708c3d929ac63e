"""The separate virtual environment that holds TRL, for the benchmarks that compare our loops with it.

TRL is not a dependency of moss-rlhf: the benchmarks run it in a subprocess with ``benchmarks/.venv-trl/bin/python``.
The environment is built once — ``python -m venv``, then the CPU build of torch pinned to the version installed here
(``torch==2.13.0``: a plain ``torch`` or a newer pin would pull a multi-GB CUDA build), then TRL with the transformers
it needs — and reused afterwards. An fcntl lock makes two benchmarks started together build it once, not twice.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

VENV_DIR = Path(__file__).resolve().parent / ".venv-trl"
LOCK_FILE = Path(__file__).resolve().parent / ".venv-trl.lock"
TORCH_PIN = "2.13.0"
TRL_PIN = "1.12.0"


def installed_versions(python: Path) -> dict[str, str]:
    """``{"torch": …, "trl": …, "transformers": …}`` as installed in the environment of ``python`` (missing ones
    absent)."""
    probe = ("import importlib.metadata as m, json\n"
             "out = {}\n"
             "for name in ('torch', 'trl', 'transformers'):\n"
             "    try: out[name] = m.version(name)\n"
             "    except m.PackageNotFoundError: pass\n"
             "print(json.dumps(out))")
    if not python.exists():
        return {}
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return {}
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


def _ready(versions: dict[str, str], trl_version: str) -> bool:
    return versions.get("trl") == trl_version and versions.get("torch", "").split("+")[0] == TORCH_PIN


def ensure_trl_venv(trl_version: str = TRL_PIN, quiet: bool = True) -> Path:
    """The python of ``benchmarks/.venv-trl`` with ``trl==trl_version`` and ``torch==2.13.0`` (CPU); built on first
    use. Raises ``RuntimeError`` with pip's output if the packages cannot be installed."""
    python = VENV_DIR / "bin" / "python"
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_FILE.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the with-block ends: a second caller waits, then finds it built
        if _ready(installed_versions(python), trl_version):
            return python
        if not python.exists():
            print(f"creating {VENV_DIR} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(VENV_DIR)], check=True)
        # One resolver run with torch pinned, so that installing TRL can never swap in another (CUDA) torch build.
        command = [str(python), "-m", "pip", "install", f"torch=={TORCH_PIN}", f"trl=={trl_version}"]
        print(f"installing {' '.join(command[4:])} into {VENV_DIR} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command + (["-q"] if quiet else []), capture_output=True, text=True)
        versions = installed_versions(python)
        if done.returncode != 0 or not _ready(versions, trl_version):
            raise RuntimeError(f"could not install trl=={trl_version} with torch=={TORCH_PIN} into {VENV_DIR} "
                               f"(found {versions}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return python


if __name__ == "__main__":
    path = ensure_trl_venv()
    print(path, installed_versions(path))
