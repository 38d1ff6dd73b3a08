"""`MoeCallback`: what an MoE fine-tune needs to see, for any `transformers.Trainer` or TRL trainer.

Logged to whatever ``report_to`` is set (the callback adds its values to the trainer's own logs):

- training: ``aux_loss``, ``z_loss``, ``router_loss`` (coefficients applied), ``task_loss`` (= ``loss`` minus
  the router terms), per MoE layer the expert load, balance and dropped fraction, and for any model
  (the dense control too) ``step_seconds`` (wall clock), ``step_cpu_seconds`` (this process's CPU time, all its
  threads: a measure of work that other jobs on a shared machine do not inflate) and ``tokens_per_second``;
- evaluation: ``eval_task_loss`` and (causal LMs) ``eval_perplexity`` without the router terms
  (``eval_loss`` includes them), the router terms separately, and ``eval_gap``: validation minus
  training task loss (a training subset scored in evaluation mode when the trainer evaluates one,
  else the latest logged training task loss);
- at the end of training: ``expert_load.png`` and ``loss_curves.png`` in ``output_dir``.

Router terms come from the model outputs (`MoeModelOutput.aux_loss`, ``z_loss``, ``expert_load``,
``dropped_fraction``), read by a forward hook; nothing is recomputed.
"""

import math
import os
import time

import torch
from transformers import TrainerCallback

from ..plotting import pyplot
from .routing_health import load_balance, plot_expert_load

EXPERT_LOAD_PLOT = "expert_load.png"
LOSS_CURVES_PLOT = "loss_curves.png"


class _Window:
    """Router statistics summed over the forwards of one logging window (training) or one evaluation."""

    def __init__(self):
        self.weight = 0.0
        self.sums: dict[str, float] = {}
        self.load: torch.Tensor | None = None  # (moe_layers, experts)
        self.dropped: torch.Tensor | None = None  # (moe_layers,)
        self.tokens = 0

    def add(self, outputs, config, weight: float, tokens: int) -> None:
        self.tokens += tokens
        if getattr(outputs, "expert_load", None) is None:
            return
        values = {"z_loss": float(outputs.z_loss.detach())}
        router = config.router_z_loss_coef * values["z_loss"]
        if outputs.aux_loss is not None:
            values["aux_loss"] = float(outputs.aux_loss.detach())
            router += config.router_aux_loss_coef * values["aux_loss"]
        values["router_loss"] = router
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + weight * value
        load = outputs.expert_load.detach().float().cpu() * weight
        dropped = outputs.dropped_fraction.detach().float().cpu() * weight
        self.load = load if self.load is None else self.load + load
        self.dropped = dropped if self.dropped is None else self.dropped + dropped
        self.weight += weight

    def means(self) -> dict[str, float]:
        return {key: value / self.weight for key, value in self.sums.items()} if self.weight else {}


