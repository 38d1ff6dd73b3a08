"""The two public conversions: an in-memory dense model, and a checkpoint directory (streamed).

Both build the same `ConversionPlan` from meta-device models and produce every MoE tensor with
`weights.produce`, so they give identical tensors for the same settings and seed.
"""

import contextlib
import copy
import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from importlib.metadata import version
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import snapshot_download
from transformers import AutoConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import CONFIG_NAME
from transformers.utils.hub import convert_file_size_to_int

from ..cards import upcycled_model_card
from .settings import DEFAULT_NOISE_STD, UpcyclingSettings
from .streaming import DenseCheckpoint, file_sha256, write_sharded_safetensors
from .verify import VerificationError, verify_conversion
from .weights import (
    check_model_type,
    check_shapes,
    head_of,
    match_source_names,
    materialize,
    output_tensors,
    plan_conversion,
    produce,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Non-weight files that travel with the checkpoint.
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
        "hf_moe_version": version("hf-moe"),
    }
    config = settings.build_config(text_config, upcycling=record)
    config.dtype = dense_model.dtype
    plan = plan_conversion(config, head)

    state = dense_model.state_dict()
    mapping = match_source_names(plan, state)
    check_shapes(plan, lambda name: tuple(state[name].shape), mapping)
    outputs = output_tensors(plan, lambda dense_name: state[mapping[dense_name]].dtype, None)

    def read(dense_name: str) -> torch.Tensor:
        return state[mapping[dense_name]].detach().clone()

    tensors = {
        out.name: materialize(produce(t, out, read, settings, config), out)
        for t, out in zip(plan.tensors, outputs, strict=True)
    }
    with init_empty_weights(include_buffers=False):
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
        output_dir: destination; must not exist or be empty unless ``overwrite``.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` (floating tensors) or None to keep the source's.
        max_shard_size: e.g. ``"5GB"``, ``"500MB"`` or bytes.
        verify: compare every MoE layer (and the whole model when it fits in memory) with the
            dense model; fails with `VerificationError` for function-preserving settings off by
            more than 1e-5 (relative, float32). The report is stored under ``upcycling.verification``
            in config.json.
        revision: Hub revision (Hub ids only).
        progress: show a progress bar over the bytes written.
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
            max_shard_size=max_shard_size, progress=progress, **options,
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
    output_dir = Path(output_dir).expanduser().absolute()
    _check_output_dir(output_dir, overwrite)
    folder, origin = resolve_source(source, revision)
    if folder == output_dir or output_dir in folder.parents:
        raise ValueError(f"OUTPUT_DIR {str(output_dir)!r} must not be or contain SOURCE {str(folder)!r}")

    text_config = load_dense_config(folder)
    head = head_of((text_config.architectures or ["ForCausalLM"])[0])
    record = {
        **origin,
        **settings.record(),
        "dtype": str(target_dtype).removeprefix("torch.") if target_dtype else None,
        "hf_moe_version": version("hf-moe"),
    }
    config = settings.build_config(text_config, upcycling=record)
    plan = plan_conversion(config, head)

    with DenseCheckpoint(folder) as checkpoint:
        mapping = match_source_names(plan, checkpoint.keys())
        check_shapes(plan, checkpoint.shape, mapping)
        outputs = output_tensors(plan, lambda dense_name: checkpoint.dtype(mapping[dense_name]), target_dtype)
        total_bytes = sum(out.nbytes for out in outputs)
        _check_disk_space(output_dir.parent, total_bytes)
        if origin["revision"] is None:
            record["source_sha256"] = {name: file_sha256(folder / name) for name in checkpoint.files}
        config.upcycling = record

        def read(dense_name: str) -> torch.Tensor:
            return checkpoint.read(mapping[dense_name])

        plans = {out.name: t for t, out in zip(plan.tensors, outputs, strict=True)}
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.incomplete-", dir=output_dir.parent))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
            try:
                write_sharded_safetensors(
                    staging,
                    outputs,
                    lambda out: produce(plans[out.name], out, read, settings, config),
                    shard_bytes,
                    progress,
                )
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise OSError(
                        errno.ENOSPC,
                        f"No disk space left on {output_dir.parent} while writing {total_bytes} bytes of MoE weights",
                    ) from None
                raise
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
            _publish(staging, output_dir, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return output_dir


def resolve_source(source, revision: str | None) -> tuple[Path, dict]:
    """Local directory, or Hub id through the Hub client (and its cache); returns the folder and
    the provenance recorded in config.json."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"SOURCE {str(source)!r} is a file; pass the checkpoint directory that contains it")
        if revision is not None:
            raise ValueError(
                f"revision applies to Hub ids only, got revision={revision!r} for the local directory {str(source)!r}"
            )
        return path.resolve(), {"source": str(path.resolve()), "revision": None}
    if not REPO_ID.fullmatch(str(source)):
        raise FileNotFoundError(
            f"SOURCE {str(source)!r} is neither an existing directory nor a Hub repository id (owner/name)"
        )
    try:
        folder = Path(snapshot_download(str(source), revision=revision, ignore_patterns=list(HUB_IGNORE_PATTERNS)))
    except Exception as error:  # offline, not cached, unknown repo, network: all mean "cannot get it"
        raise FileNotFoundError(
            f"SOURCE {str(source)!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"(revision {revision or 'main'}): {type(error).__name__}: {error}. Offline, the model must already be "
            "in the local Hub cache"
        ) from None
    return folder, {"source": str(source), "revision": folder.name}


def load_dense_config(folder: Path):
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {folder}: a dense transformers checkpoint needs one")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    check_model_type(model_type)
    return AutoConfig.from_pretrained(folder)


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {list(DTYPES)} or None (keep the source's), got {dtype!r}")


def _parse_size(size) -> int:
    try:
        value = convert_file_size_to_int(size)
    except (ValueError, TypeError):
        value = None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"max_shard_size must be a positive size such as '5GB', '500MB' or a number of bytes, got {size!r}"
        )
    return value


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"OUTPUT_DIR {str(output_dir)!r} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"OUTPUT_DIR {str(output_dir)!r} is not empty; pass overwrite=True (--overwrite) to replace it"
        )


def _check_disk_space(folder: Path, needed: int) -> None:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise OSError(
            errno.ENOSPC,
            f"No disk space: the MoE checkpoint needs {needed / 1e9:.2f} GB "
            f"but only {free / 1e9:.2f} GB are free on {existing}",
        )


def _write_metadata(staging: Path, plan, source_folder: Path) -> None:
    """config.json with ``auto_map``, the modeling code for ``trust_remote_code``, and the
    tokenizer / generation / chat-template files of the source: what ``save_pretrained`` writes."""
    config = plan.config
    config.architectures = [plan.moe_class.__name__]
    custom_object_save(plan.meta_moe, staging, config=config)
    config.save_pretrained(staging)
    copy_data_files(source_folder, staging)


def copy_data_files(source_folder: Path, staging: Path) -> None:
    """The tokenizer, generation config and chat template files of the source."""
    for pattern in COPIED_FILE_PATTERNS:
        for path in source_folder.glob(pattern):
            if path.is_file():
                shutil.copyfile(path, staging / path.name)
    templates = source_folder / "additional_chat_templates"
    if templates.is_dir():
        shutil.copytree(templates, staging / templates.name)


def _publish(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an existing non-empty one is replaced only with
    ``overwrite``, and only now that the new one is complete."""
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"OUTPUT_DIR {str(output_dir)!r} is not empty; pass overwrite=True (--overwrite) to replace it"
            )
        replaced = output_dir.with_name(f".{output_dir.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.rename(output_dir, replaced)
        try:
            os.rename(staging, output_dir)
        except BaseException:
            os.rename(replaced, output_dir)
            raise
        shutil.rmtree(replaced)
    else:
        if output_dir.is_dir():
            output_dir.rmdir()
        os.rename(staging, output_dir)


@contextlib.contextmanager
def staged_output(output_dir: Path, overwrite: bool):
    """A hidden folder next to ``output_dir`` to build the output in; published with `_publish`
    when the block completes, removed on any failure (Ctrl-C included)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.incomplete-", dir=output_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
        yield staging
        _publish(staging, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
