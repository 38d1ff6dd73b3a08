"""Model-level guarantees: causality, batch invariance, exactness of copies, losses."""

import math

import pytest
import torch
from backbones import VOCAB, copy_dense_into_experts, dense_config, learn_thresholds
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_moe


def causal_lm(routing="switch", model_type="llama", **overrides):
    config_class = hf_moe.SwitchMoeConfig if routing == "switch" else hf_moe.ExpertChoiceMoeConfig
    overrides.setdefault("num_experts", 4)
    overrides.setdefault("moe_layers", [1, 3])
    return AutoModelForCausalLM.from_config(config_class(text_config=dense_config(model_type), **overrides))


def future_perturbed(ids, t):
    other = ids.clone()
    other[:, t + 1 :] = torch.randint(3, VOCAB, other[:, t + 1 :].shape)
    return other


def logits_in_mode(model, ids, training):
    model.train(training)
    torch.manual_seed(5)  # same dropout / jitter draws for both inputs
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_switch_is_causal_with_and_without_training_capacity(capacity_factor):
    model = causal_lm(capacity_factor=capacity_factor)
    ids, t = torch.randint(3, VOCAB, (2, 24)), 11
    base = logits_in_mode(model, ids, training=True)
    out = model(ids)
    if capacity_factor is not None:
        assert (out.dropped_fraction > 0).all()  # capacity is really binding
    perturbed = logits_in_mode(model, future_perturbed(ids, t), training=True)
    # Equal up to float summation order (expert groups change size); a leak changes routing outright.
    torch.testing.assert_close(perturbed[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base[:, t + 1 :], perturbed[:, t + 1 :])


def test_expert_choice_threshold_mode_is_causal():
    model = causal_lm("expert_choice")
    learn_thresholds(model)
    assert model.moe_blocks()[0].router.inference_routing == "threshold"
    ids, t = torch.randint(3, VOCAB, (2, 24)), 11
    base = logits_in_mode(model, ids, training=False)
    perturbed = logits_in_mode(model, future_perturbed(ids, t), training=False)
    torch.testing.assert_close(perturbed[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_expert_choice_mode_reads_the_future(training):
    # Documented, not hidden: top-C per expert over the whole sequence depends on later tokens.
    model = causal_lm("expert_choice", inference_routing="expert_choice", capacity_factor=1.0)
    ids, t = torch.randint(3, VOCAB, (4, 24)), 6
    base = logits_in_mode(model, ids, training)
    perturbed = logits_in_mode(model, future_perturbed(ids, t), training)
    assert not torch.allclose(base[:, : t + 1], perturbed[:, : t + 1])


@pytest.mark.parametrize(
    "routing, overrides",
    [
        ("switch", {"capacity_factor": 1.0}),
        ("switch", {"eval_capacity_factor": 0.75, "num_experts_per_tok": 2}),
        ("expert_choice", {"inference_routing": "threshold"}),
        ("expert_choice", {"inference_routing": "expert_choice"}),
    ],
)
def test_evaluation_logits_do_not_depend_on_the_rest_of_the_batch(routing, overrides):
    model = causal_lm(routing, **overrides)
    if routing == "expert_choice":
        learn_thresholds(model)
    model.eval()
    ids = torch.randint(3, VOCAB, (4, 12))
    with torch.no_grad():
        together = model(ids).logits
        alone = torch.cat([model(ids[i : i + 1]).logits for i in range(4)])
        shuffled = model(ids.flip(0)).logits.flip(0)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together, shuffled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize(
    "routing, overrides",
    [
        ("switch", {"norm_topk_prob": True, "num_experts_per_tok": 2, "eval_capacity_factor": None}),
        ("switch", {"norm_topk_prob": True, "num_experts_per_tok": 1, "eval_capacity_factor": None}),
        ("expert_choice", {"inference_routing": "threshold"}),  # untrained thresholds: all experts, weights sum 1
    ],
)
def test_experts_copied_from_the_dense_mlp_compute_the_dense_function(model_type, routing, overrides):
    dense = AutoModelForCausalLM.from_config(dense_config(model_type)).eval()
    moe = causal_lm(routing, model_type, moe_layers="all", **overrides).eval()
    copy_dense_into_experts(moe, dense)
    ids = torch.randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        difference = (moe(ids).logits - dense(ids).logits).abs().max()
    assert difference <= 1e-5
    if routing == "switch":  # and without renormalisation the function changes (raw gate ~ 1/E)
        moe.config.norm_topk_prob = False
        for block in moe.moe_blocks():
            block.router.norm_topk_prob = False
        with torch.no_grad():
            assert (moe(ids).logits - dense(ids).logits).abs().max() > 1e-3


def test_losses_at_initialisation_match_reference_values():
    # Router std 0.02, logits ~ 0: z-loss ~ (ln E)^2 and load balancing ~ 1 (our convention: 1 at balance).
    model = causal_lm(num_experts=8, moe_layers="all", router_init_std=0.02).eval()
    out = model(torch.randint(3, VOCAB, (4, 32)))
    assert out.z_loss.item() == pytest.approx(math.log(8) ** 2, rel=0.02)
    assert out.aux_loss.item() == pytest.approx(1.0, abs=0.05)
    assert out.expert_load.shape == (4, 8)
    torch.testing.assert_close(out.expert_load.sum(-1), torch.ones(4))


def test_loss_is_task_loss_plus_weighted_router_losses_when_labels_are_given():
    model = causal_lm(router_aux_loss_coef=0.1, router_z_loss_coef=0.01, output_router_logits=False).train()
    ids = torch.randint(3, VOCAB, (2, 12))
    torch.manual_seed(3)
    out = model(ids, labels=ids)
    task = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task + 0.1 * out.aux_loss + 0.01 * out.z_loss)
    assert out.router_logits is None
    assert model(ids).loss is None and model(ids).z_loss is not None  # without labels: reported, not added


def test_padding_tokens_change_neither_loss():
    model = causal_lm(num_experts=8).eval()
    ids = torch.randint(3, VOCAB, (1, 10))
    padded = torch.cat([ids, torch.randint(3, VOCAB, (1, 6))], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    plain, with_padding = model(ids), model(padded, attention_mask=mask)
    torch.testing.assert_close(with_padding.z_loss, plain.z_loss)
    torch.testing.assert_close(with_padding.aux_loss, plain.aux_loss)
    torch.testing.assert_close(with_padding.expert_load, plain.expert_load)
    unmasked = model(padded)  # the same padded batch without a mask does count them
    assert not torch.allclose(unmasked.z_loss, plain.z_loss)


def test_expert_choice_thresholds_are_learned_in_training_and_saved(tmp_path):
    model = causal_lm("expert_choice")
    block = model.moe_blocks()[0]
    assert (block.router.score_thresholds == 0).all()
    learn_thresholds(model)
    learned = block.router.score_thresholds.clone()
    assert (learned > 0).all() and (learned < 1).all()
    model.eval()
    model(torch.randint(3, VOCAB, (2, 8)))
    assert torch.equal(block.router.score_thresholds, learned)  # evaluation does not move them
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.moe_blocks()[0].router.score_thresholds, learned)


def test_heads_choose_their_inference_routing():
    config = hf_moe.ExpertChoiceMoeConfig(text_config=dense_config("llama"), num_experts=4)
    assert AutoModelForCausalLM.from_config(config).moe_blocks()[0].router.inference_routing == "threshold"
    classifier = AutoModelForSequenceClassification.from_config(config)
    assert isinstance(classifier, hf_moe.ExpertChoiceMoeForSequenceClassification)
    assert classifier.moe_blocks()[0].router.inference_routing == "expert_choice"
    config.inference_routing = "threshold"
    assert (
        AutoModelForSequenceClassification.from_config(config).moe_blocks()[0].router.inference_routing == "threshold"
    )


@pytest.mark.parametrize("routing", ["switch", "expert_choice"])
def test_sequence_classification_loss_includes_router_losses(routing):
    config_class = hf_moe.SwitchMoeConfig if routing == "switch" else hf_moe.ExpertChoiceMoeConfig
    config = config_class(text_config=dense_config("llama", num_labels=3), num_experts=4)
    model = AutoModelForSequenceClassification.from_config(config).train()
    ids = torch.randint(3, VOCAB, (2, 10))
    labels = torch.tensor([0, 2])
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 3)
    task = torch.nn.functional.cross_entropy(out.logits, labels)
    routing_loss = config.router_z_loss_coef * out.z_loss
    if routing == "switch":
        routing_loss = routing_loss + config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(out.loss, task + routing_loss)


def test_base_model_returns_hidden_states_and_router_losses():
    config = hf_moe.SwitchMoeConfig(text_config=dense_config("qwen3"), num_experts=4)
    from transformers import AutoModel

    model = AutoModel.from_config(config)
    assert isinstance(model, hf_moe.SwitchMoeModel)
    out = model(torch.randint(3, VOCAB, (2, 10)))
    assert out.last_hidden_state.shape == (2, 10, 32)
    assert out.z_loss > 0 and out.aux_loss > 0


def test_a_backbone_without_a_findable_feed_forward_block_is_named():
    from transformers import AutoConfig

    mamba = AutoConfig.for_model("mamba", vocab_size=50, hidden_size=16, num_hidden_layers=2, state_size=4)
    config = hf_moe.SwitchMoeConfig(text_config=mamba, num_experts=2, moe_layers="all")
    with pytest.raises(ValueError, match=r"model_type 'mamba'.*\['mlp', 'feed_forward', 'ffn'\]"):
        AutoModelForCausalLM.from_config(config)


def test_return_dict_false_gives_the_same_values_as_a_tuple():
    model = causal_lm().eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    as_tuple = model(ids, labels=ids, return_dict=False)
    as_output = model(ids, labels=ids)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.loss)
    torch.testing.assert_close(as_tuple[1], as_output.logits)


def test_routing_statistics_are_skipped_only_when_asked_and_never_with_labels():
    model = causal_lm().eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    skipped = model(ids, output_routing_stats=False)
    assert skipped.z_loss is None and skipped.expert_load is None
    torch.testing.assert_close(skipped.logits, model(ids).logits)
    with_labels = model(ids, labels=ids, output_routing_stats=False)
    assert with_labels.z_loss is not None  # the loss needs them
    # generate() asks for no statistics at each step
    inputs = model.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids))
    assert inputs["output_routing_stats"] is False
