"""Checkpoints carry their code: a process without hf_moe loads them with trust_remote_code."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from backbones import VOCAB, dense_config
from transformers import AutoModelForCausalLM

import hf_moe

LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["hf_moe"] = None  # make the installed package unimportable
    import torch
    from transformers import AutoModelForCausalLM
    path, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("hf_moe"), type(model).__module__
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        logits = model(torch.load(ids_path)).logits
    torch.save({"logits": logits, "tied": tied, "class": type(model).__name__}, out_path)
    """
)


@pytest.mark.parametrize(
    "config_class, model_type", [(hf_moe.SwitchMoeConfig, "gemma3_text"), (hf_moe.ExpertChoiceMoeConfig, "llama")]
)
def test_saved_checkpoint_loads_with_remote_code_in_a_clean_process(config_class, model_type, tmp_path):
    config = config_class(text_config=dense_config(model_type), num_experts=4)
    model = AutoModelForCausalLM.from_config(config).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)

    saved = json.loads((checkpoint / "config.json").read_text())
    prefix = config_class.__name__.removesuffix("Config")
    assert saved["auto_map"]["AutoModelForCausalLM"] == f"modeling_moe.{prefix}ForCausalLM"
    assert saved["auto_map"]["AutoConfig"] == f"configuration_moe.{config_class.__name__}"
    for name in ("configuration_moe.py", "modeling_moe.py", "routing.py", "experts.py"):
        assert (checkpoint / name).is_file()

    ids = torch.randint(3, VOCAB, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt")
    assert loaded["class"] == f"{prefix}ForCausalLM"
    assert loaded["tied"] == config.text_config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(loaded["logits"], model(ids).logits, rtol=0, atol=1e-6)
