"""Auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3 §2.1.2): selection by
top-k of s + b, gates from s alone, b <- b + gamma * sign(mean load - load) once per optimizer step, b a
saved buffer used at inference, and an optional sequence-wise balance loss (DeepSeek-V3 eq. 17-20)."""

import json

import pytest
import torch
from backbones import BACKBONES, VOCAB, dense_config
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_moe
from hf_moe.cli import main
from hf_moe.modeling.aux_free import AuxFreeRouter, sequence_balance_loss
from hf_moe.modeling.routing import RoutingRecord


def aux_free_config(**overrides):
    return hf_moe.AuxFreeMoeConfig(text_config=dense_config("llama"), num_experts=4, moe_layers=[1, 3], **overrides)


def model_of(**overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(aux_free_config(**overrides))


def test_the_update_moves_each_bias_by_the_rate_against_its_load_error():
    router = AuxFreeRouter(8, aux_free_config(bias_update_rate=0.25))
    router.update_bias(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5: expert 0 over, 1-3 under
    assert torch.equal(router.expert_bias, torch.tensor([-0.25, 0.25, 0.25, 0.25]))
    router.update_bias(torch.tensor([3.0, 3.0, 3.0, 3.0]))  # balanced: sign(0) = 0, no move
    assert torch.equal(router.expert_bias, torch.tensor([-0.25, 0.25, 0.25, 0.25]))
    router.update_bias(torch.tensor([1.0, 7.0, 2.0, 2.0]))
    assert torch.equal(router.expert_bias, torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert router.bias_updates.item() == 3
    assert "expert_bias" not in dict(router.named_parameters())  # a buffer: no optimizer moves it


def test_selection_uses_score_plus_bias_and_the_gates_use_the_score_alone():
    router = AuxFreeRouter(3, aux_free_config(num_experts_per_tok=2)).eval()
    with torch.no_grad():
        router.weight.copy_(torch.eye(4, 3))  # logits = (x0, x1, x2, 0)
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.9]))
    hidden = torch.tensor([[[2.0, 1.0, -1.0]]])  # sigmoid scores 0.881, 0.731, 0.269, 0.5
    record = router(hidden, torch.ones(1, 1, dtype=torch.bool))
    scores = torch.tensor([2.0, 1.0, -1.0, 0.0]).sigmoid()
    # Without the bias the top-2 is {0, 1}; with it expert 3 (0.5 + 0.9) beats expert 1.
    assert sorted(record.assignments.expert_idx.tolist()) == [0, 3]
    weights = dict(zip(record.assignments.expert_idx.tolist(), record.assignments.weight.tolist(), strict=True))
    expected = scores[[0, 3]] / scores[[0, 3]].sum()  # s_i / sum of the selected s_j: no bias in the gates
    torch.testing.assert_close(torch.tensor([weights[0], weights[3]]), expected)
    assert abs(weights[3] - (0.5 + 0.9) / (0.881 + 0.5 + 0.9)) > 0.05  # what gates of s + b would give


def test_softmax_scores_select_and_weigh_alike():
    router = AuxFreeRouter(3, aux_free_config(num_experts_per_tok=1, scoring_func="softmax", norm_topk_prob=False))
    with torch.no_grad():
        router.weight.copy_(torch.eye(4, 3))
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.9]))
    gates, experts = router.select(torch.tensor([[2.0, 1.0, -1.0, 0.0]]))
    probs = torch.tensor([2.0, 1.0, -1.0, 0.0]).softmax(-1)
    assert experts.tolist() == [[3]] and torch.equal(gates, probs[[3]][None])  # raw softmax gate, bias-free


