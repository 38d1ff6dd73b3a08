"""What produced a report: the code's identity and the resolved configuration, written into ``results.json``.

The code is the repository's source files that the study imports (the study, the recipes and the hf_moe modules they
load), each hashed with its path. Every run records the digest of each such file loaded when it finished training
and being scored (``study_code.json``); the report compares them with the files at report time, so runs from older
code, or a report rewritten (``--report_only``) by newer code, show as ``runs_match_code: false`` with the files that
differ. ``code_sha256`` hashes the files at report time, so an edit to one of them, a moved or a deleted file, makes
it differ from `code_identity` of the shipped code. ``configuration``: the sizes and every planned run's recipe
command line (paths relative to the study folder). ``git_commit`` is for people; the hashes are what
``tests/studies/test_upcycling_study.py`` compares.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
TRACKED = ("hf_moe", "recipes", "studies")  # top-level folders of the repository whose modules are hashed


def loaded_sources() -> list[str]:
    """Repository-relative paths of the modules under `TRACKED` imported in this process, sorted."""
    paths = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        if path.suffix == ".py" and path.is_relative_to(REPOSITORY):
            relative = path.relative_to(REPOSITORY)
            if relative.parts[0] in TRACKED:
                paths.add(relative.as_posix())
    return sorted(paths)


def file_digests(files: list[str]) -> dict[str, str]:
    """{repository-relative path: SHA-256 of its bytes, or "<missing>"}."""
    digests = {}
    for name in files:
        path = REPOSITORY / name
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<missing>"
    return digests


def code_identity(files: list[str]) -> str:
    """SHA-256 over ``files`` (repository-relative), each as its path and its bytes; a missing file counts too."""
    digest = hashlib.sha256()
    for name in sorted(files):
        path = REPOSITORY / name
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
        digest.update(b"\0")
    return digest.hexdigest()


def configuration_identity(configuration: dict) -> str:
    return hashlib.sha256(json.dumps(configuration, sort_keys=True).encode()).hexdigest()


def git_commit() -> str | None:
    """The commit checked out, with ``-dirty`` when tracked files differ from it; None outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPOSITORY, capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def provenance(configuration: dict, run_digests: list[dict[str, str]]) -> dict:
    """The record for a report whose runs recorded ``run_digests`` (each run's `file_digests`)."""
    files = sorted(set(loaded_sources()).union(*run_digests))
    now = file_digests(files)
    differ = sorted({name for digests in run_digests for name, digest in digests.items() if now[name] != digest})
    return {
        "code_sha256": code_identity(files),
        "code_files": files,
        "runs_match_code": not differ,
        "files_changed_since_the_runs": differ,
        "configuration_sha256": configuration_identity(configuration),
        "configuration": configuration,
        "git_commit": git_commit(),
    }
