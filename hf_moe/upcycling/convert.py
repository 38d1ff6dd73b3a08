"""The two public conversions: an in-memory dense model, and a checkpoint directory (streamed).

Both build the same `ConversionPlan` from meta-device models and produce every MoE tensor with
`weights.produce`, so they give identical tensors for the same settings and seed.
"""

import contextlib
import copy
import errno
import json
import logging
import os
import re
import shlex
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import CONFIG_NAME

from ..cards import upcycled_model_card
from ..modeling.configuration_moe import HF_MOE_VERSION
from ..optional_dependencies import import_train_module
from ..transformers_internals import convert_file_size_to_int, custom_object_save
from .settings import DEFAULT_NOISE_STD, UpcyclingSettings
from .streaming import DenseCheckpoint, check_finite, file_sha256, write_sharded_safetensors
from .verify import VerificationError, verify_conversion
from .weights import (
    check_dtypes,
    check_layer_count,
    check_model_type,
    check_shapes,
    head_of,
    match_source_names,
    materialize,
    output_tensors,
    plan_conversion,
    produce,
)

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
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
# Staging folders sit next to OUTPUT_DIR as .<name>.hf-moe-upcycle-<state>.<host>.<pid>.<random>:
# "unfinished" while a conversion writes, "replaced" for the previous output during --overwrite.
# The host and pid tell a later run whether the conversion that made one is still alive.
STAGING_TAG = "hf-moe-upcycle"
NEW_OUTPUT_MARKER = f".{STAGING_TAG}-new-output"  # in a replaced folder: the identity of the new output
HOST = re.sub(r"[^\w-]", "-", socket.gethostname()) or "localhost"
HUB_IGNORE_PATTERNS = ("*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.tflite", "*.ot", "original/*", "consolidated*")
FORMATS = ("hf_moe", "native")
REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def upcycle_model(
    dense_model: PreTrainedModel,
    *,
    routing: str = "switch",
    num_experts: int = 8,
    moe_layers="every_other",
    expert_init: str = "copy",
    noise_std: float = DEFAULT_NOISE_STD,
    drop_ratio: float = 0.5,
    seed: int = 0,
    **config_overrides,
) -> PreTrainedModel:
    """Convert an in-memory dense model into the MoE model of the same head.

    A ``*ForCausalLM`` becomes ``SwitchMoeForCausalLM`` / ``ExpertChoiceMoeForCausalLM``,
    ``*ForSequenceClassification`` the sequence classifier, a base model the base MoE model.
    Options as in `UpcyclingSettings`; ``config_overrides`` are fields of the MoE config
    (``num_experts_per_tok``, ``norm_topk_prob``, ``capacity_factor``, ...). The dense model is
    left unchanged; the result holds its own copies of the tensors, on the dense model's device,
    in the dense model's train/eval mode.
    """
    settings = UpcyclingSettings(
        routing=routing,
        num_experts=num_experts,
        moe_layers=moe_layers,
        expert_init=expert_init,
        noise_std=noise_std,
        drop_ratio=drop_ratio,
        seed=seed,
        config_overrides=config_overrides,
    )
    head = head_of(type(dense_model).__name__)
    text_config = copy.deepcopy(dense_model.config)
    record = {
        "source": dense_model.name_or_path or None,
        "revision": None,
        **settings.record(),
        "hf_moe_version": HF_MOE_VERSION,
    }
    config = settings.build_config(text_config, upcycling=record)
    config.dtype = dense_model.dtype
    plan = plan_conversion(config, head)

    state = dense_model.state_dict()
    mapping = match_source_names(plan, state)
    check_shapes(plan, lambda name: tuple(state[name].shape), mapping)
    check_dtypes(plan, lambda name: state[name].dtype, mapping)
    outputs = output_tensors(plan, lambda dense_name: state[mapping[dense_name]].dtype, None)

    def read(dense_name: str) -> torch.Tensor:
        return check_finite(state[mapping[dense_name]].detach().clone(), mapping[dense_name], "the dense model")

    tensors = {
        out.name: materialize(produce(t, out, read, settings, config), out)
        for t, out in zip(plan.tensors, outputs, strict=True)
    }
    accelerate = import_train_module("accelerate", "upcycle_model")
    with accelerate.init_empty_weights(include_buffers=False):
        model = plan.moe_class(config)
    result = model.load_state_dict(tensors, assign=True, strict=False)
    leftover = set(result.missing_keys) - set(model.all_tied_weights_keys)
    if leftover or result.unexpected_keys:
        raise RuntimeError(
            f"Upcycled state does not fit {plan.moe_class.__name__}: "
            f"missing {sorted(leftover)}, unexpected {result.unexpected_keys}"
        )
    model.tie_weights()
    model.to(dense_model.device)  # non-persistent buffers (rotary tables) were built on the CPU
    if getattr(dense_model, "generation_config", None) is not None and model.can_generate():
        model.generation_config = copy.deepcopy(dense_model.generation_config)
    return model.train(dense_model.training)


