"""Rehearse the GPU check here, shaped like the GPU machine, before a GPU is ever used.

    python3 benchmarks/gpu_dry_run.py                        # from the repository root
    python3 benchmarks/gpu_dry_run.py --venv /tmp/device-venv --shared-data /work/shared/data

What the device gives the check, and what this builds in its place:

1. the preparation step, as ``make gpu-prep`` runs it (``benchmarks/gpu_prep.py``): the
   wheelhouse of the packages the device lacks and the annotation files, in ignored folders;
2. the device's Python packages and nothing else: a virtual environment at ``--venv`` (outside
   the repository; reused when it was built from the same list) from
   ``benchmarks/device_requirements.txt``, torch 2.11 from the package index, with Python 3.12
   where this machine has one; it must lack open_clip, ftfy and wcwidth;
3. the working tree as it travels: the tracked and untracked-not-ignored files (``git ls-files
   --cached --others --exclude-standard``) plus the folders of ``benchmarks/device_carry.txt``,
   copied into a fresh folder whose parent holds no ``shared/``;
4. no network: a network namespace with only the loopback interface (``unshare -n``; torchrun
   needs loopback), ``python3`` on the PATH being the environment's, no user site-packages;
5. the device command itself, ``bash benchmarks/gpu_check.sh --cpu-smoke`` with ``$OUT`` set,
   then the rules on what comes back: at most 8 files, at most 2 folders deep, names of letters,
   digits, ``.``, ``_`` and ``-``, 16 MiB each, 64 MiB together, ``gpu_check.json`` among them.

Exits 0 when the check passed and what comes back keeps the rules; prints a summary either way.
Only the standard library is used here: the script runs before anything is installed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPOSITORY / "benchmarks" / "device_requirements.txt"
CARRY = REPOSITORY / "benchmarks" / "device_carry.txt"
ABSENT_ON_DEVICE = ("open_clip", "ftfy", "wcwidth")
MAX_FILES, MAX_FILE_BYTES, MAX_TOTAL_BYTES, MAX_DEPTH = 8, 16 * 2**20, 64 * 2**20, 2
ALLOWED_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def find_python(requested: str | None) -> tuple[str, str]:
    """An interpreter for the environment: ``requested``, else a Python 3.12 (the device's), else
    this one; its path and version."""
    candidates = [requested] if requested else [
        shutil.which("python3.12"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))),
        sys.executable]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version.split()[0])"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return candidate, probe.stdout.strip()
    raise SystemExit(f"error: no usable Python among {candidates}")


def build_environment(venv: Path, python: str) -> None:
    """A virtual environment of exactly the device's package list, reused when its stamp says it
    was built from the same list by the same interpreter."""
    stamp_text = f"{python}\n{REQUIREMENTS.read_text(encoding='utf-8')}"
    stamp = venv / "harma-device-stamp.txt"
    if stamp.exists() and stamp.read_text(encoding="utf-8") == stamp_text:
        print(f"[dry run] reusing the environment {venv}")
        return
    if venv.exists():
        shutil.rmtree(venv)
    print(f"[dry run] building the environment {venv} from {REQUIREMENTS.name} (torch is several GB)", flush=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(stamp_text, encoding="utf-8")


def check_environment(venv: Path) -> str:
    """The environment's torch version; fails when it holds a package the device lacks."""
    code = ("import importlib.util, json, torch; print(json.dumps({'torch': torch.__version__, 'present': "
            f"[n for n in {list(ABSENT_ON_DEVICE)!r} if importlib.util.find_spec(n)]}}))")
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONNOUSERSITE": "1", "PYTHONPATH": ""})
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    if found["present"]:
        raise SystemExit(f"error: {venv} holds {found['present']}, which the device lacks; delete it")
    return found["torch"]


def carried_paths() -> list[str]:
    return [line.strip() for line in CARRY.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def copy_as_it_travels(destination: Path) -> int:
    """Copy the tracked and untracked-not-ignored files and the carried folders; bytes copied."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPOSITORY, capture_output=True, check=True).stdout.decode().split("\0")
    files = [REPOSITORY / name for name in listed if name and (REPOSITORY / name).is_file()]
    for carried in carried_paths():
        source = REPOSITORY / carried
        if not source.is_dir():
            raise SystemExit(f"error: {carried} (benchmarks/device_carry.txt) is missing; run make gpu-prep")
        files += [path for path in sorted(source.rglob("*")) if path.is_file()]
    total = 0
    for path in files:
        target = destination / path.relative_to(REPOSITORY)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        total += path.stat().st_size
    return total


def isolation() -> tuple[list[str], str]:
    """The command prefix that takes the network away (keeping loopback) and what it does."""
    if shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True)
        if probe.returncode == 0:
            return (["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"],
                    "network namespace with loopback only (unshare -n)")
    return [], "NOT isolated (no network namespace here): proxies point nowhere, pip has no index"


def returned_files(out: Path) -> tuple[list[dict], list[str]]:
    """What would come back from ``out`` and every broken rule on it."""
    files, problems = [], []
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if not ALLOWED_NAME.match(path.name):
            problems.append(f"{relative}: name outside letters, digits, '.', '_', '-'")
        if path.is_symlink() or (not path.is_file() and not path.is_dir()):
            problems.append(f"{relative}: not a plain file")
        if path.is_file():
            if len(relative.parts) - 1 > MAX_DEPTH:
                problems.append(f"{relative}: more than {MAX_DEPTH} folders down")
            files.append({"path": str(relative), "bytes": path.stat().st_size})
            if path.stat().st_size > MAX_FILE_BYTES:
                problems.append(f"{relative}: over 16 MiB")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, more than {MAX_FILES}")
    if sum(f["bytes"] for f in files) > MAX_TOTAL_BYTES:
        problems.append("over 64 MiB together")
    if not (out / "gpu_check.json").is_file():
        problems.append("no gpu_check.json")
    return files, problems


def run_check(tree: Path, out: Path, venv: Path) -> int:
    prefix, how = isolation()
    print(f"[dry run] network: {how}", flush=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(OUT=str(out), PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONNOUSERSITE="1",
               PYTHONUNBUFFERED="1")
    if not prefix:
        env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", PIP_NO_INDEX="1",
                   HF_HUB_OFFLINE="1")
    return subprocess.run([*prefix, "bash", "benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=tree, env=env).returncode


def summary(report: dict) -> list[str]:
    lines = []
    for name, section in report.get("sections", {}).items():
        detail = section.get("error") or ""
        if "counts" in section:
            detail = json.dumps(section["counts"]) + (f"; {detail}" if detail else "")
        lines.append(f"  {name:<10} ok={section.get('ok')} {section.get('wall_s', '')} s {detail}".rstrip())
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default="/tmp/harma-device-venv",
                        help="the device-like environment, outside the repository (reused if current)")
    parser.add_argument("--python", help="interpreter for it (default: a Python 3.12, else this one)")
    parser.add_argument("--shared-data", default=None, help="passed to the preparation step (SHARED_DATA)")
    parser.add_argument("--keep", action="store_true", help="keep the copied tree and its outputs")
    args = parser.parse_args(argv)
    venv = Path(args.venv).resolve()
    if venv.is_relative_to(REPOSITORY):
        parser.error("--venv must lie outside the repository (it would travel with it)")
    prep = [sys.executable, str(REPOSITORY / "benchmarks" / "gpu_prep.py")]
    subprocess.run([*prep, *(["--shared-data", args.shared_data] if args.shared_data else [])], check=True)
    python, version = find_python(args.python)
    build_environment(venv, python)
    torch_version = check_environment(venv)
    work = Path(tempfile.mkdtemp(prefix="harma-dry-run-"))
    tree, out = work / "repo", work / "out"
    out.mkdir()
    copied = copy_as_it_travels(tree)
    print(f"[dry run] Python {version}, torch {torch_version}; {copied / 2**20:.1f} MiB travel to {tree}",
          flush=True)
    status = run_check(tree, out, venv)
    files, problems = returned_files(out)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else {}
    failed = [name for name, section in report.get("sections", {}).items() if section.get("ok") is False]
    print("\n[dry run] summary")
    print(f"  python {version}, torch {torch_version}, environment {venv}")
    print(f"  gpu_check.sh exit status {status}; sections that failed: {failed or 'none'}")
    print(*summary(report), sep="\n")
    print(f"  back from $OUT ({len(files)} files): " + ", ".join(f"{f['path']} ({f['bytes']} B)" for f in files))
    print(f"  rules on what comes back: {'kept' if not problems else '; '.join(problems)}")
    ok = status == 0 and not problems and not failed and bool(report)
    print(f"  dry run: {'PASSED' if ok else 'FAILED'}" + (f" (kept in {work})" if args.keep or not ok else ""))
    if ok and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
