"""Lazy checkpoint reading and streamed, sharded safetensors writing.

The converter never holds a whole model: `CheckpointReader` reads one tensor at a time with plain
file reads (no mmap, whose touched pages would count towards the process' resident memory and
grow with the checkpoint), and `write_sharded_safetensors` writes each shard's header first and
then the tensors' bytes chunk by chunk, so a stacked expert tensor is never materialised either.

safetensors layout (https://github.com/huggingface/safetensors#format): 8-byte little-endian
header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``
padded with spaces, then the tensor bytes, contiguous, offsets relative to the end of the header.
"""

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# A header larger than this is not a real checkpoint header (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


def check_finite(tensor: torch.Tensor, name: str, where) -> torch.Tensor:
    """``tensor``, once checked for nan and inf: a source with them is corrupt or diverged, and the
    conversion would carry them into every copy (and blame itself in its verification)."""
    if tensor.dtype.is_floating_point and tensor.numel() and not _all_finite(tensor):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise ValueError(
            f"Non-finite weights in the source: {name} in {where} has {nan} NaN and {inf} inf of {tensor.numel()} "
            "values. The checkpoint is corrupt or comes from a diverged training run; nothing was converted"
        )
    return tensor


def _all_finite(tensor: torch.Tensor) -> bool:
    """One reduction pass and no temporary the size of the tensor (``isfinite`` makes several, which
    raised the converter's peak memory by 4x a tensor): min and max propagate nan and show inf."""
    try:
        low, high = torch.aminmax(tensor)
    except RuntimeError:  # float8 has no CPU aminmax
        return bool(torch.isfinite(tensor.float()).all())
    return math.isfinite(low.item()) and math.isfinite(high.item())


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * dtype.itemsize


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes sit in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int