def upcycle_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    routing: str = "switch",
    num_experts: int = 8,
    moe_layers="every_other",
    expert_init: str = "copy",
    noise_std: float = DEFAULT_NOISE_STD,
    drop_ratio: float = 0.5,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    verify: bool = False,
    overwrite: bool = False,
    revision: str | None = None,
    progress: bool = True,
    allow_tokenizer_remote_code: bool = False,
    format: str = "hf_moe",
    **config_overrides,
) -> Path:
    """Convert a dense checkpoint directory (or Hub id) into an MoE checkpoint, streaming.

    Tensors are read one at a time and written straight into sharded safetensors, so peak memory
    is a few times the largest dense tensor, whatever the model size. The output is built in a
    hidden temporary folder next to ``output_dir`` and renamed into place only when complete
    (verification included); on any failure, Ctrl-C included, it is removed.

    Args:
        source: local checkpoint directory, or a Hub repository id resolved through the Hub
            cache (offline: it must already be cached).
        output_dir: destination, outside ``source``; must not exist or be empty unless ``overwrite``,
            which replaces it only once the new output is complete.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` (floating tensors) or None to keep the source's.
        max_shard_size: e.g. ``"5GB"``, ``"500MB"`` or bytes.
        verify: compare every MoE layer (and the whole model when it fits in memory) with the
            dense model; fails with `VerificationError` for function-preserving settings off by
            more than 1e-5 (relative, float32). The report is stored under ``upcycling.verification``
            in config.json.
        revision: Hub revision (Hub ids only).
        progress: show a progress bar over the bytes written.
        allow_tokenizer_remote_code: convert a source whose tokenizer needs custom code (an ``auto_map`` in
            its tokenizer config). Without it such a source is refused. Either way no code file is copied:
            only tokenizer and generation data files travel; the missing code is recorded in config.json
            and the model card.
        format: ``"hf_moe"`` (``switch_moe`` / ``expert_choice_moe``), or ``"native"``: the native
            transformers MoE architecture of `hf_moe.export_checkpoint` (e.g. qwen3 -> ``qwen3_moe``),
            for settings that have one (refused before anything is written otherwise); it upcycles
            into a hidden temporary folder, then exports and verifies (``verify``) from there.
        Other options as in `upcycle_model`.

    Returns:
        The output directory.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if format == "native":
        from .export import upcycle_to_native  # export builds on this module

        options = dict(routing=routing, num_experts=num_experts, moe_layers=moe_layers, expert_init=expert_init)
        options.update(noise_std=noise_std, drop_ratio=drop_ratio, seed=seed, dtype=dtype, **config_overrides)
        return upcycle_to_native(
            source, output_dir, overwrite=overwrite, revision=revision, verify=verify,
            max_shard_size=max_shard_size, progress=progress,
            allow_tokenizer_remote_code=allow_tokenizer_remote_code, **options,
        )  # fmt: skip
    settings = UpcyclingSettings(
        routing=routing,
        num_experts=num_experts,
        moe_layers=moe_layers,
        expert_init=expert_init,
        noise_std=noise_std,
        drop_ratio=drop_ratio,
        seed=seed,
        config_overrides=config_overrides,
    )
    target_dtype = _parse_dtype(dtype)
    shard_bytes = _parse_size(max_shard_size)
    folder, origin, output_dir = resolve_paths(source, output_dir, overwrite, revision)
    tokenizer_code = _tokenizer_remote_code(folder, allow_tokenizer_remote_code)

    text_config = load_dense_config(folder)
    head = head_of((text_config.architectures or ["ForCausalLM"])[0])
    record = {
        **origin,
        **settings.record(),
        "dtype": str(target_dtype).removeprefix("torch.") if target_dtype else None,
        "hf_moe_version": HF_MOE_VERSION,
    }
    if tokenizer_code:
        record["tokenizer_remote_code_not_copied"] = tokenizer_code
    config = settings.build_config(text_config, upcycling=record)

    with DenseCheckpoint(folder) as checkpoint:
        check_layer_count(text_config, checkpoint.keys(), folder)
        plan = plan_conversion(config, head)
        mapping = match_source_names(plan, checkpoint.keys())
        check_shapes(plan, checkpoint.shape, mapping)
        check_dtypes(plan, checkpoint.dtype, mapping)
        outputs = output_tensors(plan, lambda dense_name: checkpoint.dtype(mapping[dense_name]), target_dtype)
        total_bytes = sum(out.nbytes for out in outputs)
        _check_disk_space(output_dir, total_bytes)
        if origin["revision"] is None:
            record["source_sha256"] = {name: file_sha256(folder / name) for name in checkpoint.files}
        config.upcycling = record

        def read(dense_name: str) -> torch.Tensor:
            return checkpoint.read(mapping[dense_name])

        plans = {out.name: t for t, out in zip(plan.tensors, outputs, strict=True)}
        with staged_output(output_dir, overwrite, total_bytes) as staging:
            write_sharded_safetensors(
                staging,
                outputs,
                lambda out: produce(plans[out.name], out, read, settings, config),
                shard_bytes,
                progress,
            )
            floating = [out.dtype for out in outputs if out.dtype.is_floating_point]
            config.dtype = max(set(floating), key=floating.count) if floating else None
            _write_metadata(staging, plan, folder)
            if verify:
                report = verify_conversion(
                    plan, read, staging, folder, target_dtype, settings.expert_init, settings.seed
                )
                config.upcycling["verification"] = report.as_dict()
                if not report.passed:
                    raise VerificationError(
                        "Verification failed: the settings should preserve the dense function but the MoE model "
                        f"deviates by more than {report.tolerance:g} (relative, float32).\n{report.summary()}"
                    )
                config.save_pretrained(staging)
            (staging / "README.md").write_text(upcycled_model_card(plan, output_dir.name))
    return output_dir


def resolve_paths(source, output_dir, overwrite: bool, revision: str | None) -> tuple[Path, dict, Path]:
    """The rules every conversion (upcycle, export, import) applies before it reads a weight:
    symlinks resolved (a symlinked output refused), staging folders of dead conversions removed,
    a non-empty output kept unless ``overwrite``, and the output neither the source nor inside it.
    Returns the source folder, its provenance and the output directory."""
    output_dir = _real_output_dir(output_dir)
    clear_stale_staging(output_dir)
    _check_output_dir(output_dir, overwrite)
    folder, origin = resolve_source(source, revision)
    if folder == output_dir or output_dir in folder.parents:
        raise ValueError(f"output_dir={str(output_dir)!r} must not be or contain source={str(folder)!r}")
    if folder in output_dir.parents:
        raise ValueError(
            f"output_dir={str(output_dir)!r} must not be inside source={str(folder)!r}: the source is only read; "
            "write the converted checkpoint next to it"
        )
    return folder, origin, output_dir


def resolve_source(source, revision: str | None) -> tuple[Path, dict]:
    """Local directory, or Hub id through the Hub client (and its cache); returns the folder and
    the provenance recorded in config.json."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"source={str(source)!r} is a file; pass the checkpoint directory that contains it")
        if revision is not None:
            raise ValueError(
                f"revision applies to Hub ids only, got revision={revision!r} for the local directory "
                f"source={str(source)!r}"
            )
        return path.resolve(), {"source": str(path.resolve()), "revision": None}
    if not REPO_ID.fullmatch(str(source)):
        raise FileNotFoundError(
            f"source={str(source)!r} is neither an existing directory nor a Hub repository id (owner/name)"
        )
    try:
        folder = Path(snapshot_download(str(source), revision=revision, ignore_patterns=list(HUB_IGNORE_PATTERNS)))
    except Exception as error:  # offline, not cached, unknown repo, network: all mean "cannot get it"
        reason = str(error).strip().rstrip(".")
        raise FileNotFoundError(
            f"source={str(source)!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"(revision {revision or 'main'}): {type(error).__name__}: {reason}. Offline, the model must already be "
            "in the local Hub cache"
        ) from None
    return folder, {"source": str(source), "revision": folder.name}


