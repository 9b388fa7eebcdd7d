"""Prepare what the GPU check carries to the GPU machine (``make gpu-prep`` runs this).

    python3 benchmarks/gpu_prep.py [--shared-data ../shared/data]

The GPU machine cannot reach a package index, and its Python (3.12, torch 2.11, torchvision
0.26, timm, peft, transformers, ...) lacks three packages harma needs: open_clip_torch and,
under it, ftfy and wcwidth. This writes, into folders that git ignores (``.gitignore``) and that
``benchmarks/device_carry.txt`` lists:

- ``.gpu_wheels/``: one pure-Python wheel of each (``py3-none-any``, so the same file installs
  on the device's Python 3.12 and here), at the versions below, and nothing else;
- ``.gpu_data/rsitmd/``: the RSITMD annotation files the rehearsal trains on, copied from the
  project's shared data folder (``--shared-data``, default ``../shared/data`` beside the
  repository; the folder does not travel to the device).

Wheels already in place are kept; a run with nothing to fetch needs no network.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPOSITORY / ".gpu_wheels"
DATA = REPOSITORY / ".gpu_data"
# open_clip 3.3 needs torch>=2.0 and timm>=1.0.17 (the device has both); all three are pure Python.
WHEELS = {"open_clip_torch": "3.3.0", "ftfy": "6.3.1", "wcwidth": "0.9.5"}
ANNOTATIONS = ("rsitmd/rsitmd_train.json", "rsitmd/rsitmd_val.json", "rsitmd/rsitmd_test.json")


def wheel_file(name: str, version: str) -> str:
    return f"{name.replace('-', '_')}-{version}-"


def fetch_wheels() -> list[Path]:
    """The wheelhouse: exactly one wheel per package of ``WHEELS``; stale files removed."""
    WHEELHOUSE.mkdir(exist_ok=True)
    wanted = []
    for name, version in WHEELS.items():
        present = [p for p in WHEELHOUSE.glob("*.whl") if p.name.startswith(wheel_file(name, version))]
        if not present:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                       "--python-version", "3.12", "--implementation", "py", "--abi", "none", "--platform", "any",
                       "--dest", str(WHEELHOUSE), f"{name}=={version}"]
            if subprocess.run(command).returncode != 0:
                raise SystemExit(f"error: pip could not download a pure-Python wheel of {name}=={version}")
            present = [p for p in WHEELHOUSE.glob("*.whl") if p.name.startswith(wheel_file(name, version))]
        if len(present) != 1 or not present[0].name.endswith("-none-any.whl"):
            raise SystemExit(f"error: expected one pure-Python wheel of {name}=={version} in {WHEELHOUSE}, "
                             f"found {[p.name for p in present]}")
        wanted.append(present[0])
    for stale in set(WHEELHOUSE.iterdir()) - set(wanted):  # two versions of one package stop the install
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    return wanted


def copy_annotations(shared_data: Path) -> list[Path]:
    """The RSITMD annotation files, copied from ``shared_data`` into ``.gpu_data``."""
    missing = [name for name in ANNOTATIONS if not (shared_data / name).is_file()]
    if missing:
        raise SystemExit(f"error: the shared data folder {shared_data} lacks {', '.join(missing)}; give the "
                         "folder holding rsitmd/ (make gpu-prep SHARED_DATA=/path/to/shared/data)")
    copied = []
    for name in ANNOTATIONS:
        target = DATA / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / name, target)
        copied.append(target)
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared-data", default=str(REPOSITORY.parent / "shared" / "data"),
                        help="the project's shared data folder, holding rsitmd/ (default: ../shared/data)")
    args = parser.parse_args(argv)
    files = [*fetch_wheels(), *copy_annotations(Path(args.shared_data).resolve())]
    size = sum(path.stat().st_size for path in files)
    print(f"gpu-prep: {len(files)} files, {size / 2**20:.1f} MiB, in {WHEELHOUSE.name}/ and {DATA.name}/: "
          + ", ".join(str(path.relative_to(REPOSITORY)) for path in files))


if __name__ == "__main__":
    main()
