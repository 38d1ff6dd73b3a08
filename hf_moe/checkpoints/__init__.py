"""Checkpoint files, with no knowledge of what the model is: the layer every conversion builds on.

- `streaming`: lazy safetensors reading, one tensor at a time, and streamed, sharded writing.
- `sources`: a local folder or Hub snapshot as a source, and the data-file policy (tokenizer and
  generation data travel, code and files linked from outside the source never do).
- `staging`: the output built in a hidden folder and published atomically, stale staging folders
  cleared, disk space checked before writing.
- `units`: sizes and dtypes given as text.

The conversions (`hf_moe.upcycling`) import this package; it imports nothing from them.
"""