def test_the_bias_gets_no_gradient_and_moves_once_per_optimizer_step_over_all_micro_batches():
    ids = torch.randint(3, VOCAB, (4, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding is not load
    accumulated, whole = model_of().train(), model_of().train()
    optimizer = torch.optim.SGD(accumulated.parameters(), lr=0.0)
    for rows in (slice(0, 2), slice(2, 4)):  # gradient accumulation: two micro-batches, one step
        accumulated(ids[rows], attention_mask=mask[rows], labels=ids[rows]).loss.backward()
    routers = [block.router for block in accumulated.moe_blocks()]
    assert all(r.expert_bias.grad is None and not r.expert_bias.requires_grad for r in routers)
    assert all(torch.equal(r.expert_bias, torch.zeros(4)) for r in routers)  # nothing before the step
    loads = [r.pending_load.clone() for r in routers]
    assert all(load.sum() == 2 * mask.sum() for load in loads)  # top-2 picks of the 29 real tokens
    optimizer.step()
    for router, load in zip(routers, loads, strict=True):
        assert router.bias_updates.item() == 1
        assert torch.equal(router.expert_bias, 1e-3 * torch.sign(load.mean() - load))
        assert router.pending_load.sum() == 0
    optimizer.step()  # no training forward since: no update
    assert all(r.bias_updates.item() == 1 for r in routers)
    # The same as one forward on the whole batch.
    whole(ids, attention_mask=mask, labels=ids)
    torch.optim.SGD(whole.parameters(), lr=0.0).step()
    for mine, reference in zip(routers, (b.router for b in whole.moe_blocks()), strict=True):
        assert torch.equal(mine.expert_bias, reference.expert_bias)
    accumulated.eval()(ids)  # evaluation forwards count no load
    assert all(r.pending_load.sum() == 0 for r in routers)


def test_biases_are_saved_loaded_and_steer_inference(tmp_path):
    model = model_of().eval()
    with torch.no_grad():
        for block in model.moe_blocks():
            block.router.expert_bias.copy_(torch.tensor([0.3, -0.3, 0.0, 0.1]))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is hf_moe.AuxFreeMoeForCausalLM
    for block in loaded.moe_blocks():
        assert torch.equal(block.router.expert_bias, torch.tensor([0.3, -0.3, 0.0, 0.1]))
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        out, again = model(ids), loaded(ids)
        assert torch.equal(out.logits, again.logits)
        for block in loaded.moe_blocks():
            block.router.expert_bias.zero_()
        unbiased = loaded(ids)
    assert (out.expert_load - unbiased.expert_load).abs().max() > 0.05  # the bias picks the experts at inference
    assert not torch.allclose(out.logits, unbiased.logits)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    cast = model_of().to(torch.bfloat16)
    for routers in ([b.router for b in half.moe_blocks()], [b.router for b in cast.moe_blocks()]):
        assert all(r.expert_bias.dtype == r.pending_load.dtype == torch.float32 for r in routers)  # 1e-3 steps survive
        assert all(r.weight.dtype == torch.bfloat16 for r in routers)
    torch.testing.assert_close(half.moe_blocks()[0].router.expert_bias, torch.tensor([0.3, -0.3, 0.0, 0.1]))


def test_the_sequence_wise_balance_loss_follows_deepseek_v3_and_reaches_the_loss_with_its_coefficient():
    torch.manual_seed(0)
    logits = torch.randn(2 * 5, 4)
    valid = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    config = aux_free_config(num_experts_per_tok=2)
    got = sequence_balance_loss([RoutingRecord(logits, None, sequence_length=5)], valid, config, True)
    expected = []
    for rows in (slice(0, 3), slice(5, 10)):  # each sequence's real tokens, eq. 17-20 written out
        s = logits[rows].sigmoid()
        f = torch.zeros(4).index_add_(0, s.topk(2).indices.flatten(), torch.ones(s.shape[0] * 2)) * 4 / (2 * len(s))
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        expected.append((f * p).sum())
    torch.testing.assert_close(got, torch.stack(expected).mean())

    ids = torch.randint(3, VOCAB, (2, 8))
    model = model_of(router_aux_loss_coef=1e-4).train()
    out = model(ids, labels=ids)
    model.config.router_aux_loss_coef = 0.0
    torch.testing.assert_close(out.loss - model(ids, labels=ids).loss, 1e-4 * out.aux_loss)
    assert out.aux_loss > 0.5


def unbalance(model, ids) -> None:
    """Point every router's experts 0 and 1 along the mean router input, the rest at 0: top-2 picks 0 and 1."""
    inputs = []
    hooks = [b.router.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in model.moe_blocks()]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for block, hidden in zip(model.moe_blocks(), inputs, strict=True):
            direction = hidden.reshape(-1, hidden.shape[-1]).mean(0)
            direction = direction / direction.norm().square()
            block.router.weight.zero_()
            block.router.weight[0] = 2.0 * direction
            block.router.weight[1] = 1.5 * direction


def max_violation(model, ids) -> float:
    """MaxVio of Wang et al. (max load / mean load - 1), mean over MoE layers, at evaluation."""
    with torch.no_grad():
        load = model.eval()(ids).expert_load  # (layers, experts) fractions
    return (load.max(-1).values * load.shape[-1] - 1).mean().item()


# Softmax scores of 4 experts lie closer together than sigmoid scores: a smaller rate keeps the sign
# rule's oscillation around balance (amplitude about the rate) below the score gaps it corrects.
@pytest.mark.parametrize("scoring_func, rate", [("sigmoid", 0.05), ("softmax", 0.01)])
def test_training_through_the_trainer_balances_a_deliberately_unbalanced_router(scoring_func, rate, tmp_path):
    ids = torch.randint(3, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    violations = {}
    for update_rate in (0.0, rate):
        model = model_of(bias_update_rate=update_rate, scoring_func=scoring_func)
        unbalance(model, ids)
        start = max_violation(model, ids)
        args = TrainingArguments(
            tmp_path / str(update_rate),
            max_steps=24,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=1e-3,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        violations[update_rate] = max_violation(model, ids)
        updates = [b.router.bias_updates.item() for b in model.moe_blocks()]
        assert updates == [24, 24]  # once per optimizer step, not per micro-batch
    assert start > 0.5  # experts 0 and 1 take most picks (balanced: 0)
    assert violations[rate] < 0.5 * violations[0.0], violations


def test_a_peft_adapter_with_the_routers_keeps_the_biases_and_reloads_exactly(tmp_path):
    model_of().save_pretrained(tmp_path / "base")

    def fine_tune(name, **lora):
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **lora)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            ids = torch.randint(3, VOCAB, (4, 16))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval().save_pretrained(tmp_path / name)
        return model

    model = fine_tune("with_router", modules_to_save=["router"])
    saved = get_peft_model_state_dict(model)
    biases = [v for k, v in saved.items() if k.endswith("router.expert_bias")]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "with_router"
    )
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.warns(UserWarning, match=r"expert selection biases .* modules_to_save=\[\"router\"\]"):
        fine_tune("without_router")


def test_hf_moe_upcycle_routing_aux_free_is_exact_at_step_0_and_described(tmp_path):
    dense = AutoModelForCausalLM.from_config(dense_config("llama"))
    dense.save_pretrained(tmp_path / "dense")
    out = tmp_path / "moe"
    argv = ["upcycle", str(tmp_path / "dense"), str(out), "--routing", "aux_free", "--num-experts", "4"]
    argv += ["--scoring-func", "softmax", "--bias-update-rate", "0.01", "--router-aux-loss-coef", "1e-4", "--verify"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "aux_free_moe" and config["upcycling"]["routing"] == "aux_free"
    assert (config["scoring_func"], config["bias_update_rate"], config["router_aux_loss_coef"]) == (
        "softmax",
        0.01,
        1e-4,
    )
    assert config["upcycling"]["verification"]["function_preserving"] is True
    card = (out / "README.md").read_text()
    assert "auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3), top-2 of 4 by softmax score" in card
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(moe) is hf_moe.AuxFreeMoeForCausalLM
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_bad_settings_name_the_option(capsys):
    with pytest.raises(ValueError, match=r"scoring_func must be one of \['sigmoid', 'softmax'\], got 'tanh'"):
        aux_free_config(scoring_func="tanh")
    with pytest.raises(ValueError, match=r"bias_update_rate must be a finite number >= 0, got -0.1"):
        aux_free_config(bias_update_rate=-0.1)
    assert main(["upcycle", "dense", "out", "--routing", "switch", "--bias-update-rate", "0.01"]) != 0
    assert "--bias-update-rate is not a setting of --routing switch (SwitchMoeConfig)" in capsys.readouterr().err


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("model_type", sorted(BACKBONES))
def test_copy_upcycling_computes_the_dense_function_whatever_the_biases(model_type, scoring_func):
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(dense_config(model_type)).eval()
    with torch.no_grad():  # no weight left at exactly 0 or 1
        for parameter in dense.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    moe = hf_moe.upcycle_model(dense, routing="aux_free", num_experts=4, moe_layers="all", scoring_func=scoring_func)
    assert hf_moe.AuxFreeRouting.computes_dense_function(moe.config, type(moe))
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        expected = dense(ids).logits
        torch.testing.assert_close(moe(ids).logits, expected, rtol=1e-5, atol=1e-5)  # step 0: biases 0
        for block in moe.moe_blocks():  # learned biases pick other copies; the gates still sum to 1
            block.router.expert_bias.copy_(torch.randn(4))
        torch.testing.assert_close(moe(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_softmax_scores_with_the_reason(tmp_path):
    # Sigmoid-scored models export to dots1 / glm4_moe (tests/upcycling/test_native_aux_free.py); softmax ones do not.
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(dense_config("qwen3"))
    dense.save_pretrained(tmp_path / "dense")
    out = tmp_path / "moe"
    moe = hf_moe.upcycle_checkpoint(
        tmp_path / "dense", out, routing="aux_free", num_experts=4, moe_layers="all", scoring_func="softmax",
        progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="dots1 routes with scoring_func='sigmoid', this model has scoring_func="):
        hf_moe.export_checkpoint(moe, tmp_path / "native", progress=False)
    assert not (tmp_path / "native").exists()
