"""Strict recipe settings: YAML file plus ``--key value`` overrides, checked against a dataclass.

A recipe is launched as ``recipes/<recipe>.py --config <file.yaml> [--key value ...]``. Every key in
the YAML file and every flag must be a field of the recipe's settings dataclass; nested sections
(``upcycle``, ``lora``) are dataclasses too and are overridden with dotted flags
(``--lora.r 16``). Values given as strings (all flags, and YAML scalars such as ``1e-4`` that PyYAML
leaves as strings) are converted to the field's type. All problems are reported at once.
"""

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field

import yaml
from transformers import SchedulerType

from hf_moe.upcycling import EXPERT_INITS, ROUTINGS

TRAIN_PARAMETER_CHOICES = ("all", "non_moe", "routers", "lora")
DATA_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
}


@dataclass
class UpcycleOptions:
    """How to upcycle a dense checkpoint on the fly (``hf_moe.upcycling.upcycle_model`` options)."""

    routing: str = "switch"
    num_experts: int = 8
    moe_layers: str | list[int] = "every_other"
    expert_init: str = "copy"
    noise_std: float | None = None
    drop_ratio: float = 0.5
    seed: int = 0
    # MoE config fields of the new model; None keeps the upcycler's default.
    num_experts_per_tok: int | None = None
    norm_topk_prob: bool | None = None


