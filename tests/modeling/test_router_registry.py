"""Routing methods live in a registry: a third one, defined only in this file, registers itself (one
`register_routing` call) and runs through the model classes, the Auto classes, `transformers.Trainer`
and ``hf-moe upcycle --routing``; the package names the built-in model types nowhere else; and the
routing leaves the model through its outputs, not through state on the blocks.

The test router: softmax top-k with renormalised gates, dropless, balanced by the importance loss of
Shazeer et al. 2017 ("Outrageously Large Neural Networks", eq. 6): the squared coefficient of
variation of each expert's summed router probability.
"""

import json
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from backbones import VOCAB, dense_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
)

import hf_moe
from hf_moe.cli import main
from hf_moe.modeling import (
    Assignments,
    MoeConfig,
    MoeGenerationMixin,
    MoePreTrainedModel,
    Router,
    RoutingMethod,
    RoutingRecord,
    register_routing,
    registry,
    router_logits_fp32,
    routing_method,
    routing_method_of,
    routing_names,
)
from hf_moe.training.trainers import is_moe_model


class ImportanceMoeConfig(MoeConfig):
    """Token choice, top-k of softmax with renormalised gates, dropless; importance loss."""

    model_type = "importance_moe"

    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.1

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        problems = self._moe_problems()
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts_per_tok must be between 1 and num_experts, got {self.num_experts_per_tok}")
        self._finish(problems)


class ImportanceRouter(Router):
    def __init__(self, hidden_size, config, dtype=None, device=None):
        super().__init__(config.num_experts, hidden_size, dtype, device)
        self.top_k = config.num_experts_per_tok

    def forward(self, hidden, token_mask):
        batch, seq_len, _ = hidden.shape
        logits = router_logits_fp32(hidden, self.weight).view(batch * seq_len, -1)  # (tokens, experts)
        top_probs, top_experts = logits.softmax(-1).topk(self.top_k, dim=-1)  # (tokens, k)
        gates = top_probs / top_probs.sum(-1, keepdim=True) * token_mask.reshape(-1, 1)
        token_idx = torch.arange(batch * seq_len, device=hidden.device).repeat_interleave(self.top_k)
        return RoutingRecord(logits, Assignments(token_idx, top_experts.reshape(-1), gates.reshape(-1)))


def importance_loss(records, valid, config, training):
    """Shazeer et al. 2017 eq. 6: CV(Importance)^2, Importance_i = sum over tokens of p_i; mean over layers."""
    losses = []
    for record in records:
        importance = (record.router_logits.softmax(-1) * valid[:, None]).sum(0)  # (experts,)
        losses.append(importance.var(unbiased=False) / importance.mean().square())
    return torch.stack(losses).mean()


class ImportanceRouting(RoutingMethod):
    name = "importance"
    config_class = ImportanceMoeConfig
    no_native_counterpart = "importance routing is a test router"
    balancing_loss = staticmethod(importance_loss)

    @classmethod
    def make_router(cls, model, hidden_size, dtype, device):
        return ImportanceRouter(hidden_size, model.config, dtype=dtype, device=device)

    @classmethod
    def experts_per_token(cls, config):
        return config.num_experts_per_tok

    @classmethod
    def computes_dense_function(cls, config, model_class):
        return True  # renormalised gates over copies of the dense MLP, dropless

    @classmethod
    def card_summary(cls, config, model_class):
        return f"importance top-{config.num_experts_per_tok} of {config.num_experts}", "dropless"

    @classmethod
    def card_rows(cls, config):
        return [("routing", f"importance top-{config.num_experts_per_tok}")]


class ImportanceMoePreTrainedModel(MoePreTrainedModel):
    config_class = ImportanceMoeConfig
    routing_method = ImportanceRouting


class ImportanceMoeModel(ImportanceMoePreTrainedModel):
    pass


class ImportanceMoeForCausalLM(ImportanceMoePreTrainedModel, MoeGenerationMixin):
    dense_auto_class = AutoModelForCausalLM


