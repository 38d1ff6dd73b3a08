"""The streamed safetensors writer and the lazy reader agree with the safetensors library."""

import json

import torch
from safetensors.torch import load_file, save_file

from hf_moe.checkpoints.streaming import CheckpointReader, OutputTensor, SafetensorsFile, write_sharded_safetensors

TENSORS = {
    "a.weight": torch.randn(4, 3, 5),
    "b.bf16": torch.randn(7, 2).to(torch.bfloat16),
    "c.count": torch.tensor(3, dtype=torch.int64),  # 0-dim, like threshold_updates
    "d.mask": torch.tensor([True, False, True]),
    "e.empty": torch.zeros(0, 4),
    "f.half": torch.randn(33).half(),
}


def test_sharded_writer_output_reads_back_with_safetensors(tmp_path):
    outputs = [OutputTensor(name, t.dtype, tuple(t.shape)) for name, t in TENSORS.items()]

    def produce(out):  # the first tensor in per-row chunks, as experts are written
        tensor = TENSORS[out.name]
        return list(tensor) if out.name == "a.weight" else [tensor]

    names = write_sharded_safetensors(tmp_path, outputs, produce, max_shard_size=100, progress=False)
    assert names[-1] == "model.safetensors.index.json" and len(names) > 2
    index = json.loads((tmp_path / names[-1]).read_text())
    assert index["metadata"]["total_size"] == sum(o.nbytes for o in outputs)
    loaded = {}
    for name in names[:-1]:
        loaded.update(load_file(tmp_path / name))
    assert set(loaded) == set(TENSORS) == set(index["weight_map"])
    for name, tensor in TENSORS.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with CheckpointReader(tmp_path) as checkpoint:
        assert all(torch.equal(checkpoint.read(name), tensor) for name, tensor in TENSORS.items())


def test_reader_parses_files_written_by_safetensors(tmp_path):
    save_file(TENSORS, tmp_path / "x.safetensors", metadata={"format": "pt"})
    file = SafetensorsFile(tmp_path / "x.safetensors")
    assert {name: (e.dtype, e.shape) for name, e in file.entries.items()} == {
        name: (t.dtype, tuple(t.shape)) for name, t in TENSORS.items()
    }
    assert all(torch.equal(file.read(name), tensor) for name, tensor in TENSORS.items())
    file.close()


def test_read_one_row_of_a_stacked_tensor(tmp_path):
    stacked = torch.randn(4, 3, 5)
    save_file({"experts": stacked, "empty": torch.zeros(2, 0)}, tmp_path / "model.safetensors")
    torch.save({"experts": stacked}, tmp_path / "other.bin")
    with CheckpointReader(tmp_path) as checkpoint:
        assert all(torch.equal(checkpoint.read("experts", row), stacked[row]) for row in range(4))
        assert checkpoint.read("empty", 1).shape == (0,)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "other.bin").rename(tmp_path / "pytorch_model.bin")
    with CheckpointReader(tmp_path) as checkpoint:
        assert torch.equal(checkpoint.read("experts", 2), stacked[2])
