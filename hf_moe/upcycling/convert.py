"""The two public conversions: an in-memory dense model, and a checkpoint directory (streamed).

Both build the same `ConversionPlan` from meta-device models and produce every MoE tensor with
`weights.produce`, so they give identical tensors for the same settings and seed.
"""

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import CONFIG_NAME

from ..cards import upcycled_model_card
from ..checkpoints.sources import resolve_paths, tokenizer_remote_code, write_metadata
from ..checkpoints.staging import check_disk_space, staged_output, staging_prefix
from ..checkpoints.streaming import CheckpointReader, check_finite, file_sha256, write_sharded_safetensors
from ..checkpoints.units import parse_dtype, parse_size
from ..modeling.configuration_moe import HF_MOE_VERSION
from ..optional_dependencies import import_train_module
from .export import export_folder
from .native import export_problems, export_status
from .settings import DEFAULT_NOISE_STD, UpcyclingSettings
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
    parameter_counts,
    plan_conversion,
    produce,
)

FORMATS = ("hf_moe", "native")


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
        options = dict(routing=routing, num_experts=num_experts, moe_layers=moe_layers, expert_init=expert_init)
        options.update(noise_std=noise_std, drop_ratio=drop_ratio, seed=seed, dtype=dtype, **config_overrides)
        return _upcycle_to_native(
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
    target_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    folder, origin, output_dir = resolve_paths(source, output_dir, overwrite, revision)
    tokenizer_code = tokenizer_remote_code(folder, allow_tokenizer_remote_code)

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

    with CheckpointReader(folder) as checkpoint:
        check_layer_count(text_config, checkpoint.keys(), folder)
        plan = plan_conversion(config, head)
        mapping = match_source_names(plan, checkpoint.keys())
        check_shapes(plan, checkpoint.shape, mapping)
        check_dtypes(plan, checkpoint.dtype, mapping)
        outputs = output_tensors(plan, lambda dense_name: checkpoint.dtype(mapping[dense_name]), target_dtype)
        total_bytes = sum(out.nbytes for out in outputs)
        check_disk_space(output_dir, total_bytes)
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
            write_metadata(staging, plan.meta_moe, plan.config, folder)
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
            total, active = parameter_counts(plan)
            card = upcycled_model_card(
                config, plan.moe_class, output_dir.name, total, active, export_status(config, head)
            )
            (staging / "README.md").write_text(card)
    return output_dir


def _upcycle_to_native(
    source,
    output_dir,
    *,
    overwrite: bool,
    revision,
    verify: bool,
    max_shard_size,
    progress,
    allow_tokenizer_remote_code: bool,
    **options,
):
    """``upcycle_checkpoint(..., format="native")``: check that the settings are exportable, upcycle
    into a hidden temporary folder (with the upcycler's own verification), then export from it."""
    dtype = options.pop("dtype", None)
    settings_options = {k: options.pop(k) for k in list(options) if k in UpcyclingSettings.__dataclass_fields__}
    settings = UpcyclingSettings(**settings_options, config_overrides=options)
    shard_bytes = parse_size(max_shard_size)
    folder, origin, output_dir = resolve_paths(source, output_dir, overwrite, revision)
    text_config = load_dense_config(folder)
    head = head_of((text_config.architectures or ["ForCausalLM"])[0])
    problems = export_problems(settings.build_config(text_config), head, flags=True)
    if problems:
        raise ValueError("--format native cannot write these settings natively:\n  - " + "\n  - ".join(problems))
    check_disk_space(output_dir, 0)  # an unwritable OUTPUT_DIR is named before the temporary folder is made
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=staging_prefix(output_dir, "unfinished"), dir=output_dir.parent))
    try:
        moe_dir = upcycle_checkpoint(
            folder, work / "moe", verify=verify, progress=progress, max_shard_size=max_shard_size, dtype=dtype,
            allow_tokenizer_remote_code=allow_tokenizer_remote_code, **settings_options, **options,
        )  # fmt: skip
        config = AutoConfig.from_pretrained(moe_dir)
        config.upcycling["source"], config.upcycling["revision"] = origin["source"], origin["revision"]
        return export_folder(moe_dir, origin, config, output_dir, shard_bytes, verify, overwrite, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
