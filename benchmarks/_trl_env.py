"""The separate virtual environments that hold TRL, for the benchmarks that compare our loops with it.

TRL is not a dependency of moss-rlhf: the benchmarks run it in a subprocess with the python of
``benchmarks/.venv-trl-<version>``, one environment per TRL version (trl 1.16 dropped ``trl.experimental.ppo``, so
the PPO benchmark stays on 1.12.0 while the others use 1.16.0). An environment is built once — ``python -m venv``,
then the CPU build of torch pinned to the version installed here (``torch==2.13.0``: a plain ``torch`` or a newer pin
would pull a multi-GB CUDA build) together with TRL and the transformers it needs, in one resolver run — and reused
afterwards. An fcntl lock per environment makes two benchmarks started together build it once, not twice.

    python benchmarks/_trl_env.py [VERSION]    # build (if needed) and print the installed versions
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH_PIN = "2.13.0"
TRL_PIN = "1.16.0"


def venv_dir(trl_version: str = TRL_PIN) -> Path:
    """``benchmarks/.venv-trl-<trl_version>``."""
    return HERE / f".venv-trl-{trl_version}"


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
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ready(versions: dict[str, str], trl_version: str) -> bool:
    return versions.get("trl") == trl_version and versions.get("torch", "").split("+")[0] == TORCH_PIN


def ensure_trl_venv(trl_version: str = TRL_PIN, quiet: bool = True) -> Path:
    """The python of ``benchmarks/.venv-trl-<trl_version>`` with ``trl==trl_version`` and ``torch==2.13.0`` (CPU);
    built on first use. Raises ``RuntimeError`` with pip's output if the packages cannot be installed."""
    venv = venv_dir(trl_version)
    python = venv / "bin" / "python"
    lock_file = venv.with_name(venv.name + ".lock")
    with lock_file.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the with-block ends: a second caller waits, then finds it built
        if _ready(installed_versions(python), trl_version):
            return python
        if not python.exists():
            print(f"creating {venv} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # One resolver run with torch pinned, so that installing TRL can never swap in another (CUDA) torch build.
        command = [str(python), "-m", "pip", "install", f"torch=={TORCH_PIN}", f"trl=={trl_version}"]
        print(f"installing {' '.join(command[4:])} into {venv} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command + (["-q"] if quiet else []), capture_output=True, text=True)
        versions = installed_versions(python)
        if done.returncode != 0 or not _ready(versions, trl_version):
            raise RuntimeError(f"could not install trl=={trl_version} with torch=={TORCH_PIN} into {venv} "
                               f"(found {versions}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return python


if __name__ == "__main__":
    path = ensure_trl_venv(*sys.argv[1:2])
    print(path, installed_versions(path))
