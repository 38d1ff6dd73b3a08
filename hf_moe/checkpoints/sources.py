"""Where a conversion reads from: a local folder or a Hub snapshot, and which of its files travel.

`resolve_paths` applies the rules every conversion checks before it reads a weight; the data-file
policy copies tokenizer and generation data, never code, and never a file linked from outside
the source. Nothing here knows what the checkpoint's weights are.
"""

import json
import logging
import re
import shutil
from pathlib import Path

from huggingface_hub import snapshot_download
from transformers.utils import CONFIG_NAME

from ..options import literal, option_error
from ..transformers_internals import custom_object_save
from .staging import check_output_dir, clear_stale_staging, real_output_dir

logger = logging.getLogger(__name__)

# Non-weight files that travel with the checkpoint: tokenizer and generation data, never code. A file
# matching a pattern is copied only with one of DATA_SUFFIXES (a planted tokenizer.py is not).
COPIED_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
)
DATA_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".bpe")
HUB_IGNORE_PATTERNS = ("*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.tflite", "*.ot", "original/*", "consolidated*")
REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def resolve_paths(source, output_dir, overwrite: bool, revision: str | None) -> tuple[Path, dict, Path]:
    """The rules every conversion (upcycle, export, import) applies before it reads a weight:
    symlinks resolved (a symlinked output refused), staging folders of dead conversions removed,
    a non-empty output kept unless ``overwrite``, and the output neither the source nor inside it.
    Returns the source folder, its provenance and the output directory."""
    output_dir = real_output_dir(output_dir)
    clear_stale_staging(output_dir)
    check_output_dir(output_dir, overwrite)
    folder, origin = resolve_source(source, revision)
    if folder == output_dir or output_dir in folder.parents:
        raise option_error(
            ValueError, "{output_dir=} must not be or contain {source=}", output_dir=str(output_dir), source=str(folder)
        )
    if folder in output_dir.parents:
        raise option_error(
            ValueError,
            "{output_dir=} must not be inside {source=}: the source is only read; write the converted checkpoint "
            "next to it",
            output_dir=str(output_dir),
            source=str(folder),
        )
    return folder, origin, output_dir


def resolve_source(source, revision: str | None) -> tuple[Path, dict]:
    """Local directory, or Hub id through the Hub client (and its cache); returns the folder and
    the provenance recorded in config.json."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise option_error(
                FileNotFoundError,
                "{source=} is a file; pass the checkpoint directory that contains it",
                source=str(source),
            )
        if revision is not None:
            raise option_error(
                ValueError,
                "{revision} applies to Hub ids only, got {revision=} for the local directory {source=}",
                revision=revision,
                source=str(source),
            )
        return path.resolve(), {"source": str(path.resolve()), "revision": None}
    if not REPO_ID.fullmatch(str(source)):
        raise option_error(
            FileNotFoundError,
            "{source=} is neither an existing directory nor a Hub repository id (owner/name)",
            source=str(source),
        )
    try:
        folder = Path(snapshot_download(str(source), revision=revision, ignore_patterns=list(HUB_IGNORE_PATTERNS)))
    except Exception as error:  # offline, not cached, unknown repo, network: all mean "cannot get it"
        reason = str(error).strip().rstrip(".")
        raise option_error(
            FileNotFoundError,
            "{source=} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"(revision {literal(revision or 'main')}): {type(error).__name__}: {literal(reason)}. Offline, the model "
            "must already be in the local Hub cache",
            source=str(source),
        ) from None
    return folder, {"source": str(source), "revision": folder.name}


def tokenizer_remote_code(folder: Path, allowed: bool) -> dict | None:
    """The ``auto_map`` through which the source's tokenizer would run custom code, or None.

    Refused unless ``allowed``: the converted checkpoint copies no code, and copying the data of a
    tokenizer that needs code makes a tokenizer that loads only with that code added back.
    """
    found = {}
    for name, key in (("tokenizer_config.json", None), (CONFIG_NAME, "AutoTokenizer")):
        try:
            auto_map = json.loads((folder / name).read_text()).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        entry = auto_map if key is None else ({key: auto_map[key]} if key in auto_map else {})
        if entry:
            found[name] = entry
    if found and not allowed:
        listed = "; ".join(f"auto_map {entry} in {name}" for name, entry in found.items())
        raise option_error(
            ValueError,
            f"The tokenizer of {{source=}} needs custom code ({literal(listed)}), which trust_remote_code=True would "
            "run. hf_moe never copies code from a source: pass {allow_tokenizer_remote_code=} to convert it anyway "
            "(its data files are copied, the code is not, and the model card says so), or use a source whose "
            "tokenizer is a transformers class",
            source=str(folder),
            allow_tokenizer_remote_code=True,
        )
    return found or None


def write_metadata(staging: Path, model, config, source_folder: Path) -> None:
    """config.json with ``auto_map``, the modeling code of ``model`` (a meta-device model is enough)
    for ``trust_remote_code``, and the tokenizer / generation / chat-template files of the source:
    what ``save_pretrained`` writes besides the weights."""
    config.architectures = [type(model).__name__]
    custom_object_save(model, staging, config=config)
    config.save_pretrained(staging)
    copy_data_files(source_folder, staging)


def copy_data_files(source_folder: Path, staging: Path) -> None:
    """The tokenizer, generation config and chat template files of the source: data files only,
    never code (a ``*.py`` beside a tokenizer would run under ``trust_remote_code``), and only files
    whose real path is inside the source (a ``vocab.txt`` linked to ``~/.ssh/id_rsa`` would be
    published with the model)."""
    roots = source_roots(source_folder)
    skipped, outside = [], []

    def copy(path: Path, destination: Path) -> None:
        if not any(path.resolve().is_relative_to(root) for root in roots):
            outside.append(f"{path.relative_to(source_folder)} -> {path.resolve()}")
        else:
            shutil.copyfile(path, destination)

    for pattern in COPIED_FILE_PATTERNS:
        for path in source_folder.glob(pattern):
            if not path.is_file() or (staging / path.name).exists():
                continue
            if path.suffix in DATA_SUFFIXES:
                copy(path, staging / path.name)
            else:
                skipped.append(path.name)
    templates = source_folder / "additional_chat_templates"
    if templates.is_dir():
        (staging / templates.name).mkdir()
        for path in templates.glob("*.jinja"):
            if path.is_file():
                copy(path, staging / templates.name / path.name)
    if skipped:
        logger.warning(f"Not copied from the source (not tokenizer or generation data): {sorted(skipped)}")
    if outside:
        logger.warning(f"Not copied from the source (links out of the source folder): {sorted(outside)}")


def source_roots(source_folder: Path) -> tuple[Path, ...]:
    """Where the real files of a source may live: the folder itself and, for a snapshot in the Hub
    cache (``models--org--name/snapshots/<revision>``, whose files link to ``../../blobs/<hash>``),
    the ``blobs`` folder of that same repository."""
    folder = source_folder.resolve()
    roots = [folder]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        roots.append(folder.parent.parent / "blobs")
    return tuple(roots)
