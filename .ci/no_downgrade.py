"""Read pip's dry-run report of installing the hf_moe wheel into an environment (run with that
environment's python): torch and transformers stay as they are, and nothing installed is downgraded.

    python -m pip install --dry-run --report REPORT.json WHEEL[train] && python no_downgrade.py REPORT.json
"""

import json
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.utils import canonicalize_name
from packaging.version import Version

KEPT = ("torch", "transformers")


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


report = json.loads(open(sys.argv[1]).read())
planned = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
held = {name: installed(name) for name in KEPT}
assert all(held.values()), f"the environment must already hold {KEPT}: {held}"
touched = {name: planned[name] for name in KEPT if name in planned}
assert not touched, f"pip would replace {held} with {touched}"
downgrades = {n: (installed(n), v) for n, v in planned.items() if installed(n) and Version(v) < Version(installed(n))}
assert not downgrades, f"pip would downgrade (installed, planned): {downgrades}"
print(f"the wheel beside torch {held['torch']}, transformers {held['transformers']}: no downgrade; installs {planned}")
