"""The recipes' own options, as dataclasses for `trl.TrlParser` / `transformers.HfArgumentParser`.

A recipe parses ``(MoeArguments, DataArguments, SFTConfig)`` (causal LM) or ``(MoeArguments,
DataArguments, TrainingArguments)`` (classification) from ``--config file.yaml`` plus ``--flag value``
overrides; unknown keys and flags are errors. Training, evaluation, checkpoint and logging options
are the trainer's own (`TrainingArguments` / `SFTConfig`). Each dataclass checks its values on
construction and reports every problem at once.
"""

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from transformers import DistributedConfig, TrainingArguments

from hf_moe.options import OptionsError, key_spelling, render
from hf_moe.upcycling.settings import RoutingOptions, UpcyclingScheme, UpcyclingSettings

TRAIN_PARAMETER_CHOICES = ("all", "non_moe", "routers", "lora")
DATA_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
}


def _raise(owner: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"Invalid {owner}:\n  - " + "\n  - ".join(problems))


def non_finite_options(options) -> list[str]:
    """A problem for every number option of the dataclass ``options`` that is NaN or infinite: ``nan`` and
    ``inf`` parse as floats and pass every ``< 0`` / ``<= 0`` check, so they are refused by name here."""
    found = []
    for option in dataclasses.fields(options):
        value = getattr(options, option.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{option.name} must be a finite number, got {value!r}")
    return found


@dataclass
class MoeArguments(RoutingOptions):
    """What hf_moe adds to a fine-tune: the model source (an hf_moe checkpoint, or a dense one upcycled on
    the fly), the MoE and regularisation options (Switch Table 4, ST-MoE), what trains, LoRA, the dense
    control, the overfitting gap, early stopping and output-folder safety.

    The MoE options are the routing fields of the upcycling schema (`RoutingOptions`: ``num_experts_per_tok``,
    ``capacity_factor``, ``router_aux_loss_coef``, ...), under the same names: ``None`` keeps the checkpoint's
    value, or takes the routing's default when upcycling. ``upcycle`` holds the rest of `UpcyclingSettings`
    as one mapping, ``upcycle: {routing: switch, num_experts: 8, moe_layers: last_half}``, so that every option
    keeps its one name (a flat ``seed`` would also be TrainingArguments')."""

    model_name_or_path: str = field(default="", metadata={"help": "an hf_moe checkpoint, or a dense one with upcycle"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "default: model_name_or_path"})
    upcycle: dict | str | None = field(
        default=None,
        metadata={
            "help": "upcycle a dense model_name_or_path on the fly: the fields of hf_moe.UpcyclingScheme (routing, "
            "num_experts, moe_layers, expert_init, noise_std, drop_ratio, seed), a mapping in YAML or JSON on the "
            'command line, e.g. \'{"routing": "switch", "moe_layers": "last_half"}\'; unset: no upcycling'
        },
    )
    backbone_dropout: float | None = None
    # Sharding at load time with transformers' own engine (FSDP2, expert and tensor parallelism).
    distributed_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "transformers.distributed.DistributedConfig fields, a dict or JSON, e.g. '{\"fsdp_size\": 2}': "
            "the model is sharded at load time; launch one process per rank with torchrun or accelerate launch"
        },
    )
    # What trains.
    train_parameters: str = field(default="all", metadata={"help": f"one of {TRAIN_PARAMETER_CHOICES}"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=list, metadata={"help": "e.g. q_proj v_proj"})
    lora_target_parameters: list[str] = field(
        default_factory=list, metadata={"help": "e.g. mlp.experts.down_proj.weight (stacked [E, out, in])"}
    )
    lora_merge: bool = field(default=False, metadata={"help": "save the merged model instead of the adapter"})
    # Comparison, evaluation, safety.
    dense_control: bool = field(
        default=False,
        metadata={"help": "fine-tune the dense model (no upcycling) with the same data, schedule and evaluation"},
    )
    train_eval_samples: int = field(
        default=256,
        metadata={"help": "training sequences (after packing) also scored in eval mode, for the gap; 0 = none"},
    )
    early_stopping_patience: int = field(default=0, metadata={"help": "evaluations without improvement; 0 = off"})
    early_stopping_threshold: float = 0.0
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace an output_dir that holds a finished or interrupted run"}
    )

    def __post_init__(self):
        found = []
        if not self.model_name_or_path:
            found.append("model_name_or_path is required (an hf_moe checkpoint, or a dense one with upcycle)")
        if self.train_parameters not in TRAIN_PARAMETER_CHOICES:
            found.append(
                f"train_parameters must be one of {list(TRAIN_PARAMETER_CHOICES)}, got {self.train_parameters!r}"
            )
        has_targets = bool(self.lora_target_modules or self.lora_target_parameters)
        if self.train_parameters == "lora" and not has_targets:
            found.append("train_parameters 'lora' needs lora_target_modules and/or lora_target_parameters")
        if has_targets and self.train_parameters != "lora":
            found.append(f"lora_target_* are only used with train_parameters 'lora', got {self.train_parameters!r}")
        if self.early_stopping_threshold is not None and math.isfinite(self.early_stopping_threshold):
            if self.early_stopping_threshold < 0:
                found.append(f"early_stopping_threshold must be >= 0, got {self.early_stopping_threshold!r}")
        if self.backbone_dropout is not None and math.isfinite(self.backbone_dropout):
            if not 0 <= self.backbone_dropout < 1:
                found.append(f"backbone_dropout must be in [0, 1), got {self.backbone_dropout!r}")
        routing_fields = {f.name for f in dataclasses.fields(RoutingOptions)}
        found += [p for p in non_finite_options(self) if p.split(" ")[0] not in routing_fields]
        found += self._upcycling_problems()
        found += self._distributed_config_problems()
        for name in ("train_eval_samples", "early_stopping_patience"):
            if getattr(self, name) < 0:
                found.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.dense_control and self.upcycle is None:
            found.append(
                "dense_control fine-tunes the dense model an MoE run upcycles: give the dense model_name_or_path "
                "with upcycle set (the MoE run's settings), got upcycle None"
            )
        _raise("MoeArguments", found)

    def _upcycling_problems(self) -> list[str]:
        """The upcycling settings and the MoE options, named by their keys here (``upcycle.moe_layers``,
        ``capacity_factor``); without ``upcycle`` the MoE options are judged by every routing that has them."""
        scheme = [f.name for f in dataclasses.fields(UpcyclingScheme)]
        spell = key_spelling({name: f"upcycle.{name}" for name in scheme})
        if isinstance(self.upcycle, str):
            try:
                self.upcycle = json.loads(self.upcycle)
            except json.JSONDecodeError as error:
                return [f"upcycle must be a JSON object of upcycling settings ({error})"]
        if self.upcycle is None:
            problems = self.routing_problems()
        elif not isinstance(self.upcycle, dict):
            return [f"upcycle must map upcycling settings ({scheme}) to values, got {self.upcycle!r}"]
        elif set(self.upcycle) - set(scheme):
            unknown = sorted(set(self.upcycle) - set(scheme))
            return [
                f"upcycle keys must be among {scheme}, got {unknown} (the MoE options, num_experts_per_tok, "
                "capacity_factor, ..., are top-level keys)"
            ]
        else:
            try:
                settings = self.upcycling_settings()
            except OptionsError as error:
                problems = error.problems
            else:
                self.upcycle = {name: getattr(settings, name) for name in scheme}  # resolved, as saved with the run
                problems = []
        return [render(template, values, spell) for template, values in problems]

    def upcycling_settings(self) -> UpcyclingSettings | None:
        """The `UpcyclingSettings` of ``upcycle`` and the MoE options (None without ``upcycle``)."""
        if self.upcycle is None:
            return None
        routing = {f.name: getattr(self, f.name) for f in dataclasses.fields(RoutingOptions)}
        return UpcyclingSettings(**self.upcycle, **routing)

    def _distributed_config_problems(self) -> list[str]:
        if isinstance(self.distributed_config, str):
            try:
                self.distributed_config = json.loads(self.distributed_config)
            except json.JSONDecodeError as error:
                return [f"distributed_config must be a JSON object of DistributedConfig fields ({error})"]
        if self.distributed_config is None:
            return []
        if not isinstance(self.distributed_config, dict):
            return [f"distributed_config must map DistributedConfig fields to values, got {self.distributed_config!r}"]
        allowed = [f.name for f in dataclasses.fields(DistributedConfig)]
        unknown = sorted(set(self.distributed_config) - set(allowed))
        found = [f"distributed_config keys must be among {allowed}, got {unknown}"] if unknown else []
        if self.train_parameters == "lora":
            found.append(
                "distributed_config does not apply to train_parameters 'lora' (saving a sharded adapter is not wired)"
            )
        if self.upcycle is not None and not self.dense_control:
            found.append(
                "distributed_config shards a checkpoint while it loads: upcycle it first (hf-moe upcycle) and give "
                "that folder as model_name_or_path, got upcycle set"
            )
        return found


