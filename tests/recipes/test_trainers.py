"""TRL's SFTTrainer and transformers' Trainer on hf_moe models (real TRL, a few steps each).

The loss on a fixed batch must be the task loss plus the router terms, once:
task + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss.
"""

import math

import pytest
import torch
from datasets import Dataset
from recipe_helpers import build_tokenizer, clm_lines, tiny_dense_config
from trl import SFTConfig, SFTTrainer

import hf_moe
from hf_moe.training import MoeCallback, MoeSFTTrainer

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer(clm_lines(200, seed=0) + ["user: assistant: Q: A:"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_moe(kind: str, vocab_size: int):
    torch.manual_seed(0)
    dense = tiny_dense_config(vocab_size)
    if kind == "switch":
        config = hf_moe.SwitchMoeConfig(
            text_config=dense, num_experts=4, moe_layers=[0, 1], num_experts_per_tok=2, router_aux_loss_coef=0.1
        )
        return hf_moe.SwitchMoeForCausalLM(config)
    if kind == "aux_free":  # with DeepSeek-V3's sequence-wise loss and a z-loss, so both router terms are checked
        config = hf_moe.AuxFreeMoeConfig(
            text_config=dense, num_experts=4, moe_layers=[0, 1], router_aux_loss_coef=0.1, router_z_loss_coef=1e-3
        )
        return hf_moe.AuxFreeMoeForCausalLM(config)
    config = hf_moe.ExpertChoiceMoeConfig(text_config=dense, num_experts=4, moe_layers=[0, 1], capacity_factor=2.0)
    return hf_moe.ExpertChoiceMoeForCausalLM(config)


def datasets(kind: str) -> Dataset:
    lines = clm_lines(48, seed=3)
    if kind == "text":
        return Dataset.from_dict({"text": lines})
    if kind == "prompt_completion":
        return Dataset.from_dict({"prompt": [f"Q: {x[:10]}" for x in lines], "completion": [x[10:] for x in lines]})
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": x[:10]}] for x in lines],
            "completion": [[{"role": "assistant", "content": x[10:]}] for x in lines],
        }
    )


def sft_config(tmp_path, **overrides) -> SFTConfig:
    settings = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "max_length": 24,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    return SFTConfig(**{**settings, **overrides})


def reference_loss(model, batch) -> tuple[float, float]:
    """(task loss by hand from the logits, the model's router terms) on ``batch`` in training mode."""
    torch.manual_seed(0)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits, labels = outputs.logits[:, :-1].float(), batch["labels"][:, 1:]
    task = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
    config = model.config
    router = config.router_z_loss_coef * outputs.z_loss
    if outputs.aux_loss is not None:
        router = router + config.router_aux_loss_coef * outputs.aux_loss
    return task.item(), router.item()


@pytest.mark.parametrize("kind", ["switch", "expert_choice", "aux_free"])
@pytest.mark.parametrize("data", ["text", "prompt_completion", "conversational"])
def test_sft_loss_is_task_loss_plus_router_terms_once(tokenizer, tmp_path, kind, data):
    model = tiny_moe(kind, len(tokenizer))
    trainer = MoeSFTTrainer(
        model=model, args=sft_config(tmp_path), train_dataset=datasets(data), processing_class=tokenizer
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    if data != "text":  # completion-only loss: the prompt tokens carry no label
        assert (batch["labels"] == -100).sum() > (batch["attention_mask"] == 0).sum()
    model.train()
    task, router = reference_loss(model, batch)
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(batch)).item()
    assert router > 1e-3
    assert loss == pytest.approx(task + router, rel=1e-5)
    # Stock SFTTrainer runs on the model too (its fused LM head reads model.base_model), with the task loss only.
    stock = SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=datasets(data), processing_class=tokenizer)
    torch.manual_seed(0)
    assert stock.compute_loss(model, dict(batch)).item() == pytest.approx(task, rel=1e-4)

    callback = MoeCallback.attach(trainer)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 3 and all(math.isfinite(row["loss"]) for row in rows)
    assert all(row["task_loss"] == pytest.approx(row["loss"] - row["router_loss"]) for row in rows)
    assert ("aux_loss" in rows[0]) == (kind != "expert_choice") and rows[0]["z_loss"] > 0
    assert rows[0]["router/layer1/dropped_fraction"] >= 0.0 and callback.handle is None
    if kind == "aux_free":  # the selection biases move once per optimizer step
        assert all(block.router.bias_updates.item() == 3 for block in model.moe_blocks())