def load_dense_config(folder: Path):
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {folder}: a dense transformers checkpoint needs one")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
    check_model_type(raw.get("model_type"), raw)
    config = AutoConfig.from_pretrained(folder)  # the local transformers class: no remote code
    if getattr(config, "auto_map", None):
        del config.auto_map  # the source's custom code is not copied; the MoE config must not point to it
    return config


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {list(DTYPES)} or None (keep the source's), got {dtype!r}")


def _parse_size(size) -> int:
    try:
        value = convert_file_size_to_int(size)
    except (ValueError, TypeError, AttributeError):  # AttributeError: a float such as nan
        value = None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"max_shard_size must be a positive size such as '5GB', '500MB' or a number of bytes, got {size!r}"
        )
    return value


def format_bytes(count: int) -> str:
    """A size in the largest decimal unit that keeps it >= 1 (B, kB, MB, GB, TB)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _real_output_dir(output_dir) -> Path:
    """The output path with its parent's symlinks resolved; a symlink as the output itself is refused,
    since publishing renames folders and replacing would act on the link's target."""
    path = Path(output_dir).expanduser().absolute()
    if path.is_symlink():
        raise ValueError(
            f"output_dir={str(output_dir)!r} is a symbolic link (to {os.readlink(path)!r}); pass a real directory "
            "path, e.g. the link's target"
        )
    return path.parent.resolve() / path.name


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir={str(output_dir)!r} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output_dir={str(output_dir)!r} is not empty; pass overwrite=True to replace it")


