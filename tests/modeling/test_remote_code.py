"""Checkpoints carry their code: a process without hf_moe loads them with trust_remote_code.

The cross-release test saves under the transformers installed here and loads in another Python
environment (``HF_MOE_OTHER_PYTHON``, set by .ci/run to the environment at the other end of the
supported transformers range), so both directions run in CI: lowest -> highest and highest -> lowest.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from backbones import VOCAB, dense_config
from transformers import AutoModelForCausalLM

import hf_moe
from hf_moe.modeling.configuration_moe import HF_MOE_VERSION, MIN_TRANSFORMERS, TESTED_TRANSFORMERS

LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["hf_moe"] = None  # make the installed package unimportable
    import torch
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM
    path, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("hf_moe"), type(model).__module__
    headless = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.load(ids_path)
    with torch.no_grad():
        logits = model(ids).logits
        hidden = headless(ids).last_hidden_state
        cached = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    torch.save(
        {
            "logits": logits,
            "hidden": hidden,
            "generated": cached,
            "tied": tied,
            "class": type(model).__name__,
            "headless_class": type(headless).__name__,
            "transformers": transformers.__version__,
        },
        out_path,
    )
    """
)


def load_in_clean_process(python: str, checkpoint, tmp_path) -> dict:
    """Run LOADER on ``checkpoint`` with ``python`` where hf_moe cannot be imported; return what it saved."""
    ids = torch.randint(3, VOCAB, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [python, str(script), str(checkpoint), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"ids": ids, **torch.load(tmp_path / "out.pt")}


def check_loaded(loaded: dict, model, config_class) -> None:
    """The clean process built the head and the headless model from remote code, with our outputs."""
    prefix = config_class.__name__.removesuffix("Config")
    assert loaded["class"] == f"{prefix}ForCausalLM" and loaded["headless_class"] == f"{prefix}Model"
    assert loaded["tied"] == model.config.text_config.tie_word_embeddings
    ids = loaded["ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        generated = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(loaded["logits"], out.logits, rtol=0, atol=1e-5)
    # The headless model reads the decoder out of the head's checkpoint: its output is the
    # head's last hidden state (after the final norm).
    torch.testing.assert_close(loaded["hidden"], out.hidden_states[-1], rtol=0, atol=1e-5)
    assert torch.equal(loaded["generated"], generated)


def save_checkpoint(config_class, model_type, tmp_path):
    # Expert choice: one inference routing for both classes (the headless model defaults to
    # "expert_choice", the causal LM to "threshold"), so their hidden states are comparable.
    routing = {"inference_routing": "threshold"} if config_class is hf_moe.ExpertChoiceMoeConfig else {}
    config = config_class(text_config=dense_config(model_type), num_experts=4, **routing)
    model = AutoModelForCausalLM.from_config(config).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    return model, checkpoint


@pytest.mark.parametrize(
    "config_class, model_type", [(hf_moe.SwitchMoeConfig, "gemma3_text"), (hf_moe.ExpertChoiceMoeConfig, "llama")]
)
def test_saved_checkpoint_loads_with_remote_code_in_a_clean_process(config_class, model_type, tmp_path):
    model, checkpoint = save_checkpoint(config_class, model_type, tmp_path)

    saved = json.loads((checkpoint / "config.json").read_text())
    prefix = config_class.__name__.removesuffix("Config")
    module = config_class.__module__.rpartition(".")[2]  # the routing method's module: switch, expert_choice
    assert saved["auto_map"] == {
        "AutoConfig": f"{module}.{config_class.__name__}",
        "AutoModel": f"{module}.{prefix}Model",
        "AutoModelForCausalLM": f"{module}.{prefix}ForCausalLM",
    }
    assert saved["hf_moe_version"] == HF_MOE_VERSION == hf_moe.__version__
    assert saved["hf_moe_min_transformers"] == MIN_TRANSFORMERS
    assert saved["hf_moe_tested_transformers"] == TESTED_TRANSFORMERS
    for name in (f"{module}.py", "configuration_moe.py", "modeling_moe.py", "routing.py", "experts.py"):
        assert (checkpoint / name).is_file()

    check_loaded(load_in_clean_process(sys.executable, checkpoint, tmp_path), model, config_class)


OTHER_PYTHON = os.environ.get("HF_MOE_OTHER_PYTHON")


@pytest.mark.skipif(
    not OTHER_PYTHON,
    reason="set HF_MOE_OTHER_PYTHON to the python of an environment with another supported transformers "
    "release (.ci/run does)",
)
@pytest.mark.parametrize(
    "config_class, model_type", [(hf_moe.SwitchMoeConfig, "qwen3"), (hf_moe.ExpertChoiceMoeConfig, "gpt2")]
)
def test_checkpoint_code_loads_under_the_other_transformers_release(config_class, model_type, tmp_path):
    model, checkpoint = save_checkpoint(config_class, model_type, tmp_path)
    loaded = load_in_clean_process(OTHER_PYTHON, checkpoint, tmp_path)
    # A different release on the other side, or this test proves nothing about releases.
    assert loaded["transformers"] != transformers.__version__
    check_loaded(loaded, model, config_class)