class SafetensorsFile:
    """One safetensors file, header parsed and validated up front, tensors read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries = self._read_header()
        self._file = None

    def _corrupt(self, problem: str) -> ValueError:
        return ValueError(f"Corrupt safetensors header in {self.path}: {problem}")

    def _read_header(self) -> dict[str, TensorEntry]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise self._corrupt(f"the file has {size} bytes, fewer than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise self._corrupt(f"header length {header_len} exceeds the file size ({size} bytes)")
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._corrupt(f"the header is not valid JSON ({error})") from None
        if not isinstance(header, dict):
            raise self._corrupt(f"the header must be a JSON object, got {type(header).__name__}")
        data_start = 8 + header_len
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(
                    f"tensor {name!r} needs dtype (one of {sorted(SAFETENSORS_DTYPES)}), shape and data_offsets, "
                    f"got {info!r}"
                ) from None
            if end - begin != tensor_nbytes(shape, dtype) or begin < 0 or data_start + end > size:
                raise self._corrupt(
                    f"tensor {name!r} has data_offsets [{begin}, {end}] that do not fit its shape {list(shape)} "
                    f"and dtype {info['dtype']} inside the {size - data_start} data bytes"
                )
            entries[name] = TensorEntry(dtype, shape, data_start + begin, data_start + end)
        return entries

    def read(self, name: str, row: int | None = None) -> torch.Tensor:
        """The tensor, or only ``tensor[row]`` (its bytes are contiguous: one expert of a stacked weight)."""
        entry = self.entries[name]
        begin, end, shape = entry.begin, entry.end, entry.shape
        if row is not None:
            row_bytes = (end - begin) // shape[0]
            begin, end, shape = begin + row * row_bytes, begin + (row + 1) * row_bytes, shape[1:]
        if end == begin:
            return torch.empty(shape, dtype=entry.dtype)
        if self._file is None:
            self._file = open(self.path, "rb")
        buffer = bytearray(end - begin)
        self._file.seek(begin)
        if self._file.readinto(buffer) != len(buffer):
            raise self._corrupt(f"tensor {name!r} is truncated")
        return torch.frombuffer(buffer, dtype=entry.dtype).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CheckpointReader:
    """The weights of a transformers checkpoint directory, read one tensor at a time.

    Accepts, in this order: a sharded safetensors checkpoint (``model.safetensors.index.json``),
    a single ``model.safetensors``, then ``pytorch_model.bin`` (sharded or not), which is only
    ever read with ``torch.load(weights_only=True, mmap=True)``. Every problem a reader can
    detect up front (missing shard, corrupt header, index naming a tensor its shard lacks) is
    raised on construction, before anything is written.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._safetensors: dict[str, SafetensorsFile] = {}
        self._torch_files: dict[str, dict[str, torch.Tensor]] = {}
        self.location: dict[str, str] = {}  # tensor name -> file name
        if (self.folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
            self._open_indexed(SAFE_WEIGHTS_INDEX_NAME, self._open_safetensors)
        elif (self.folder / SAFE_WEIGHTS_NAME).is_file():
            self._open_safetensors(SAFE_WEIGHTS_NAME)
            self.location = dict.fromkeys(self._safetensors[SAFE_WEIGHTS_NAME].entries, SAFE_WEIGHTS_NAME)
        elif (self.folder / WEIGHTS_INDEX_NAME).is_file():
            self._open_indexed(WEIGHTS_INDEX_NAME, self._open_torch)
        elif (self.folder / WEIGHTS_NAME).is_file():
            self._open_torch(WEIGHTS_NAME)
            self.location = dict.fromkeys(self._torch_files[WEIGHTS_NAME], WEIGHTS_NAME)
        else:
            raise FileNotFoundError(
                f"No weights in {self.folder}: looked for {SAFE_WEIGHTS_INDEX_NAME}, {SAFE_WEIGHTS_NAME}, "
                f"{WEIGHTS_INDEX_NAME} and {WEIGHTS_NAME}"
            )

    def _open_indexed(self, index_name: str, open_file: Callable[[str], None]) -> None:
        index_path = self.folder / index_name
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"Invalid checkpoint index {index_path}: expected JSON with a 'weight_map' object ({error!r})"
            ) from None
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise FileNotFoundError(f"Shard(s) {missing} named in {index_path} do not exist in {self.folder}")
        for file_name in sorted(set(weight_map.values())):
            open_file(file_name)
        for name, file_name in weight_map.items():
            if name not in self._names_in(file_name):
                raise ValueError(f"{index_path} places tensor {name!r} in {file_name}, which does not contain it")
        self.location = dict(weight_map)

    def _open_safetensors(self, file_name: str) -> None:
        self._safetensors[file_name] = SafetensorsFile(self.folder / file_name)

    def _open_torch(self, file_name: str) -> None:
        path = self.folder / file_name
        try:
            self._torch_files[file_name] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # torch raises many types for unreadable or unsafe pickles
            raise ValueError(f"Cannot read {path} with torch.load(weights_only=True): {error}") from None

    def _names_in(self, file_name: str):
        if file_name in self._safetensors:
            return self._safetensors[file_name].entries
        return self._torch_files[file_name]

    @property
    def files(self) -> list[str]:
        return sorted(set(self.location.values()))

    def keys(self) -> list[str]:
        return list(self.location)

    def shape(self, name: str) -> tuple[int, ...]:
        file_name = self.location[name]
        if file_name in self._safetensors:
            return self._safetensors[file_name].entries[name].shape
        return tuple(self._torch_files[file_name][name].shape)

    def dtype(self, name: str) -> torch.dtype:
        file_name = self.location[name]
        if file_name in self._safetensors:
            return self._safetensors[file_name].entries[name].dtype
        return self._torch_files[file_name][name].dtype

    def read(self, name: str, row: int | None = None) -> torch.Tensor:
        """The tensor, or only ``tensor[row]`` read on its own (one expert of a stacked weight);
        nan or inf in it raise a ValueError naming the tensor (`check_finite`)."""
        file_name = self.location[name]
        if file_name in self._safetensors:
            tensor = self._safetensors[file_name].read(name, row)
        else:
            tensor = self._torch_files[file_name][name]
            tensor = (tensor if row is None else tensor[row]).clone()
        return check_finite(tensor, name, self.folder / file_name)

    def close(self) -> None:
        for file in self._safetensors.values():
            file.close()
        self._torch_files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class OutputTensor:
    """One tensor to write: its name, dtype and shape are known before any byte is produced."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


def assign_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Greedy, in order: a shard is closed when the next tensor would push it over the limit
    (a single tensor larger than the limit gets a shard of its own, as in transformers)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def header_bytes(shard: list[OutputTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in shard:
        header[tensor.name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_sharded_safetensors(
    folder: Path,
    tensors: list[OutputTensor],
    produce: Callable[[OutputTensor], Iterable[torch.Tensor]],
    max_shard_size: int,
    progress: bool = True,
) -> list[str]:
    """Write ``tensors`` as safetensors shards (plus an index when there are several).

    ``produce(tensor)`` yields chunks whose concatenation along dim 0 is the tensor (e.g. one
    chunk per expert), each already in ``tensor.dtype``. Only one chunk is alive at a time.
    Returns the written file names.
    """
    shards = assign_shards(tensors, max_shard_size)
    names = (
        [SAFE_WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = sum(t.nbytes for t in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing MoE tensors", disable=not progress or None) as bar:
        for file_name, shard in zip(names, shards, strict=True):
            with open(folder / file_name, "wb") as f:
                f.write(header_bytes(shard))
                for tensor in shard:
                    written = 0
                    for chunk in produce(tensor):
                        data = _raw_bytes(chunk, tensor)
                        f.write(data)
                        written += len(data)
                        bar.update(len(data))
                    if written != tensor.nbytes:
                        raise RuntimeError(f"Produced {written} bytes for {tensor.name}, expected {tensor.nbytes}")
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t.name: file_name for file_name, shard in zip(names, shards, strict=True) for t in shard},
        }
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append(SAFE_WEIGHTS_INDEX_NAME)
    return names


def _raw_bytes(chunk: torch.Tensor, tensor: OutputTensor) -> memoryview:
    if chunk.dtype != tensor.dtype:
        raise RuntimeError(f"Chunk of {tensor.name} has dtype {chunk.dtype}, expected {tensor.dtype}")
    return memoryview(chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def file_sha256(path: Path, chunk_size: int = 1 << 23) -> str:
    """sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
