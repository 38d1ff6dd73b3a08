"""Every transformers name hf_moe relies on that is not public API, in one place, each with its reason.

transformers' public API is what its documentation promises: the Auto classes, `PreTrainedModel`,
`PreTrainedConfig`, `GenerationMixin`, `Trainer` and ``transformers.utils`` (file names, `logging`,
`ModelOutput`). Everything below is an internal that a release may move, rename or change, so a
break shows up here first: tests/test_transformers_internals.py checks each entry against the
installed release and fails naming the entry (CI runs it with the lowest and the newest release).

Package code imports these names from this module. ``hf_moe/modeling/`` is copied next to saved
checkpoints and loads with ``trust_remote_code`` where hf_moe is not installed, so it imports the
same names from transformers itself (entries marked "modeling/ imports it too"); the test checks
that those imports are among these entries.
"""

# Initialisation functions that skip tensors loaded from a checkpoint (normal_, zeros_,
# trunc_normal_) and guard_torch_init_functions, under which torch.nn.init calls skip them too:
# MoePreTrainedModel.initialize_weights and GroupedLinear.reset_parameters initialise the routers and
# the stacked experts with them. modeling/ imports it too.
from transformers import initialization

# Declares ``text_config`` of MoeConfig as a nested sub-config with a default model type (added in
# transformers 5.23: the reason for the lower bound). modeling/ imports it too.
from transformers.configuration_utils import SubConfigSpec

# Copies a model's code files next to a checkpoint and writes its ``auto_map``, as save_pretrained
# does for remote-code models: the streaming converter writes checkpoints without save_pretrained.
from transformers.dynamic_module_utils import custom_object_save

# GPT-2's transposed linear layer ([in, out] weights): the experts built from a GPT-2 MLP keep its
# layout, so the upcycled weights are copies. modeling/ imports it too.
from transformers.pytorch_utils import Conv1D

# Parses ``max_shard_size`` ("5GB", "200MB", an int) exactly as save_pretrained does, so the
# converter's --max-shard-size means the same as transformers'.
from transformers.utils.hub import convert_file_size_to_int

# The functions of `initialization` hf_moe calls.
INITIALIZATION_FUNCTIONS = ("normal_", "zeros_", "trunc_normal_", "guard_torch_init_functions")

# Class attributes of PreTrainedModel that hf_moe sets or reads: name -> why.
ATTENTION_FLAG = "modeling/ declares the backbone's attention kernels: the backbone's attention runs unchanged"
MODEL_CLASS_ATTRIBUTES = {
    "_supports_sdpa": ATTENTION_FLAG,
    "_supports_flash_attn": ATTENTION_FLAG,
    "_supports_flex_attn": ATTENTION_FLAG,
    "_supports_attention_backend": ATTENTION_FLAG,
    "_keys_to_ignore_on_load_unexpected": "modeling/: a headless model skips a head's weights when loading; "
    "upcycling/weights.py reads the dense model's to skip the same source tensors",
    "_tp_plan": "modeling/ (MoeDecoder) passes the dense decoder's tensor-parallel plan through",
    "initialize_weights": "modeling/ overrides it to initialise routers and experts after transformers' own pass",
}

# Attributes of a built model: name -> why.
MODEL_INSTANCE_ATTRIBUTES = {
    "all_tied_weights_keys": "upcycling/weights.py and convert.py: tied weights are stored once, so the converter "
    "neither expects nor writes them",
}

# Backbone attribute names: where a dense head keeps its decoder (its base_model_prefix), the
# decoder's list of layers and each layer's feed-forward block. modeling/modeling_moe.py holds
# its own copy (HEAD_DECODER_PREFIXES, LAYER_LIST_NAMES, FEED_FORWARD_NAMES), checked equal to these.
HEAD_DECODER_PREFIXES = ("model", "transformer")  # llama, mistral, qwen2/3, gemma3, phi3, olmo2; gpt2
LAYER_LIST_NAMES = ("layers", "h", "blocks")
FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn")

__all__ = [
    "FEED_FORWARD_NAMES",
    "HEAD_DECODER_PREFIXES",
    "INITIALIZATION_FUNCTIONS",
    "LAYER_LIST_NAMES",
    "MODEL_CLASS_ATTRIBUTES",
    "MODEL_INSTANCE_ATTRIBUTES",
    "Conv1D",
    "SubConfigSpec",
    "convert_file_size_to_int",
    "custom_object_save",
    "initialization",
]
