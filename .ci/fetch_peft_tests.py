"""Fetch peft's own generic tuner tests (``PeftCommonTester``) for the installed peft version.

peft's wheel carries no tests; its source release on the package index does. This puts
``tests/testing_common.py`` and ``tests/testing_utils.py`` of the installed version into
``<environment>/peft-tests/peft_common_tests/`` (inside the virtual environment, which git
ignores), where ``tests/integrations/test_peft_common.py`` finds them. Run by ``make install``;
nothing is downloaded at test time. Exits 0 with a note when the index cannot be reached, so an
offline install still works (those tests then skip with the reason).

    python .ci/fetch_peft_tests.py
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

MEMBERS = ("testing_common.py", "testing_utils.py")


def target_folder() -> Path:
    return Path(sys.prefix) / "peft-tests" / "peft_common_tests"


def main() -> int:
    version = importlib.metadata.version("peft")
    target = target_folder()
    if (target / "VERSION").is_file() and (target / "VERSION").read_text().strip() == version:
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"peft=={version}", "-d", scratch],
            capture_output=True, text=True,
        )
        archives = list(Path(scratch).glob("peft-*.tar.gz"))
        if result.returncode or not archives:
            print(f"note: peft {version}'s source release could not be fetched; the peft common tests will skip\n"
                  f"{result.stderr.strip()[-500:]}", file=sys.stderr)
            return 0
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as archive:
            for name in MEMBERS:
                member = archive.getmember(f"peft-{version}/tests/{name}")
                (target / name).write_bytes(archive.extractfile(member).read())
    (target / "__init__.py").write_text("")
    (target / "VERSION").write_text(version + "\n")
    print(f"peft {version}'s common tests are in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