@dataclass
class LoraOptions:
    """PEFT LoRA: ``target_modules`` (e.g. attention projections) and ``target_parameters``
    (e.g. the stacked expert weights ``mlp.experts.down_proj.weight``, read as [E, out, in])."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    target_parameters: list[str] = field(default_factory=list)
    merge: bool = False  # save the merged full model instead of the adapter


@dataclass
class FinetuneConfig:
    """Settings shared by the fine-tuning recipes. ``None`` for an MoE option keeps the checkpoint's value."""

    # Model source: an hf_moe checkpoint, or a dense one upcycled on the fly when `upcycle` is set.
    model_name_or_path: str = ""
    tokenizer_name_or_path: str | None = None
    upcycle: UpcycleOptions | None = None
    # MoE and regularisation options (docs/moe-reference.md, "Fine-tuning").
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float | None = None
    expert_dropout: float | None = None
    backbone_dropout: float | None = None
    capacity_factor: float | str | None = None  # a number, or "dropless"
    eval_capacity_factor: float | str | None = None
    router_jitter_noise: float | None = None
    # What to train.
    train_parameters: str = "all"
    lora: LoraOptions | None = None
    # Optimisation.
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    gradient_checkpointing: bool = False
    seed: int = 42
    # Evaluation, early stopping, checkpoints, logging.
    eval_steps: int = 50
    eval_at_start: bool = True
    train_eval_samples: int = 256  # training examples re-scored in eval mode each evaluation (overfitting gap)
    metric_for_best_model: str = "loss"
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    early_stopping_threshold: float = 0.0  # minimum improvement that counts
    save_steps: int = 0  # 0 = no intermediate checkpoints
    resume_from_checkpoint: str | None = None
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    # Data (datasets.load_dataset): a Hub name or builder, or local files.
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    train_split: str = "train"
    validation_split: str | None = None  # default: "validation" if the data has it, else split off the training data
    validation_split_percentage: float = 10.0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # Output.
    output_dir: str = ""
    push_to_hub: bool = False
    hub_model_id: str | None = None

    metric_choices: typing.ClassVar[tuple[str, ...]] = ("loss",)
    greater_is_better_metrics: typing.ClassVar[tuple[str, ...]] = ()

    def problems(self) -> list[str]:
        """Every invalid value, as messages naming the key, the allowed values and what was given."""
        found = []
        if not self.model_name_or_path:
            found.append("model_name_or_path is required (an hf_moe checkpoint, or a dense one with `upcycle` set)")
        if not self.output_dir:
            found.append("output_dir is required")
        if self.dataset_name is None and self.train_file is None:
            found.append("give dataset_name (a Hub dataset or a datasets builder) or train_file (a local data file)")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and os.path.splitext(path)[1] not in DATA_FILE_BUILDERS:
                found.append(f"{name} must end with one of {sorted(DATA_FILE_BUILDERS)}, got {path!r}")
        if self.train_parameters not in TRAIN_PARAMETER_CHOICES:
            found.append(
                f"train_parameters must be one of {list(TRAIN_PARAMETER_CHOICES)}, got {self.train_parameters!r}"
            )
        if self.train_parameters == "lora" and self.lora is None:
            found.append(
                "train_parameters 'lora' needs a `lora` section (r, alpha, target_modules and/or target_parameters)"
            )
        if self.lora is not None and self.train_parameters != "lora":
            found.append(
                "a `lora` section is only used with train_parameters 'lora', "
                f"got train_parameters {self.train_parameters!r}"
            )
        if self.lora is not None and not (self.lora.target_modules or self.lora.target_parameters):
            found.append("lora needs target_modules and/or target_parameters, got neither")
        if self.upcycle is not None:
            if self.upcycle.routing not in ROUTINGS:
                found.append(f"upcycle.routing must be one of {list(ROUTINGS)}, got {self.upcycle.routing!r}")
            if self.upcycle.expert_init not in EXPERT_INITS:
                found.append(
                    f"upcycle.expert_init must be one of {list(EXPERT_INITS)}, got {self.upcycle.expert_init!r}"
                )
        for name in (
            "router_aux_loss_coef",
            "router_z_loss_coef",
            "weight_decay",
            "max_grad_norm",
            "early_stopping_threshold",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                found.append(f"{name} must be >= 0, got {value!r}")
        for name in ("expert_dropout", "backbone_dropout", "router_jitter_noise"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                found.append(f"{name} must be in [0, 1), got {value!r}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "dropless" or isinstance(value, float) and value <= 0:
                found.append(
                    f"{name} must be a number > 0 or 'dropless' (unset keeps the checkpoint's value), got {value!r}"
                )
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                found.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("eval_steps", "save_steps", "warmup_steps", "early_stopping_patience", "train_eval_samples"):
            if getattr(self, name) < 0:
                found.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        # Schedules stepped once per optimizer step without a metric (not reduce_lr_on_plateau / greedy).
        schedules = [s.value for s in SchedulerType if s.value not in ("reduce_lr_on_plateau", "greedy")]
        if self.lr_scheduler_type not in schedules:
            found.append(f"lr_scheduler_type must be one of {schedules}, got {self.lr_scheduler_type!r}")
        if self.learning_rate <= 0:
            found.append(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            found.append(
                "set num_train_epochs > 0 or max_steps > 0, "
                f"got num_train_epochs={self.num_train_epochs}, max_steps={self.max_steps}"
            )
        if not 0 < self.validation_split_percentage < 100:
            found.append(f"validation_split_percentage must be in (0, 100), got {self.validation_split_percentage!r}")
        if self.metric_for_best_model not in self.metric_choices:
            found.append(
                f"metric_for_best_model must be one of {list(self.metric_choices)}, got {self.metric_for_best_model!r}"
            )
        if self.early_stopping_patience > 0 and self.eval_steps == 0:
            found.append("early_stopping_patience needs periodic evaluation: set eval_steps > 0")
        if self.push_to_hub and not self.hub_model_id:
            found.append("push_to_hub needs hub_model_id (e.g. 'your-name/switch-finetuned')")
        allowed_trackers = (
            "tensorboard",
            "wandb",
            "mlflow",
            "comet_ml",
            "aim",
            "clearml",
            "dvclive",
            "trackio",
            "swanlab",
        )
        bad_trackers = [t for t in self.report_to if t not in allowed_trackers + ("none",)]
        if bad_trackers:
            found.append(f"report_to entries must be among {list(allowed_trackers + ('none',))}, got {bad_trackers}")
        return found

    @property
    def greater_is_better(self) -> bool:
        return self.metric_for_best_model in self.greater_is_better_metrics


@dataclass
class CausalLMConfig(FinetuneConfig):
    """Settings of ``recipes/finetune_clm.py``: text or instruction (prompt + response) data."""

    text_column: str = "text"
    prompt_column: str | None = None  # with response_column: instruction data, loss on the response only
    response_column: str | None = None
    block_size: int = 128
    packing: bool = True

    metric_choices: typing.ClassVar[tuple[str, ...]] = ("loss", "perplexity")

    def problems(self) -> list[str]:
        found = super().problems()
        if (self.prompt_column is None) != (self.response_column is None):
            found.append(
                "prompt_column and response_column go together (instruction data), "
                f"got prompt_column={self.prompt_column!r}, response_column={self.response_column!r}"
            )
        if self.block_size < 2:
            found.append(f"block_size must be >= 2, got {self.block_size!r}")
        return found


@dataclass
class ClassificationConfig(FinetuneConfig):
    """Settings of ``recipes/finetune_classification.py``: one text (or a text pair) and a label per example."""

    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 128
    metric_for_best_model: str = "accuracy"

    metric_choices: typing.ClassVar[tuple[str, ...]] = ("loss", "accuracy", "f1")
    greater_is_better_metrics: typing.ClassVar[tuple[str, ...]] = ("accuracy", "f1")

    def problems(self) -> list[str]:
        found = super().problems()
        if self.max_length < 2:
            found.append(f"max_length must be >= 2, got {self.max_length!r}")
        return found


def _convert(key: str, value, annotation, problems: list[str]):
    """Convert ``value`` to ``annotation`` (str/int/float/bool, optionals, lists, nested dataclasses)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and type(None) in options):
            if type(None) in options:
                return None
        errors: list[str] = []
        for option in options:
            if option is type(None):
                continue
            attempt: list[str] = []
            converted = _convert(key, value, option, attempt)
            if not attempt:
                return converted
            errors += attempt
        problems.append(errors[0] if errors else f"{key} does not accept {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            problems.append(
                f"{key} must be a mapping of {[f.name for f in dataclasses.fields(annotation)]}, got {value!r}"
            )
            return value
        return _build(annotation, value, problems, prefix=f"{key}.")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            problems.append(f"{key} must be a list, got {value!r}")
            return value
        return [_convert(f"{key}[{i}]", v, item_type, problems) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        problems.append(f"{key} must be true or false, got {value!r}")
        return value
    if annotation in (int, float):
        expected = "an integer" if annotation is int else "a number"
        if isinstance(value, bool):
            problems.append(f"{key} must be {expected}, got {value!r}")
            return value
        try:
            number = float(value) if annotation is float else int(str(value), 10) if isinstance(value, str) else value
        except (TypeError, ValueError):
            problems.append(f"{key} must be {expected}, got {value!r}")
            return value
        if annotation is int and not isinstance(number, int):
            problems.append(f"{key} must be {expected}, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            problems.append(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _build(config_class, values: dict, problems: list[str], prefix: str = ""):
    hints = typing.get_type_hints(config_class)
    names = [f.name for f in dataclasses.fields(config_class) if f.init]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {prefix + close[0]!r}?" if close else f"known keys: {[prefix + n for n in names]}"
            problems.append(f"unknown key(s) [{prefix + key!r}] for {config_class.__name__}; {hint}")
    kwargs = {k: _convert(prefix + k, v, hints[k], problems) for k, v in values.items() if k in names}
    return config_class(**kwargs)


def _set_dotted(values: dict, dotted: str, value) -> None:
    head, _, rest = dotted.partition(".")
    if not rest:
        values[head] = value
        return
    section = values.get(head)
    if not isinstance(section, dict):
        section = {}
        values[head] = section
    _set_dotted(section, rest, value)


def parse_recipe_args(config_class, argv: list[str]):
    """``--config file.yaml`` plus ``--key value`` / ``--key=value`` overrides -> a validated ``config_class``.

    Raises ValueError listing every unknown key or flag and every bad value, and FileNotFoundError
    for a missing config or data file.
    """
    values: dict = {}
    overrides: list[tuple[str, str]] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            problems.append(f"expected a --flag, got {arg!r}")
            i += 1
            continue
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                problems.append(f"flag --{key} needs a value")
                i += 1
                continue
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            if not os.path.isfile(value):
                raise FileNotFoundError(f"--config: no such file {value!r}")
            with open(value) as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ValueError(
                    f"--config {value!r} must hold a YAML mapping of settings, got {type(loaded).__name__}"
                )
            for k, v in loaded.items():
                values[k] = v
        else:
            overrides.append((key, value))
    for key, value in overrides:
        _set_dotted(values, key.replace("-", "_"), value)
    config = _build(config_class, values, problems)
    if not problems:
        problems += config.problems()
    if problems:
        raise ValueError(f"Invalid {config_class.__name__} settings:\n  - " + "\n  - ".join(problems))
    for name in ("train_file", "validation_file", "resume_from_checkpoint"):
        path = getattr(config, name)
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{name}: no such file or folder {path!r}")
    return config


def config_to_dict(config) -> dict:
    """The resolved settings as plain YAML-able data (saved next to the model)."""
    return dataclasses.asdict(config)