@dataclass
class DataArguments:
    """Data through `datasets.load_dataset`: a Hub dataset, or local json/jsonl/csv/text/parquet files.
    Without a validation file or split, ``validation_split_percentage`` of the training data is held out."""

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_file: str | None = field(default=None, metadata={"help": "a local data file (user data)"})
    validation_file: str | None = None
    train_split: str = "train"
    validation_split: str | None = None
    validation_split_percentage: float = 10.0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # Columns: text_column, or (causal LM) prompt_column + response_column, the loss on the response only.
    text_column: str = "text"
    prompt_column: str | None = None
    response_column: str | None = None

    def __post_init__(self):
        found = []
        if self.dataset_name is None and self.train_file is None:
            found.append("give dataset_name (a Hub dataset or a datasets builder) or train_file (a local data file)")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and os.path.splitext(path)[1] not in DATA_FILE_BUILDERS:
                found.append(f"{name} must end with one of {sorted(DATA_FILE_BUILDERS)}, got {path!r}")
        if (self.prompt_column is None) != (self.response_column is None):
            found.append(
                "prompt_column and response_column go together (instruction data), "
                f"got prompt_column={self.prompt_column!r}, response_column={self.response_column!r}"
            )
        if math.isfinite(self.validation_split_percentage) and not 0 < self.validation_split_percentage < 100:
            found.append(f"validation_split_percentage must be in (0, 100), got {self.validation_split_percentage!r}")
        found += non_finite_options(self) + self._task_problems()
        _raise(type(self).__name__, found)
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"{name}: no such file {path!r}")

    def _task_problems(self) -> list[str]:
        return []


