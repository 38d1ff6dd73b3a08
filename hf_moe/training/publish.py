"""The output folder of a fine-tuning run: model or PEFT adapter, tokenizer, resolved settings,
model card with an expert-load plot, and the optional upload with the standard Hub client."""

import contextlib
import json
import os

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCardData

from hf_moe.cards import format_count, render_model_card
from hf_moe.modeling.registry import routing_method_of

from .callback import EXPERT_LOAD_PLOT, LOSS_CURVES_PLOT

SETTINGS_FILE = "finetune_config.yaml"
HISTORY_FILE = "evaluations.json"


def is_inside(path: str, folder: str) -> bool:
    """Whether the local ``path`` is ``folder`` or lies inside it (a Hub name is never inside)."""
    if not os.path.exists(path):
        return False
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


@contextlib.contextmanager
def code_of_wrapped_class(model):
    """FSDP2's ``fully_shard`` turns the model's class into a subclass ``FSDP<Class>`` defined in torch; for
    the duration of a save, that subclass takes the module and name of the model's own class, so that
    save_pretrained copies hf_moe's code next to the weights and names it in ``auto_map`` (not torch's)."""
    sharded = type(model)
    own = next((base for base in sharded.__bases__ if sharded.__name__ == "FSDP" + base.__name__), None)
    if own is None:
        yield
        return
    names = sharded.__module__, sharded.__name__, sharded.__qualname__
    sharded.__module__, sharded.__name__, sharded.__qualname__ = own.__module__, own.__name__, own.__qualname__
    try:
        yield
    finally:
        sharded.__module__, sharded.__name__, sharded.__qualname__ = names


def save_model_folder(
    accelerator, model, tokenizer, config, output_dir: str, settings: dict, base_on_disk: bool = True
) -> dict:
    """Save what ``AutoModelFor...from_pretrained(output_dir)`` loads; returns what was saved
    (``kind``: "model" or "adapter", ``base_model_folder``, ``model``: the MoE model, for the card).

    ``config``: the `MoeArguments`; ``settings``: every resolved option, saved as ``finetune_config.yaml``.
    Full fine-tuning: the model. LoRA: the adapter (``lora_merge`` saves the merged model
    instead). An adapter needs its MoE base on disk: when the base was upcycled on the fly, or
    its config changed (``base_on_disk=False``, e.g. a new classification head and its labels),
    the frozen base is saved under ``output_dir/base_model`` and the adapter points there.
    """
    unwrapped = accelerator.unwrap_model(model)
    saved = {"kind": "model", "base_model_folder": None, "model": unwrapped}
    if getattr(unwrapped, "is_distributed_loading_by_transformers", False):
        # Sharded at load time (`distributed_config`): every rank joins the gathers of save_pretrained.
        with code_of_wrapped_class(unwrapped):
            unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(output_dir)
            with open(os.path.join(output_dir, SETTINGS_FILE), "w") as f:
                yaml.safe_dump(settings, f, sort_keys=False)
        accelerator.wait_for_everyone()
        return saved
    state_dict = accelerator.get_state_dict(model)
    if config.train_parameters == "lora":
        if config.lora_merge:
            unwrapped = unwrapped.merge_and_unload()
            state_dict = None
            saved["model"] = unwrapped
        else:
            saved["kind"] = "adapter"
            saved["model"] = unwrapped.get_base_model()
    # The folder the run ends up in (output_dir may be the staging folder of a run that replaces another):
    # a base inside it is replaced too, and the adapter must name the base where it will be.
    final_dir = settings.get("output_dir") or output_dir
    base_on_disk = base_on_disk and not is_inside(config.model_name_or_path, final_dir)
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        if saved["kind"] == "adapter" and (config.upcycle is not None or not base_on_disk):
            base_folder = os.path.abspath(os.path.join(output_dir, "base_model"))
            unwrapped.peft_config["default"].base_model_name_or_path = base_folder
            saved["model"].config.save_pretrained(base_folder)  # PEFT reads the base config while saving
            unwrapped.save_pretrained(output_dir)
            base = unwrapped.unload()  # frozen base weights; the adapter holds every trained tensor
            base.save_pretrained(base_folder)
            tokenizer.save_pretrained(base_folder)
            final_base = os.path.join(os.path.abspath(final_dir), "base_model")
            if final_base != base_folder:
                name_adapter_base(output_dir, final_base)
                unwrapped.peft_config["default"].base_model_name_or_path = final_base
            saved["base_model_folder"] = final_base
        else:
            unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
        # Written last: its presence marks a finished run (output folders holding one are not overwritten).
        with open(os.path.join(output_dir, SETTINGS_FILE), "w") as f:
            yaml.safe_dump(settings, f, sort_keys=False)
    accelerator.wait_for_everyone()
    return saved


