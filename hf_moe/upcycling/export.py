"""Export hf_moe checkpoints to native transformers MoE architectures, and import those back.

Both directions rename and split (or stack) tensors by the tables of `native`, streaming one
tensor (or one expert) at a time with the upcycler's reader and writer, build the output in a
hidden folder published only when complete, and verify it: every written tensor is compared
bit for bit with its source, and, when both models fit in memory, their logits on random tokens
(float32, relative max deviation <= 1e-5).
"""

import json
import os
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig
from transformers.utils import CONFIG_NAME

from ..cards import exported_model_card, imported_model_card
from ..checkpoints.sources import copy_data_files, resolve_paths, write_metadata
from ..checkpoints.staging import check_disk_space, staged_output
from ..checkpoints.streaming import CheckpointReader, OutputTensor, write_sharded_safetensors
from ..checkpoints.units import parse_size
from ..modeling.configuration_moe import HF_MOE_VERSION
from ..modeling.registry import model_types, routing_method, routing_method_of
from .native import (
    FAMILIES_BY_NATIVE,
    export_problems,
    family_of,
    import_problems,
    imported_settings,
    native_config,
    optional_native_tensors,
    serving_limits,
    tensor_rules,
)
from .verify import TOLERANCE, VERIFY_SEQ_LEN, VerificationError, relative_deviation
from .weights import check_floating, check_layer_count, head_of, plan_conversion


def export_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    verify: bool = True,
    overwrite: bool = False,
    revision: str | None = None,
    progress: bool = True,
) -> Path:
    """Write an hf_moe checkpoint as a native transformers MoE checkpoint (e.g. ``qwen3_moe``, ``mixtral``).

    The output loads with the stock Auto classes, without hf_moe and without ``trust_remote_code``,
    and computes the same function. Settings without an exact native counterpart (Expert Choice
    routing, token-dropping evaluation, a layer mix or gate normalisation the target lacks) are
    refused with a ValueError before anything is written. Supported: see `native.FAMILIES`.

    Args:
        source: hf_moe checkpoint directory, or a Hub id (from the local cache when offline).
        output_dir: destination; must not exist or be empty unless ``overwrite``.
        max_shard_size: e.g. ``"5GB"``, ``"500MB"`` or bytes.
        verify: compare every tensor bit for bit and, when both fit in memory, both models' logits;
            the report is stored under ``hf_moe_export.verification`` in config.json.
        revision: Hub revision (Hub ids only).
        progress: show a progress bar over the bytes written.

    Returns:
        The output directory.
    """
    shard_bytes = parse_size(max_shard_size)
    folder, origin, output_dir = resolve_paths(source, output_dir, overwrite, revision)
    hf_moe_types = model_types()
    config = _load_config(folder, hf_moe_types, f"an hf_moe checkpoint ({' or '.join(hf_moe_types)})")
    return export_folder(folder, origin, config, output_dir, shard_bytes, verify, overwrite, progress)