class MoeCallback(TrainerCallback):
    """Router losses, expert load and dropped tokens in the trainer's logs; evaluation without the router
    terms; train/validation gap; timing; plots at the end. Works with dense models too (timing only).

    The callback adds its values to the logs the trainer hands to every callback, so it must run before
    the reporting callbacks (TensorBoard, W&B, ...), which `Trainer` puts first: add it with
    ``MoeCallback.attach(trainer)``.

    Args:
        per_expert: also log every expert's share of the load (``router/layer{L}/expert{E}``), not only
            each layer's balance and dropped fraction.
        train_eval_name: the key of the training subset in a dict ``eval_dataset`` (for ``eval_gap``).
    """

    def __init__(self, per_expert: bool = True, train_eval_name: str = "train_subset"):
        self.per_expert = per_expert
        self.train_eval_name = train_eval_name
        self.train = _Window()
        self.eval = _Window()
        self.handle = None
        self.model_config = None
        self.moe_layers: list[int] = []
        self.is_causal_lm = False
        self.step_started = 0.0
        self.step_seconds: list[float] = []
        self.step_cpu_started = 0.0
        self.step_cpu_seconds: list[float] = []
        self.last_train_task_loss: float | None = None
        self.last_eval_load: dict | None = None
        self.task_losses_at_step: dict[str, float] = {}

    @classmethod
    def attach(cls, trainer, **kwargs) -> "MoeCallback":
        """Add a new callback to ``trainer`` ahead of its reporting callbacks; returns it."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    # Hook: read the routing statistics of every forward of the model.
    def _hook(self, module, args, kwargs, outputs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else (input_ids.numel() if input_ids is not None else 0)
        batch = input_ids.shape[0] if input_ids is not None else 1
        # Training: mean over forwards; evaluation: weighted by examples, as Trainer averages eval_loss.
        window, weight = (self.train, 1.0) if module.training else (self.eval, float(batch))
        window.add(outputs, self.model_config, weight, tokens)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.handle is not None:
            return
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model_config = inner.config
        self.moe_layers = list(getattr(inner.config, "moe_layers", []))
        self.is_causal_lm = type(inner).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        self.handle = inner.register_forward_hook(self._hook, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()
        self.step_cpu_started = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self.step_started)
        self.step_cpu_seconds.append(time.process_time() - self.step_cpu_started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        before = set(logs)
        if "loss" in logs:
            self._log_train(logs)
        evaluated = [k[: -len("loss")] for k in logs if k.startswith("eval_") and k.endswith("loss")]
        evaluated = [p for p in evaluated if not p.endswith(("task_", "router_", "z_", "aux_"))]
        if evaluated:
            self._log_eval(logs, evaluated[0], state.global_step)
        # Trainer records a copy of the logs in its history before the callbacks run: complete it too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({k: logs[k] for k in set(logs) - before})

    def _routing_scalars(self, window: _Window, prefix: str) -> dict[str, float]:
        scalars = {f"{prefix}{k}": v for k, v in window.means().items()}
        if window.load is None:
            return scalars
        load = window.load / window.load.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        dropped = window.dropped / window.weight
        for i, layer in enumerate(self.moe_layers):
            scalars[f"{prefix}router/layer{layer}/balance"] = load_balance(load[i])
            scalars[f"{prefix}router/layer{layer}/dropped_fraction"] = float(dropped[i])
            if self.per_expert:
                for expert, share in enumerate(load[i].tolist()):
                    scalars[f"{prefix}router/layer{layer}/expert{expert}"] = share
        return scalars

    def _log_train(self, logs: dict) -> None:
        window, self.train = self.train, _Window()
        scalars = self._routing_scalars(window, "")
        if "router_loss" in scalars:
            scalars["task_loss"] = logs["loss"] - scalars["router_loss"]
        elif window.tokens:
            scalars["task_loss"] = logs["loss"]
        self.last_train_task_loss = scalars.get("task_loss", self.last_train_task_loss)
        if self.step_seconds:
            seconds = sum(self.step_seconds)
            scalars["step_seconds"] = seconds / len(self.step_seconds)
            scalars["tokens_per_second"] = window.tokens / seconds if seconds > 0 else 0.0
            scalars["step_cpu_seconds"] = sum(self.step_cpu_seconds) / len(self.step_cpu_seconds)
            self.step_seconds, self.step_cpu_seconds = [], []
        logs.update(scalars)

    def _log_eval(self, logs: dict, prefix: str, step: int) -> None:
        window, self.eval = self.eval, _Window()
        scalars = self._routing_scalars(window, prefix)
        task_loss = logs[f"{prefix}loss"] - scalars.get(f"{prefix}router_loss", 0.0)
        scalars[f"{prefix}task_loss"] = task_loss
        if self.is_causal_lm:
            scalars[f"{prefix}perplexity"] = math.exp(min(task_loss, 50.0))
        if window.load is not None:
            self.last_eval_load = {
                "layers": self.moe_layers,
                "expert_load": (window.load / window.load.sum(dim=-1, keepdim=True).clamp(min=1e-12)).tolist(),
            }
        # The gap: against the training subset of the same evaluation round if there is one.
        if self.task_losses_at_step.get("step") != step:
            self.task_losses_at_step = {"step": step}
        self.task_losses_at_step[prefix] = task_loss
        train_prefix = f"eval_{self.train_eval_name}_"
        if prefix == train_prefix:
            logs.update(scalars)
            return
        train_loss = self.task_losses_at_step.get(train_prefix, self.last_train_task_loss)
        if train_loss is not None:
            scalars[f"{prefix}gap"] = task_loss - train_loss
        logs.update(scalars)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # A training subset evaluated after the validation data: complete the validation row's gap.
        train_prefix = f"eval_{self.train_eval_name}_"
        if metrics and f"{train_prefix}task_loss" in metrics:
            for row in reversed(state.log_history):
                if row.get("step") != state.global_step:
                    break
                for key in list(row):
                    if key.endswith("task_loss") and not key.startswith(train_prefix):
                        row[key[: -len("task_loss")] + "gap"] = row[key] - metrics[f"{train_prefix}task_loss"]

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        if self.last_eval_load is not None:
            plot_expert_load(
                self.last_eval_load, os.path.join(args.output_dir, EXPERT_LOAD_PLOT), "Expert load, last evaluation"
            )
        plot_loss_curves(state.log_history, os.path.join(args.output_dir, LOSS_CURVES_PLOT))


def plot_loss_curves(log_history: list[dict], path: str) -> str:
    """Training task loss and every evaluated task loss against the optimizer step, as a PNG."""
    plt = pyplot("the loss-curve plot")

    figure, axes = plt.subplots(figsize=(5, 3.2))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in log_history:
        for key, value in row.items():
            if key == "task_loss" or (key.startswith("eval_") and key.endswith("task_loss")):
                series.setdefault(key, []).append((row["step"], value))
    for key, points in series.items():
        label = "training (logged)" if key == "task_loss" else key[len("eval_") : -len("_task_loss")] or "evaluation"
        axes.plot(*zip(*points, strict=True), marker="o" if key != "task_loss" else None, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("task loss (no router terms)")
    if series:
        axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