@dataclass
class ClassificationDataArguments(DataArguments):
    """`DataArguments` of the classification recipe: text, optional text pair and label columns, and the
    truncation length (the causal LM recipe's length is SFTConfig's ``max_length``)."""

    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 128

    def _task_problems(self) -> list[str]:
        return [f"max_length must be >= 2, got {self.max_length!r}"] if self.max_length < 2 else []


def precision_flags_win(args, flag_given: bool) -> None:
    """After ``TrainingArguments.__post_init__``: ``--bf16 false`` / ``--fp16 false`` given explicitly mean
    float32 even under ``accelerate launch``, whose ``ACCELERATE_MIXED_PRECISION`` (from its config file)
    TrainingArguments otherwise takes whenever neither flag is true."""
    if flag_given and not (args.bf16 or args.fp16):
        args.mixed_precision = "no"


@dataclass
class MoeTrainingArguments(TrainingArguments):
    """`TrainingArguments` of the classification recipe, where ``--bf16`` / ``--fp16`` set explicitly win
    over the launcher's mixed precision (`precision_flags_win`); unset, the launcher's applies."""

    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (unset: the launcher's)"})
    fp16: bool | None = field(default=None, metadata={"help": "fp16 mixed precision (unset: the launcher's)"})

    def __post_init__(self):
        flag_given = self.bf16 is not None or self.fp16 is not None
        self.bf16, self.fp16 = bool(self.bf16), bool(self.fp16)
        super().__post_init__()
        precision_flags_win(self, flag_given)
