"""The two public conversions: an in-memory dense model, and a checkpoint directory (streamed).

Both build the same `ConversionPlan` from meta-device models and produce every MoE tensor with
`weights.produce`, so they give identical tensors for the same settings and seed.
"""

import copy
import dataclasses
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
from .settings import CheckpointOptions, UpcyclingSettings, split_options
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


def upcycle_model(dense_model: PreTrainedModel, settings: UpcyclingSettings | None = None, /, **options):
    """Convert an in-memory dense model into the MoE model of the same head.

    A ``*ForCausalLM`` becomes ``SwitchMoeForCausalLM`` / ``ExpertChoiceMoeForCausalLM``,
    ``*ForSequenceClassification`` the sequence classifier, a base model the base MoE model.
    The options are the fields of `UpcyclingSettings`, given as ``settings`` or as keywords
    (``routing``, ``num_experts``, ``moe_layers``, ``num_experts_per_tok``, ``capacity_factor``, ...).
    The dense model is left unchanged; the result holds its own copies of the tensors, on the dense
    model's device, in the dense model's train/eval mode.
    """
    settings = UpcyclingSettings.from_options(settings, options)
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
    source: str | os.PathLike, output_dir: str | os.PathLike, settings: UpcyclingSettings | None = None, /, **options
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
        settings: what to build (`UpcyclingSettings`); or give its fields as keywords.
        options: the fields of `UpcyclingSettings` (unless ``settings`` is given) and of `CheckpointOptions`:
            ``dtype``, ``max_shard_size``, ``format``, ``verify``, ``revision``, ``overwrite``, ``progress``,
            ``allow_tokenizer_remote_code``. ``verify`` compares every MoE layer (and the whole model when it
            fits in memory) with the dense model and fails with `VerificationError` for function-preserving
            settings off by more than 1e-5 (relative, float32); the report is stored under
            ``upcycling.verification`` in config.json. ``format="native"`` writes the native transformers MoE
            architecture of `hf_moe.export_checkpoint` (e.g. qwen3 -> ``qwen3_moe``) for settings that have one
            (refused before anything is written otherwise): it upcycles into a hidden temporary folder, then
            exports and verifies from there. Without ``allow_tokenizer_remote_code`` a source whose tokenizer
            needs custom code is refused; either way no code file is copied.

    Returns:
        The output directory.
    """
    scheme, writing = split_options(options, UpcyclingSettings, CheckpointOptions)
    settings = UpcyclingSettings.from_options(settings, scheme)
    checkpoint = CheckpointOptions(**writing)
    if checkpoint.format == "native":
        return _upcycle_to_native(source, output_dir, settings, checkpoint)
    return _upcycle(source, output_dir, settings, checkpoint)


def _upcycle(source, output_dir, settings: UpcyclingSettings, options: CheckpointOptions) -> Path:
    dtype, max_shard_size, verify, overwrite = options.dtype, options.max_shard_size, options.verify, options.overwrite
    revision, progress = options.revision, options.progress
    allow_tokenizer_remote_code = options.allow_tokenizer_remote_code
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


def _upcycle_to_native(source, output_dir, settings: UpcyclingSettings, options: CheckpointOptions) -> Path:
    """``upcycle_checkpoint(..., format="native")``: check that the settings are exportable, upcycle
    into a hidden temporary folder (with the upcycler's own verification), then export from it."""
    shard_bytes = parse_size(options.max_shard_size)
    folder, origin, output_dir = resolve_paths(source, output_dir, options.overwrite, options.revision)
    text_config = load_dense_config(folder)
    head = head_of((text_config.architectures or ["ForCausalLM"])[0])
    problems = export_problems(settings.build_config(text_config), head, flags=True)
    if problems:
        raise ValueError("--format native cannot write these settings natively:\n  - " + "\n  - ".join(problems))
    check_disk_space(output_dir, 0)  # an unwritable OUTPUT_DIR is named before the temporary folder is made
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=staging_prefix(output_dir, "unfinished"), dir=output_dir.parent))
    try:
        moe_options = dataclasses.replace(options, format="hf_moe", overwrite=False, revision=None)
        moe_dir = _upcycle(folder, work / "moe", settings, moe_options)
        config = AutoConfig.from_pretrained(moe_dir)
        config.upcycling["source"], config.upcycling["revision"] = origin["source"], origin["revision"]
        return export_folder(
            moe_dir, origin, config, output_dir, shard_bytes, options.verify, options.overwrite, options.progress
        )
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