def import_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    verify: bool = True,
    overwrite: bool = False,
    revision: str | None = None,
    progress: bool = True,
) -> Path:
    """Turn a native transformers MoE checkpoint (``qwen3_moe``, ``mixtral``, ...) into an hf_moe
    checkpoint computing the same function, so the hf_moe recipes (router z-loss, expert dropout,
    capacity factors, freeze policies, routing health) apply to it: ``switch_moe`` for the softmax
    families, ``aux_free_moe`` (sigmoid scores, the native ``e_score_correction_bias`` as its selection
    biases) for glm4_moe and dots1 (`native.NativeFamily.routing`).

    The imported model is dropless (``capacity_factor=None``), as the native model is. What hf_moe
    cannot represent (experts of another size than the dense layers' MLP) is
    refused with a ValueError before anything is written. Arguments as in `export_checkpoint`;
    the report is stored under ``imported.verification`` in config.json.
    """
    shard_bytes = parse_size(max_shard_size)
    folder, origin, output_dir = resolve_paths(source, output_dir, overwrite, revision)
    native = _load_config(folder, tuple(FAMILIES_BY_NATIVE), "a native MoE checkpoint")
    family = FAMILIES_BY_NATIVE[native.model_type]
    head = head_of((native.architectures or [family.class_name(1)])[0])
    problems = import_problems(family, native)
    if head not in family.heads:
        problems.append(f"{family.model_type} has no {family.class_name(head)} head")
    if problems:
        raise ValueError(f"Cannot import {folder} into hf_moe:\n  - " + "\n  - ".join(problems))
    dense_fields, moe_fields = imported_settings(family, native)
    text_config = AutoConfig.for_model(family.import_model_type, **dense_fields)
    config = routing_method(family.routing).config_class(text_config=text_config, **moe_fields)
    config.dtype = native.dtype
    config.imported = {**origin, "model_type": family.model_type, "hf_moe_version": HF_MOE_VERSION}
    with CheckpointReader(folder) as checkpoint:
        check_layer_count(text_config, checkpoint.keys(), folder)
        plan = plan_conversion(config, head)
        rules, zeros = tensor_rules(family, plan)
        zero_names = {name for name, _ in zeros} | optional_native_tensors(family, plan)
        expected = {name: (rule, i) for rule in rules for i, name in enumerate(rule.native_names)}
        missing = sorted(set(expected) - set(checkpoint.keys()))
        unexpected = sorted(set(checkpoint.keys()) - set(expected) - zero_names)
        shapes = {tensor.name: tensor.shape for tensor in plan.tensors}
        implied = {name: _native_shape(shapes[rule.name], rule) for name, (rule, _) in expected.items()}
        bad_shapes = [
            f"{name} is {list(checkpoint.shape(name))}, the config implies {list(shape)}"
            for name, shape in implied.items()
            if name in checkpoint.location and checkpoint.shape(name) != shape
        ]
        _raise_mismatch(family.model_type, missing, unexpected, bad_shapes)
        model_dtypes = {name: tensor.dtype for name, tensor in plan.meta_moe.state_dict().items()}
        native_dtypes = {name: model_dtypes[rule.name] for name, (rule, _) in expected.items()}
        check_floating(native_dtypes, checkpoint.dtype, {name: name for name in expected}, family.model_type)
        outputs = [
            OutputTensor(
                rule.name,
                model_dtypes[rule.name] if rule.native_dtype else checkpoint.dtype(rule.native_names[0]),
                shapes[rule.name],
            )
            if rule.native_names
            else OutputTensor(rule.name, model_dtypes[rule.name], shapes[rule.name])  # not exported: starts at 0
            for rule in rules
        ]
        weight_bytes = sum(out.nbytes for out in outputs)
        check_disk_space(output_dir, weight_bytes)
        by_name = {rule.name: rule for rule in rules}

        def produce(out: OutputTensor):
            native_names = by_name[out.name].native_names
            if not native_names:
                yield torch.zeros(out.shape, dtype=out.dtype)
            for native_name in native_names:  # one chunk per expert
                yield checkpoint.read(native_name).to(out.dtype)

        with staged_output(output_dir, overwrite, weight_bytes) as staging:
            write_sharded_safetensors(staging, outputs, produce, shard_bytes, progress)
            write_metadata(staging, plan.meta_moe, plan.config, folder)
            if verify:
                with CheckpointReader(staging) as written:
                    pairs = [
                        (
                            lambda r=rule, j=j: written.read(r.name, j if r.stacked else None),
                            lambda n=n, r=rule: checkpoint.read(n).to(written.dtype(r.name)),
                        )
                        for rule in rules
                        for j, n in enumerate(rule.native_names)
                    ]
                    report = _verify(plan, pairs, reference=folder, candidate=staging)
                config.imported["verification"] = report
                config.save_pretrained(staging)
            (staging / "README.md").write_text(imported_model_card(config, family, plan.moe_class, output_dir.name))
    return output_dir


def export_folder(
    folder: Path, origin: dict, config, output_dir: Path, shard_bytes: int, verify, overwrite, progress
) -> Path:
    head = head_of(config.architectures[0])
    problems = export_problems(config, head)
    if problems:
        raise ValueError(
            f"Cannot export {folder} to a native transformers architecture:\n  - " + "\n  - ".join(problems)
        )
    family = family_of(config)
    native = native_config(family, config, head)

    with CheckpointReader(folder) as checkpoint:
        check_layer_count(config.text_config, checkpoint.keys(), folder)
        plan = plan_conversion(config, head)
        rules, zeros = tensor_rules(family, plan)
        shapes = {tensor.name: tensor.shape for tensor in plan.tensors}
        missing = sorted(rule.name for rule in rules if rule.name not in checkpoint.location)
        bad_shapes = [
            f"{rule.name} is {list(checkpoint.shape(rule.name))}, the config implies {list(shapes[rule.name])}"
            for rule in rules
            if rule.name in checkpoint.location and checkpoint.shape(rule.name) != shapes[rule.name]
        ]
        _raise_mismatch(config.model_type, missing, [], bad_shapes)
        model_dtypes = {name: tensor.dtype for name, tensor in plan.meta_moe.state_dict().items()}
        check_floating(model_dtypes, checkpoint.dtype, {rule.name: rule.name for rule in rules}, config.model_type)
        sources, outputs = {}, []
        for rule in rules:
            dtype = rule.native_dtype or checkpoint.dtype(rule.name)
            for j, native_name in enumerate(rule.native_names):
                sources[native_name] = (rule.name, j if rule.stacked else None, rule.scale, dtype)
                outputs.append(OutputTensor(native_name, dtype, _native_shape(shapes[rule.name], rule)))
        # Zero tensors are weights of the native block (a gate, a shared expert): the experts' dtype.
        weight_dtype = next(checkpoint.dtype(rule.name) for rule in rules if rule.stacked)
        outputs += [OutputTensor(name, weight_dtype, shape) for name, shape in zeros]
        weight_bytes = sum(out.nbytes for out in outputs)
        check_disk_space(output_dir, weight_bytes)

        def read_source(native_name: str) -> torch.Tensor:
            name, row, scale, dtype = sources[native_name]
            tensor = checkpoint.read(name, row).to(dtype)
            return tensor * scale if scale != 1 else tensor

        def produce(out: OutputTensor):
            yield read_source(out.name) if out.name in sources else torch.zeros(out.shape, dtype=out.dtype)

        native.hf_moe_export = {**origin, "hf_moe_version": HF_MOE_VERSION}
        if getattr(config, "upcycling", None):
            native.hf_moe_export["upcycling"] = config.upcycling
        with staged_output(output_dir, overwrite, weight_bytes) as staging:
            write_sharded_safetensors(staging, outputs, produce, shard_bytes, progress)
            native.save_pretrained(staging)
            copy_data_files(folder, staging)
            if verify:
                with CheckpointReader(staging) as written:
                    pairs = [(lambda n=n: written.read(n), lambda n=n: read_source(n)) for n in sources]
                    native.hf_moe_export["verification"] = _verify(plan, pairs, reference=folder, candidate=staging)
                native.save_pretrained(staging)
            limits = serving_limits(config, family, native)
            card = exported_model_card(config, family, native, output_dir.name, origin, limits)
            (staging / "README.md").write_text(card)
    return output_dir