class ImportanceMoeForSequenceClassification(ImportanceMoePreTrainedModel):
    dense_auto_class = AutoModelForSequenceClassification


ImportanceRouting.model_classes = (ImportanceMoeModel, ImportanceMoeForCausalLM, ImportanceMoeForSequenceClassification)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The registration, undone after this module so other tests see the built-in methods only."""
    with mock.patch.dict(registry._METHODS):
        register_routing(ImportanceRouting)
        yield


def importance_config(**overrides):
    return ImportanceMoeConfig(text_config=dense_config("llama"), num_experts=4, moe_layers=[1, 3], **overrides)


def test_the_registry_answers_by_name_config_model_and_model_type():
    assert routing_names() == ["switch", "expert_choice", "aux_free", "importance"]
    assert routing_method("importance") is ImportanceRouting
    config = importance_config()
    model = AutoModelForCausalLM.from_config(config)
    for source in (config, model, config.to_dict(), "importance_moe"):
        assert routing_method_of(source) is ImportanceRouting
    assert routing_method_of("llama") is None and routing_method_of(dense_config("llama")) is None
    assert routing_method_of(hf_moe.SwitchMoeConfig(text_config=dense_config("llama"))) is hf_moe.SwitchRouting
    assert is_moe_model(model)
    with pytest.raises(
        ValueError, match=r"routing must be one of \['switch', 'expert_choice', 'aux_free', 'importance'\], got 'x'"
    ):
        routing_method("x")


def test_registering_a_taken_name_or_a_method_without_model_classes_is_refused():
    class Taken(ImportanceRouting):
        name = "switch"

    class Headless(RoutingMethod):
        name = "headless"
        config_class = ImportanceMoeConfig

    with pytest.raises(ValueError, match=r"name 'switch' is taken by SwitchRouting"):
        register_routing(Taken)
    with pytest.raises(
        ValueError, match=r"model_classes must be \(base model, causal LM, sequence classifier\), got None"
    ):
        register_routing(Headless)
    with pytest.raises(TypeError, match="register_routing takes a RoutingMethod subclass, got 'switch'"):
        register_routing("switch")


def test_a_registered_router_builds_through_the_auto_classes_and_round_trips(tmp_path):
    config = importance_config()
    ids = torch.randint(3, VOCAB, (2, 8))
    for auto_class, expected in zip(registry.HEAD_AUTO_CLASSES, ImportanceRouting.model_classes, strict=True):
        model = auto_class.from_config(config)
        assert type(model) is expected
        assert all(isinstance(block.router, ImportanceRouter) for block in model.moe_blocks())
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "importance_moe"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out, again = model(ids), loaded(ids)
    assert torch.equal(out.logits, again.logits)
    assert out.expert_load.shape == (2, 4) and (out.dropped_fraction == 0).all()  # dropless
    assert type(AutoModel.from_pretrained(tmp_path)) is ImportanceMoeModel


def test_its_balancing_loss_reaches_the_loss_with_its_coefficient():
    ids = torch.randint(3, VOCAB, (2, 8))
    model = AutoModelForCausalLM.from_config(importance_config()).train()
    out = model(ids, labels=ids)
    records = [RoutingRecord(logits, None) for logits in model(ids, output_router_logits=True).router_logits]
    torch.testing.assert_close(out.aux_loss, importance_loss(records, torch.ones(16, dtype=torch.bool), None, True))
    model.config.router_aux_loss_coef = 0.0
    without = model(ids, labels=ids).loss
    torch.testing.assert_close(out.loss - without, 0.1 * out.aux_loss)
    assert out.aux_loss > 0


def test_it_trains_through_the_trainer_with_its_losses(tmp_path):
    torch.manual_seed(0)
    config = importance_config(router_aux_loss_coef=10.0)  # the importance loss dominates the router's gradient
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(3, VOCAB, (16, 8))
    data = [{"input_ids": row, "labels": row} for row in ids]
    routers = [block.router.weight.detach().clone() for block in model.moe_blocks()]
    with torch.no_grad():
        before = model(ids).aux_loss
    args = TrainingArguments(
        tmp_path, max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2, report_to=[], use_cpu=True
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    assert all(not torch.equal(r, b.router.weight) for r, b in zip(routers, model.moe_blocks(), strict=True))
    with torch.no_grad():
        after = model.eval()(ids).aux_loss
    assert after < before  # the importance loss in the training loss balanced the routers


def test_hf_moe_upcycle_accepts_the_registered_routing(tmp_path):
    dense = AutoModelForCausalLM.from_config(dense_config("llama"))
    dense.save_pretrained(tmp_path / "dense")
    out = tmp_path / "moe"
    argv = ["upcycle", str(tmp_path / "dense"), str(out), "--routing", "importance", "--num-experts", "4", "--verify"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "importance_moe" and config["upcycling"]["routing"] == "importance"
    assert config["upcycling"]["verification"]["function_preserving"] is True  # verified exact: copies, renormalised
    assert "importance top-2 of 4" in (out / "README.md").read_text()
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(moe) is ImportanceMoeForCausalLM
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense.eval()(ids).logits, rtol=1e-5, atol=1e-5)


# --- the registry is the only place the package names the built-in model types ---

PACKAGE = Path(hf_moe.__file__).parent
ROUTING_MODULES = {"modeling/switch.py", "modeling/expert_choice.py", "modeling/aux_free.py"}


def test_only_the_routing_modules_name_their_model_types():
    built_in = re.compile(r"[\"'](?:switch_moe|expert_choice_moe|aux_free_moe)[\"']")
    naming = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if built_in.search(p.read_text())}
    assert naming == ROUTING_MODULES


# --- routing leaves through the outputs: no state on the blocks ---


def block_state(model) -> dict:
    """Every MoE block's and router's plain attributes (not submodules, parameters or buffers), by id."""
    return {
        (index, part): dict(vars(module))
        for index, block in enumerate(model.moe_blocks())
        for part, module in (("block", block), ("router", block.router))
    }


def test_a_forward_leaves_no_routing_state_on_the_blocks_or_routers():
    config = hf_moe.SwitchMoeConfig(text_config=dense_config("llama"), num_experts=4, moe_layers=[1, 3])
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    state = block_state(model)
    for (index, part), attributes in state.items():
        # The only value the model hands its blocks is the padding mask, an input (see MoeBlock.token_mask).
        values = {k: v for k, v in attributes.items() if not k.startswith("_") and k != "token_mask"}
        leftovers = {k: type(v).__name__ for k, v in values.items() if isinstance(v, (torch.Tensor, RoutingRecord))}
        assert not leftovers, f"{part} of MoE block {index} holds {leftovers} after a forward"
        assert not attributes["_forward_hooks"], f"{part} of MoE block {index} keeps a forward hook"
    model(ids, attention_mask=mask)
    assert block_state(model).keys() == state.keys()
    for key, attributes in block_state(model).items():
        assert attributes.keys() == state[key].keys()  # a forward adds no attribute


@pytest.mark.parametrize("routing", ["switch", "expert_choice"])
def test_routing_records_are_complete_and_recorded_once_under_gradient_checkpointing(routing):
    config = routing_method(routing).config_class(text_config=dense_config("llama"), num_experts=4, moe_layers=[1, 3])
    reference = AutoModelForCausalLM.from_config(config).train()
    model = AutoModelForCausalLM.from_config(config).train()
    model.load_state_dict(reference.state_dict())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.moe_blocks()[0].router.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(3, VOCAB, (2, 8))
    out = model(ids, labels=ids, output_router_logits=True)
    expected = reference(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    expected.loss.backward()
    assert len(calls) == 2  # the forward and the recomputation in the backward pass
    assert len(out.router_logits) == 2
    for name in ("loss", "z_loss", "expert_load", "dropped_fraction"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), msg=name)
    for (name, param), (_, ref) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(param.grad, ref.grad, msg=name)
    if routing == "expert_choice":  # one threshold update per training forward, none in the recomputation
        assert all(block.router.threshold_updates.item() == 1 for block in model.moe_blocks())