def _check_disk_space(output_dir: Path, needed: int) -> None:
    """Refuse an output that cannot be written, or whose disk lacks ``needed`` bytes, before writing."""
    existing = next((p for p in output_dir.parents if p.exists()), output_dir.parent)
    problem = None
    if not existing.is_dir():
        problem = f"{str(existing)!r} is not a directory"
    elif os.statvfs(existing).f_blocks == 0:  # /proc, /sys: they report 0 bytes free of 0
        problem = f"{str(existing)!r} is on a pseudo-filesystem (such as /proc or /sys) that stores no files"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"no permission to create folders in {str(existing)!r}"
    if problem:
        raise PermissionError(f"output_dir={str(output_dir)!r} cannot be written: {problem}")
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise OSError(
            errno.ENOSPC,
            f"No disk space: the MoE checkpoint needs {format_bytes(needed)} "
            f"but only {format_bytes(free)} are free on {existing}",
        )


def staging_prefix(output_dir: Path, state: str) -> str:
    return f".{output_dir.name}.{STAGING_TAG}-{state}.{HOST}.{os.getpid()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clear_stale_staging(output_dir: Path) -> None:
    """Deal with the staging folders of earlier conversions to ``output_dir`` that never finished.

    Left by a conversion on this host whose process is gone (killed, machine crash): an unfinished
    folder is removed; a replaced one (the previous output, moved aside during ``overwrite``) is
    removed when the new output was published, and moved back otherwise. A folder of a live process (or
    of one that reused its pid), or of another host, is not touched: the conversion is refused with the
    command that removes it.
    """
    pattern = re.compile(
        rf"\.{re.escape(output_dir.name)}\.{STAGING_TAG}-(?P<state>unfinished|replaced)\.(?P<host>[\w-]+)\.(?P<pid>\d+)\."
    )
    if not output_dir.parent.is_dir():
        return
    for path in sorted(output_dir.parent.iterdir()):
        match = pattern.match(path.name)
        if match is None or not path.is_dir() or path.is_symlink():
            continue
        pid, host, state = int(match["pid"]), match["host"], match["state"]
        if host != HOST or _process_alive(pid):
            where = f"pid {pid}" + ("" if host == HOST else f" on host {host}")
            raise FileExistsError(
                f"Another conversion to output_dir={str(output_dir)!r} ({where}) is running or was interrupted: "
                f"its {state} folder {str(path)!r} exists. Wait for it to finish or, if it is not running, "
                f"remove the folder: rm -rf {shlex.quote(str(path))}"
            )
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        if state == "unfinished":
            shutil.rmtree(path)
            logger.warning(
                f"Removed {path} ({format_bytes(size)}), left by a conversion (pid {pid}) that did not finish"
            )
        elif _settle_replaced(path, output_dir, f"a conversion (pid {pid}) that died during overwrite"):
            logger.warning(f"Restored {output_dir} from {path.name}, left by a conversion (pid {pid}) that died")
        else:
            logger.warning(
                f"Removed {path} ({format_bytes(size)}): the output it held was replaced by a conversion "
                f"(pid {pid}) that published its new output and died before removing the old one"
            )


def _folder_id(path: Path) -> str:
    """What stays the same when a folder is renamed, and differs for a folder made anew."""
    info = path.stat()
    return f"{info.st_dev}:{info.st_ino}"