def _verify(plan, pairs, reference: Path, candidate: Path) -> dict:
    """Bit-exact tensors, then (when both models fit in memory) logits within TOLERANCE."""
    different = [i for i, (written, source) in enumerate(pairs) if not _bit_equal(written(), source())]
    report = {"tensors_bit_exact": not different, "tolerance": TOLERANCE}
    needed = 4 * 2 * sum(p.numel() for p in plan.meta_moe.parameters())  # both models in float32
    available = psutil.virtual_memory().available
    if needed > available // 2:
        report["model_max_relative_deviation"] = None
        report["model_comparison_skipped"] = f"needs about {needed / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
    else:
        report["model_max_relative_deviation"] = _compare_logits(plan, reference, candidate)
    deviation = report["model_max_relative_deviation"]
    report["passed"] = not different and (deviation is None or deviation <= TOLERANCE)
    if not report["passed"]:
        raise VerificationError(
            f"Verification failed: {len(different)} tensor(s) differ from their source; whole-model relative "
            f"deviation {deviation} (tolerance {TOLERANCE:g}, float32)"
        )
    return report


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@torch.no_grad()
def _compare_logits(plan, reference: Path, candidate: Path) -> float:
    auto_class = plan.moe_class.dense_auto_class  # loads the hf_moe and the native head alike
    models = [auto_class.from_pretrained(folder, dtype=torch.float32).eval() for folder in (reference, candidate)]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, plan.config.text_config.vocab_size, (2, VERIFY_SEQ_LEN), generator=generator)
    expected, actual = (model(input_ids=input_ids) for model in models)
    key = "logits" if "logits" in expected else "last_hidden_state"
    return relative_deviation(actual[key], expected[key])


def _native_shape(shape: tuple[int, ...], rule) -> tuple[int, ...]:
    return tuple(shape[1:]) if rule.stacked else tuple(shape)


def _raise_mismatch(model_type: str, missing: list[str], unexpected: list[str], bad_shapes: list[str]) -> None:
    problems = []
    if missing:
        problems.append(f"missing tensors the {model_type} config requires: {', '.join(missing[:10])}")
    if unexpected:
        problems.append(f"unexpected tensors the {model_type} config does not have: {', '.join(unexpected[:10])}")
    problems += bad_shapes[:10]
    if problems:
        raise ValueError("The checkpoint does not match its config:\n  - " + "\n  - ".join(problems))


def _load_config(folder: Path, expected: tuple[str, ...], what: str):
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {folder}: {what} needs one")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if model_type not in expected:
        if expected == model_types():
            hint = (
                "a native MoE checkpoint is imported with `hf-moe import`"
                if model_type in FAMILIES_BY_NATIVE
                else "a dense checkpoint is upcycled and exported in one step with `hf-moe upcycle --format native`"
            )
        elif routing_method_of(model_type) is not None:
            hint = "it is an hf_moe checkpoint already; `hf-moe export` writes it in a native format"
        else:
            hint = (
                f"import supports the native MoE types {list(FAMILIES_BY_NATIVE)}; a dense checkpoint is upcycled "
                "with `hf-moe upcycle`"
            )
        raise ValueError(f"SOURCE {str(folder)!r} has model_type {model_type!r}, expected {what}: {hint}")
    return AutoConfig.from_pretrained(folder)