@pytest.mark.parametrize("kind", ["switch", "expert_choice", "aux_free"])
def test_sft_with_lora_on_attention_and_experts(tokenizer, tmp_path, kind):
    from peft import LoraConfig

    model = tiny_moe(kind, len(tokenizer))
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.down_proj.weight"]
    )
    trainer = MoeSFTTrainer(
        model=model,
        args=sft_config(tmp_path),
        train_dataset=datasets("text"),
        processing_class=tokenizer,
        peft_config=lora,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    task, router = reference_loss(trainer.model, batch)
    torch.manual_seed(0)
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(task + router, rel=1e-5)
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])]
    assert any("experts" in n for n in changed) and any("q_proj" in n for n in changed)


def test_sft_packing_trains(tokenizer, tmp_path):
    model = tiny_moe("switch", len(tokenizer))
    trainer = MoeSFTTrainer(
        model=model,
        args=sft_config(tmp_path, packing=True, packing_strategy="wrapped", max_length=16),
        train_dataset=datasets("text"),
        processing_class=tokenizer,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["input_ids"].shape == (4, 16) and (batch["labels"] != -100).all()
    model.train()
    task, router = reference_loss(model, batch)
    torch.manual_seed(0)
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(task + router, rel=1e-5)
    losses = [row["loss"] for row in trainer.train() and trainer.state.log_history if "loss" in row]
    assert len(losses) == 3


def test_gradient_accumulation_counts_router_terms_once(tokenizer):
    """Under accumulation Trainer sums the micro-batch losses it gets with ``num_items_in_batch`` (the label
    count of the whole step): two halves must sum to the loss of the whole batch, router terms included
    once. The z-loss is a token mean (linear in the batch); the balancing loss, a product of batch means,
    is not, so it is off here."""
    model = tiny_moe("switch", len(tokenizer)).eval()
    model.config.router_aux_loss_coef, model.config.router_z_loss_coef = 0.0, 1.0
    torch.manual_seed(1)
    ids = torch.randint(2, len(tokenizer), (4, 12))
    labels = ids.clone()  # every token labelled (packed text): the label share is the token share
    whole = model(input_ids=ids, labels=labels)
    items = int((labels[:, 1:] != -100).sum())
    halves = [
        model(input_ids=ids[s], labels=labels[s], num_items_in_batch=items).loss for s in (slice(0, 2), slice(2, 4))
    ]
    assert whole.z_loss > 1.0
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.loss.item(), rel=1e-5)
    # Without the weighting the z-loss would count once per micro-batch.
    assert abs((halves[0] + halves[1]).item() - whole.loss.item() - whole.z_loss.item()) > 0.5


def test_trainer_example_from_the_readme(tmp_path, monkeypatch):
    """The README's Trainer example, as printed there."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"<!-- trainer-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert len([line for line in code.splitlines() if line and "import" not in line]) <= 10
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    history = namespace["trainer"].state.log_history
    evaluation = next(row for row in history if "eval_task_loss" in row)
    assert evaluation["eval_perplexity"] == pytest.approx(math.exp(evaluation["eval_task_loss"]))
    assert evaluation["eval_loss"] - evaluation["eval_task_loss"] == pytest.approx(evaluation["eval_router_loss"])
    assert evaluation["eval_z_loss"] > 0 and "eval_gap" in evaluation and "router/layer1/balance" in history[0]
    assert (tmp_path / "switch-run" / "expert_load.png").is_file() and (
        tmp_path / "switch-run" / "loss_curves.png"
    ).is_file()


def test_dpo_runs_a_step(tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    tiny_moe("switch", len(tokenizer)).save_pretrained(tmp_path / "switch")  # DPO loads its reference model by name
    model = hf_moe.SwitchMoeForCausalLM.from_pretrained(tmp_path / "switch")
    lines = clm_lines(8, seed=5)
    data = Dataset.from_dict(
        {
            "prompt": [x[:10] for x in lines],
            "chosen": [x[10:] for x in lines],
            "rejected": [x[::-1][:12] for x in lines],
        }
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    # One step runs; the DPO loss has no router terms (TRL adds only Mixtral-style aux losses).
    assert math.isfinite(trainer.train().training_loss)