def _settle_replaced(replaced: Path, output_dir: Path, by: str) -> bool:
    """Put the previous output held in ``replaced`` back, unless the new output is in place.

    ``replaced`` holds the previous output under its own name and NEW_OUTPUT_MARKER, the identity
    of the folder meant to replace it. Only that folder, in place at ``output_dir``, makes the
    previous output obsolete; a missing or empty ``output_dir`` (``mkdir -p`` in a script) gets the
    previous output back, and any other content there is refused with both paths named.
    Returns True when the previous output was restored, False when ``replaced`` was removed.
    """
    previous = replaced / output_dir.name
    marker = replaced / NEW_OUTPUT_MARKER
    published = (
        previous.is_dir()
        and marker.is_file()
        and output_dir.is_dir()
        and not output_dir.is_symlink()
        and _folder_id(output_dir) == marker.read_text()
    )
    if not previous.is_dir() or published:
        shutil.rmtree(replaced)
        return False
    if output_dir.is_dir() and not output_dir.is_symlink() and not any(output_dir.iterdir()):
        output_dir.rmdir()
    if output_dir.exists() or output_dir.is_symlink():
        found = sorted(p.name for p in output_dir.iterdir())[:5] if output_dir.is_dir() else []
        raise FileExistsError(
            f"output_dir={str(output_dir)!r} holds other files ({found or 'not a folder'}), and the previous "
            f"output, moved aside by {by}, is in {str(previous)!r}. Move those files away to get the previous "
            f"output back on the next run, or drop it: rm -rf {shlex.quote(str(replaced))}"
        )
    os.rename(previous, output_dir)
    shutil.rmtree(replaced)
    return True


def _tokenizer_remote_code(folder: Path, allowed: bool) -> dict | None:
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
        raise ValueError(
            f"The tokenizer of source={str(folder)!r} needs custom code ({listed}), which "
            "trust_remote_code=True would run. hf_moe never copies code from a source: pass "
            "allow_tokenizer_remote_code=True to convert it anyway (its data files are copied, the code is not, "
            "and the model card says so), or use a source whose tokenizer is a transformers class"
        )
    return found or None


def _write_metadata(staging: Path, plan, source_folder: Path) -> None:
    """config.json with ``auto_map``, the modeling code for ``trust_remote_code``, and the
    tokenizer / generation / chat-template files of the source: what ``save_pretrained`` writes."""
    config = plan.config
    config.architectures = [plan.moe_class.__name__]
    custom_object_save(plan.meta_moe, staging, config=config)
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


def _publish(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an existing non-empty one is replaced only with
    ``overwrite``, and only now that the new one is complete."""
    if output_dir.is_symlink():  # made a link while the conversion ran
        raise FileExistsError(f"output_dir={str(output_dir)!r} became a symbolic link during the conversion")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output_dir={str(output_dir)!r} is not empty (written while this conversion ran?); pass "
                "overwrite=True to replace it"
            )
        replaced = Path(tempfile.mkdtemp(prefix=staging_prefix(output_dir, "replaced"), dir=output_dir.parent))
        (replaced / NEW_OUTPUT_MARKER).write_text(_folder_id(staging))  # what a later run compares with
        try:
            os.rename(output_dir, replaced / output_dir.name)
            os.rename(staging, output_dir)
        except BaseException:  # Ctrl-C included: put the previous output back unless the new one is in place
            with contextlib.suppress(OSError):  # if it cannot be settled now, the next run does it
                _settle_replaced(replaced, output_dir, "this conversion")
            raise
        shutil.rmtree(replaced)
        return
    try:
        if output_dir.is_dir():
            output_dir.rmdir()
        os.rename(staging, output_dir)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise FileExistsError(
            f"output_dir={str(output_dir)!r} was filled by another process while this conversion ran; "
            "it was left as it is"
        ) from None


@contextlib.contextmanager
def staged_output(output_dir: Path, overwrite: bool, weight_bytes: int):
    """A hidden folder next to ``output_dir`` to build the output in; published with `_publish`
    when the block completes, removed on any failure (Ctrl-C included). A full disk is reported
    with the size of the weights being written."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(output_dir, "unfinished"), dir=output_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
        yield staging
        _publish(staging, output_dir, overwrite)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"No disk space left on {output_dir.parent} while writing the MoE checkpoint "
                f"({format_bytes(weight_bytes)} of weights); nothing was written to output_dir",
            ) from None
        raise
