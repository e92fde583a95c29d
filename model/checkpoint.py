"""Reads a gpt-oss checkpoint directory in either layout, lazily, by canonical (original-layout) tensor name.

Opening checks everything that the safetensors headers can tell (no tensor data is read): that every file is
complete, that the layout is known, and that every expected tensor is there with its shape and dtype. After
that, `get` reads one tensor, or some of its rows, through a memory map: an expert-parallel shard reads only
its experts and a tensor-parallel shard only its rows. Expert weights come back as the stored MXFP4 bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptoss_serve.model.checkpoint_names import (
    SAFETENSORS_DTYPES, StoredPart, layout_of_name, stored_parts, stored_tensors)
from gptoss_serve.model.config import ModelConfig, load_config

INDEX_FILE_NAME = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a bigger length field means a corrupt file
_MAX_PROBLEMS_SHOWN = 12


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be served; the message names the tensor and the file."""


@dataclasses.dataclass(frozen=True)
class _HeaderEntry:
    file: Path
    shape: tuple[int, ...]
    dtype_tag: str  # safetensors' name, e.g. "BF16"


class CheckpointReader:
    """A validated checkpoint directory whose tensors are read on demand by canonical name."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.directory, self.files = _find_weight_files(self.model_dir)  # where the *.safetensors files are
        self._entries: dict[str, _HeaderEntry] = {}  # stored name -> where and what it is
        for path in self.files:
            for name, entry in _read_header(path).items():
                if name in self._entries:
                    raise CheckpointError(
                        f"tensor {name} is in two files: {self._entries[name].file} and {path}")
                self._entries[name] = entry
        _check_index(self.directory, self._entries)
        self.layout = _detect_layout(self._entries, self.files)
        self.config: ModelConfig = load_config(self.model_dir)
        self._parts = stored_parts(self.config, self.layout)  # canonical name -> stored parts
        self.validate()
        # One handle per file, kept open: safe_open maps the file once and later reads touch only their pages.
        self._handles = {}
        for path in self.files:
            try:
                self._handles[path] = safe_open(path, framework="pt")
            except SafetensorError as e:
                raise CheckpointError(f"{path}: safetensors cannot open it: {e}") from e

    def validate(self) -> None:
        """Every expected tensor is stored with its shape and dtype, and nothing else is (headers only)."""
        expected = stored_tensors(self.config, self.layout)
        problems = []
        for name, part in expected.items():
            entry = self._entries.get(name)
            if entry is None:
                problems.append(f"tensor {_describe(part)} is missing: not in {_describe_files(self.files)}")
                continue
            got_dtype = SAFETENSORS_DTYPES[entry.dtype_tag]
            if entry.shape != part.shape:
                problems.append(
                    f"tensor {_describe(part)} in {entry.file} has shape {list(entry.shape)}, "
                    f"expected {list(part.shape)}")
            if got_dtype != part.dtype:
                problems.append(
                    f"tensor {_describe(part)} in {entry.file} has dtype {entry.dtype_tag} ({got_dtype}), "
                    f"expected {part.dtype}")
        for name, entry in self._entries.items():
            if name not in expected:
                problems.append(f"unexpected tensor {name} in {entry.file}")
        if problems:
            shown = problems[:_MAX_PROBLEMS_SHOWN]
            if len(problems) > len(shown):
                shown.append(f"... and {len(problems) - len(shown)} more")
            raise CheckpointError(
                f"checkpoint {self.directory} ({self.layout} layout) does not match its config "
                f"({self.config.num_hidden_layers} layers, {self.config.num_experts} experts, "
                f"hidden {self.config.hidden_size}):\n  " + "\n  ".join(shown))

    def get(self, canonical_name: str, rows: slice | None = None, trailing: tuple[slice, ...] = ()) -> torch.Tensor:
        """The tensor `canonical_name` (original-layout name), or only rows `rows` of its dim 0, on the CPU;
        `trailing` slices the following dimensions (a shard's columns or MXFP4 block range) while reading.

        In the HF layout a qkv weight or bias is read from whichever of q/k/v hold the rows and concatenated.
        """
        parts = self._parts.get(canonical_name)
        if parts is None:
            raise CheckpointError(
                f"{canonical_name} is not a tensor of the checkpoint in {self.directory} "
                f"(canonical names are the original layout's, e.g. block.0.attn.qkv.weight)")
        row_start, row_stop = _row_range(rows, parts[-1].row_stop, canonical_name)
        pieces = []
        for part in parts:
            start, stop = max(row_start, part.row_start), min(row_stop, part.row_stop)
            if start < stop:
                pieces.append(self._read_rows(part, start - part.row_start, stop - part.row_start, trailing))
        if not pieces:  # an empty selection still has the tensor's trailing shape and dtype
            return self._read_rows(parts[0], 0, 0, trailing)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _read_rows(self, part: StoredPart, start: int, stop: int, trailing: tuple[slice, ...] = ()) -> torch.Tensor:
        handle = self._handles[self._entries[part.stored_name].file]
        if trailing:
            return handle.get_slice(part.stored_name)[(slice(start, stop), *trailing)]
        if start == 0 and stop == part.shape[0]:
            return handle.get_tensor(part.stored_name)
        return handle.get_slice(part.stored_name)[start:stop]

    def close(self) -> None:
        self._handles.clear()  # dropping the handles unmaps the files

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_checkpoint(model_dir: str | Path) -> CheckpointReader:
    return CheckpointReader(model_dir)


def _find_weight_files(model_dir: Path) -> tuple[Path, list[Path]]:
    """The directory holding the weights and its *.safetensors files.

    A hub-style directory has HF files in its root and the original ones in `original/`; the root wins.
    """
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such directory")
    for directory in (model_dir, model_dir / "original"):
        files = sorted(directory.glob("*.safetensors"))
        if files:
            return directory, files
    raise CheckpointError(f"no *.safetensors files in {model_dir} or {model_dir / 'original'}")


def _read_header(path: Path) -> dict[str, _HeaderEntry]:
    """Parses a safetensors header and checks the file holds every byte it promises (reads no data).

    Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
    data; offsets count from the end of the header. Memory-mapping a file cut short can crash or read garbage,
    so a short file is refused here.
    """
    file_size = path.stat().st_size
    with path.open("rb") as f:
        length_field = f.read(8)
        if len(length_field) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: only {file_size} bytes")
        header_size = int.from_bytes(length_field, "little")
        if header_size > min(file_size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path} is not a safetensors file or its header is corrupt: the header length field says "
                f"{header_size} bytes but the file has {file_size}")
        header_bytes = f.read(header_size)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a safetensors file or its header is corrupt: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - header_size
    entries, past_end = {}, []
    for name, info in header.items():
        shape, dtype_tag, (start, end) = _parse_header_entry(path, name, info)
        entries[name] = _HeaderEntry(path, shape, dtype_tag)
        if end > data_size:
            past_end.append((start, name, end))
    if past_end:
        start, name, end = min(past_end)
        raise CheckpointError(
            f"{path} is truncated: tensor {name} needs data bytes [{start}, {end}) but the file has only "
            f"{data_size} data bytes ({file_size} in all); {len(past_end)} tensor(s) are cut off. "
            f"Download or write the file again")
    return entries


def _parse_header_entry(path: Path, name: str, info: object) -> tuple[tuple[int, ...], str, tuple[int, int]]:
    try:
        dtype_tag, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name}: {info!r}") from None
    if dtype_tag not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"tensor {name} in {path} has unsupported dtype {dtype_tag!r}")
    numbers = (*shape, start, end)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in numbers):
        raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name}: {info!r}")
    num_bytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype_tag].itemsize
    if end - start != num_bytes:
        raise CheckpointError(
            f"{path}: corrupt safetensors header: tensor {name} of shape {list(shape)} {dtype_tag} needs "
            f"{num_bytes} bytes but its data_offsets [{start}, {end}) span {end - start}")
    return shape, dtype_tag, (start, end)


def _check_index(directory: Path, entries: dict[str, _HeaderEntry]) -> None:
    """If a shard index is present, every tensor it lists must be in the file it names."""
    index_path = directory / INDEX_FILE_NAME
    if not index_path.is_file():
        return
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        items = list(weight_map.items())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index (need a 'weight_map' object): {e}") from None
    for name, file_name in items:
        path = directory / str(file_name)
        if not path.is_file():
            raise CheckpointError(f"{index_path} puts tensor {name} in {path}, which does not exist")
        entry = entries.get(name)
        if entry is None or entry.file != path:
            found = f"it is in {entry.file}" if entry else "no file has it"
            raise CheckpointError(f"{index_path} puts tensor {name} in {path}, but {found}")


def _detect_layout(entries: dict[str, _HeaderEntry], files: list[Path]) -> str:
    first_name_of_layout: dict[str, str] = {}
    for name in entries:
        layout = layout_of_name(name)
        if layout is not None:
            first_name_of_layout.setdefault(layout, name)
    if len(first_name_of_layout) == 1:
        return next(iter(first_name_of_layout))
    if not first_name_of_layout:
        found = ", ".join(list(entries)[:8]) + (", ..." if len(entries) > 8 else "") or "no tensors at all"
        raise CheckpointError(
            f"unknown checkpoint layout in {_describe_files(files)}: no gpt-oss tensor names "
            f"(original 'block.0.attn.qkv.weight' or HF 'model.layers.0.self_attn.q_proj.weight'); found {found}")
    original, hf = first_name_of_layout["original"], first_name_of_layout["hf"]
    raise CheckpointError(
        f"mixed checkpoint layouts: {original} (original) is in {entries[original].file} but "
        f"{hf} (HF) is in {entries[hf].file}")


def _row_range(rows: slice | None, num_rows: int, canonical_name: str) -> tuple[int, int]:
    if rows is None:
        return 0, num_rows
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise ValueError(f"rows of {canonical_name} must be a contiguous slice, got {rows!r}")
    start, stop, _ = rows.indices(num_rows)
    return start, max(start, stop)


def _describe(part: StoredPart) -> str:
    if part.stored_name == part.canonical_name:
        return part.stored_name
    return f"{part.stored_name} (rows {part.row_start}:{part.row_stop} of {part.canonical_name})"


def _describe_files(files: list[Path]) -> str:
    if len(files) == 1:
        return str(files[0])
    return f"any of the {len(files)} files in {files[0].parent} ({', '.join(p.name for p in files)})"
