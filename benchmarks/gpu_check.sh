#!/usr/bin/env bash
# The GPU checks in one go (a few minutes on one H100/H200), results written to files:
#
#     bash benchmarks/gpu_check.sh [RESULTS_DIR]      # from the repository root; default: $OUT or ./gpu_results
#
# 1. the modeling tests on CUDA in float32 and bfloat16: save/load round trip, cached generation,
#    exactness of copied experts, causality (tests/modeling/test_on_device.py --device cuda);
# 2. the layer benchmark at the GPU sizes (bf16, 16384 tokens, hidden 2048, intermediate 5632,
#    8 and 64 experts) against the dense reference and transformers' grouped_mm Mixtral block;
# 3. the model benchmark on CUDA: training throughput and decode latency against the dense backbone;
# 4. one short FSDP2 run of the causal-LM recipe under `accelerate launch` (recipes/accelerate/fsdp2.yaml);
# 5. expert parallelism through transformers' DistributedConfig (tests/distributed, test_on_gpus): with two
#    GPUs or more, `ep_size=2, fsdp_size=2` over NCCL; with one, `ep_size=1` in one process; forward,
#    greedy generation and one training step against one CPU process, and the saved checkpoint.
#
# Each step has its own time limit and log; a failing step does not stop the later ones. The last
# lines of summary.txt give each step's exit status (0 = passed; 124 = ran past its limit).
# Python packages newer than the machine's (transformers >= 5.23, huggingface_hub, peft) can be put
# as wheels in .whl/ next to this repository's root; they are installed into /tmp/site first.
set -uo pipefail

RESULTS=${1:-${OUT:-gpu_results}}
mkdir -p "$RESULTS"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # hf_moe runs from this checkout

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__); print(torch.cuda.get_device_name(0))"
} >"$RESULTS/environment.txt" 2>&1
# hf_moe needs the versions pyproject.toml names (transformers >= 5.23, peft 0.21): say so up front.
"$PYTHON" -c "import transformers; v = tuple(int(x) for x in transformers.__version__.split('.')[:2]); \
raise SystemExit(0 if v >= (5, 23) else 'transformers ' + transformers.__version__ + ' < 5.23: carry wheels in .whl/')" \
    2>&1 | tee -a "$RESULTS/summary.txt"

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$RESULTS/summary.txt"
    timeout "$limit" "$@" >"$RESULTS/$name.txt" 2>&1
    local status=$?
    tail -n 3 "$RESULTS/$name.txt" >>"$RESULTS/summary.txt"
    echo "$name exit status: $status" | tee -a "$RESULTS/summary.txt"
}

step tests_cuda 240 "$PYTHON" -m pytest tests/modeling/test_on_device.py --device cuda -q -rs -p no:cacheprovider
step bench_layer_cuda 300 "$PYTHON" benchmarks/bench_layer.py --device cuda --dtype bfloat16 \
    --tokens 16384 --hidden 2048 --intermediate 5632 --experts 8 64
step bench_model_cuda 240 "$PYTHON" benchmarks/bench_model.py --device cuda
step fsdp2_recipe 240 "$PYTHON" -m pytest tests/recipes/test_launch.py -k fsdp2_trains_and_saves -q -rs -p no:cacheprovider
step ep_fsdp_cuda 300 "$PYTHON" -m pytest tests/distributed/test_expert_parallel.py -k on_gpus --device cuda -q -rs \
    -p no:cacheprovider