def name_adapter_base(adapter_dir: str, base_folder: str) -> None:
    """Point the saved adapter at ``base_folder`` (its base's place once the run is published)."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        adapter_config = json.load(f)
    adapter_config["base_model_name_or_path"] = base_folder
    with open(path, "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)


def moe_architecture_rows(model) -> list[tuple[str, str]]:
    """(field, value) rows describing the MoE model for the card."""
    config = model.config
    text_config = config.text_config
    total = sum(p.numel() for p in model.parameters())
    rows = [
        ("architecture", f"`{type(model).__name__}` (`{config.model_type}`), backbone `{text_config.model_type}`"),
        ("layers / hidden size", f"{text_config.num_hidden_layers} / {text_config.hidden_size}"),
        ("MoE layers", ", ".join(str(i) for i in config.moe_layers)),
        ("experts per MoE layer", str(config.num_experts)),
    ]
    rows += routing_method_of(config).card_rows(config)
    rows += [
        ("router_z_loss_coef", str(config.router_z_loss_coef)),
        ("expert_dropout", str(config.expert_dropout)),
        ("parameters (total)", format_count(total)),
    ]
    return rows


def write_model_card(
    output_dir: str,
    *,
    settings: dict,
    model,
    task: str,
    auto_class: str,
    history: list[dict],
    best: dict,
    routing: dict,
    dataset: str,
    saved: dict,
    metric_names: list[str],
) -> str:
    """Render ``model_cards/finetuned.md`` into ``output_dir/README.md`` (the plots are `MoeCallback`'s),
    with the evaluation history (``evaluations.json``) next to it. ``settings``: the resolved options."""
    with open(os.path.join(output_dir, HISTORY_FILE), "w") as f:
        json.dump({"evaluations": history, "best": best, "routing": routing}, f, indent=1)
    final = history[-1]
    model_name = settings.get("hub_model_id") or os.path.basename(
        os.path.abspath(settings.get("output_dir") or output_dir)
    )
    task_type = "text-generation" if task == "causal-lm" else "text-classification"
    dataset_type = settings.get("dataset_name") or "local files"
    eval_results = [
        EvalResult(
            task_type=task_type,
            dataset_type=dataset_type,
            dataset_name=dataset,
            dataset_split="validation",
            metric_type=name,
            metric_name=f"validation {name}",
            metric_value=round(float(final["validation"][name]), 6),
        )
        for name in metric_names
    ]
    card_data = ModelCardData(
        base_model=settings["model_name_or_path"],
        datasets=[settings["dataset_name"]] if settings.get("dataset_name") else None,
        tags=["hf_moe", "moe", "mixture-of-experts", model.config.model_type, "fine-tuned"]
        + (["peft", "lora"] if saved["kind"] == "adapter" else []),
        library_name="peft" if saved["kind"] == "adapter" else "transformers",
        pipeline_tag=task_type,
        model_name=model_name,
        eval_results=eval_results,
    )
    upcycle = settings.get("upcycle") or {}
    hyperparameters = [
        (k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        for k, v in settings.items()
        if k not in ("output_dir", "hub_model_id", "push_to_hub")
    ]
    layers = [
        {"layer": layer, "balance": balance, "dropped": dropped, "load": ", ".join(f"{x:.3f}" for x in load)}
        for layer, load, balance, dropped in zip(
            routing["layers"], routing["expert_load"], routing["balance"], routing["dropped_fraction"], strict=True
        )
    ]
    text = render_model_card(
        "finetuned",
        card_data=card_data,
        model_name=model_name,
        base_model=settings["model_name_or_path"],
        upcycle=upcycle if upcycle.get("routing") else None,
        dataset=dataset,
        task=task,
        auto_class=auto_class,
        adapter=saved["kind"] == "adapter",
        base_model_folder=saved["base_model_folder"],
        architecture=moe_architecture_rows(model),
        hyperparameters=hyperparameters,
        history=history,
        metric_names=metric_names,
        best=best,
        final=final,
        routing=routing,
        routing_layers=layers,
        plot_file=EXPERT_LOAD_PLOT,
        curves_file=LOSS_CURVES_PLOT,
    )
    path = os.path.join(output_dir, "README.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def push_folder_to_hub(output_dir: str, repo_id: str) -> str:
    """Upload ``output_dir`` to ``repo_id`` with the standard Hub client; returns a message.

    When the Hub cannot be reached (offline, no network, no token) the folder stays saved locally
    and the message says so and how to upload it later.
    """
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=output_dir, commit_message="Upload fine-tuned hf_moe model"
        )
        return f"Pushed {output_dir} to the Hub: {commit.repo_url if hasattr(commit, 'repo_url') else repo_id}"
    except Exception as error:  # offline mode, network errors, HTTP errors and missing tokens all land here
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return (
            f"Could not push to the Hub ({reason}). The model is saved locally in {os.path.abspath(output_dir)}. "
            f"Push it later with:  hf upload {repo_id} {os.path.abspath(output_dir)}"
        )
