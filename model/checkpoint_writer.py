"""Random-weight gpt-oss checkpoints in the exact format of the released ones, at any size.

Tensors are drawn one at a time and streamed into safetensors files whose headers are known up front (the
shapes come from the config), so memory stays at about one tensor even for the 65 GB of gpt-oss-120b. Each
tensor has its own generator seeded from (seed, canonical name): the same seed gives the same canonical
tensors in both layouts and whatever the sharding. On another device the generator differs, so
`random_tensors(..., device='cuda')` draws the same distributions but not the same values as the CPU.

The distributions keep a forward pass well behaved: linear weights have std 1/sqrt(fan_in) so activations
keep unit scale layer after layer, biases are small, norm scales near 1, router logits spread over experts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from gptoss_serve.kernels.mxfp4 import E8M0_BIAS, FP4_VALUES, MXFP4_BLOCK_SIZE
from gptoss_serve.model.checkpoint import INDEX_FILE_NAME
from gptoss_serve.model.checkpoint_names import (
    LAYOUTS, SAFETENSORS_DTYPE_TAGS, StoredPart, expected_tensors, stored_parts)
from gptoss_serve.model.config import PRESETS, ModelConfig, preset

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# As on the hub: <|startoftext|>, and the stop tokens <|return|>, <|endoftext|>, <|call|>.
GENERATION_CONFIG = {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}
_PROGRESS_MIN_BYTES = 2**30  # below this a checkpoint writes in seconds and a bar is noise
_BIAS_STD = 0.02
_NORM_SCALE_STD = 0.1


# Random tensors ----------------------------------------------------------------------------------------------
def random_tensors(config: ModelConfig, seed: int = 0,
                   device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) for every tensor of a checkpoint for `config`, in file order, on `device`."""
    for name, (shape, _) in expected_tensors(config).items():
        generator = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
        yield name, _draw(name, shape, generator)


def _mxfp4_exponent_mix(fan_in: int) -> tuple[int, float]:
    """(base exponent e, probability p of e + 1) that give random MXFP4 weights a std of 1/sqrt(fan_in).

    A uniform random nibble has E[v^2] = mean(FP4_VALUES^2) = 8.5625, so the variance is
    8.5625 * 4^e * (1 - p + 4p); e is the largest exponent whose variance stays under 1/fan_in and p fills
    the rest, so the std is exact rather than off by up to sqrt(2) from rounding e.
    """
    nibble_variance = sum(v * v for v in FP4_VALUES) / len(FP4_VALUES)
    target_variance = 1.0 / fan_in
    base = math.floor(math.log(target_variance / nibble_variance, 4))
    shortfall = target_variance / (nibble_variance * 4.0 ** base)  # in [1, 4)
    return base, (shortfall - 1.0) / 3.0


def _tensor_seed(seed: int, canonical_name: str) -> int:
    # Python's hash() changes between processes; a digest does not.
    digest = hashlib.sha256(f"{seed}/{canonical_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed wants a non-negative 63-bit int


def _draw(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    device = generator.device
    if name.endswith(".blocks"):  # [E, out, in/32, 16]: two uniform random FP4 nibbles per byte
        return _uniform_bytes(shape, generator)
    if name.endswith(".scales"):  # [E, out, in/32] E8M0 exponents: e or e + 1 per block
        base, p_next = _mxfp4_exponent_mix(fan_in=shape[-1] * MXFP4_BLOCK_SIZE)
        next_up = torch.rand(shape, generator=generator, device=device) < p_next
        return next_up.to(torch.uint8) + (E8M0_BIAS + base)
    if name.endswith("norm.scale"):
        return _normal(shape, 1.0, _NORM_SCALE_STD, generator)
    if name.endswith("sinks"):  # one logit per query head, of the same order as attention scores
        return _normal(shape, 0.0, 1.0, generator)
    if name.endswith("bias"):
        return _normal(shape, 0.0, _BIAS_STD, generator)
    if name == "embedding.weight":  # unit-scale residual stream
        return _normal(shape, 0.0, 1.0, generator)
    return _normal(shape, 0.0, 1.0 / math.sqrt(shape[-1]), generator)  # [out, in] linear, router included


def _normal(shape: tuple[int, ...], mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.bfloat16, generator=generator, device=generator.device)
    return x.mul_(std).add_(mean)


def _uniform_bytes(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    # Four bytes per 32-bit draw is ~4x faster than drawing bytes one by one; every MXFP4 block is 16 bytes.
    num_words = math.prod(shape) // 4
    words = torch.empty(num_words, dtype=torch.int32, device=generator.device)
    words.random_(-2**31, None, generator=generator)  # all 2^32 values: every byte uniform
    return words.view(torch.uint8).view(shape)


# Files -------------------------------------------------------------------------------------------------------
def write_checkpoint(config: ModelConfig, out_dir: str | Path, layout: str = "original", seed: int = 0,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     show_progress: bool | None = None) -> list[Path]:
    """Writes a random checkpoint and its JSON files into `out_dir`; returns the safetensors files.

    One `model.safetensors` if the tensor data fits in `max_shard_bytes`, else shards (a tensor bigger than
    the limit gets a shard of its own) plus `model.safetensors.index.json`. `show_progress=None` shows a bar
    for checkpoints of 1 GiB and more.
    """
    parts = stored_parts(config, layout)
    shards = _plan_shards([part for group in parts.values() for part in group], max_shard_bytes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob("*.safetensors"))
    if stale:
        raise FileExistsError(f"{out_dir} already holds {stale[0].name}; write into an empty directory")
    paths = [out_dir / _shard_file_name(i, len(shards), layout) for i in range(len(shards))]
    total_bytes = sum(_num_bytes(part) for shard in shards for part in shard)
    show_progress = total_bytes >= _PROGRESS_MIN_BYTES if show_progress is None else show_progress
    tensors = ((part, tensor[part.row_start:part.row_stop])
               for name, tensor in random_tensors(config, seed) for part in parts[name])
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"writing {out_dir}",
              disable=not show_progress) as progress:
        for path, shard in zip(paths, shards):
            _write_safetensors(path, shard, tensors, progress)
    if len(shards) > 1:
        weight_map = {part.stored_name: path.name for path, shard in zip(paths, shards) for part in shard}
        _write_json(out_dir / INDEX_FILE_NAME, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    if layout == "original":
        _write_json(out_dir / "config.json", config.to_original_dict())
        _write_json(out_dir / "dtypes.json", _original_dtype_tags(config))
    else:
        _write_json(out_dir / "config.json", config.to_hf_dict())
        _write_json(out_dir / "generation_config.json", GENERATION_CONFIG)
    return paths


def _plan_shards(parts: list[StoredPart], max_shard_bytes: int) -> list[list[StoredPart]]:
    shards, current, current_bytes = [], [], 0
    for part in parts:
        if current and current_bytes + _num_bytes(part) > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(part)
        current_bytes += _num_bytes(part)
    shards.append(current)
    return shards


def _shard_file_name(index: int, num_shards: int, layout: str) -> str:
    if num_shards == 1:
        return "model.safetensors"
    separator = "--" if layout == "original" else "-"  # upstream's original 120b shards have a double dash
    return f"model{separator}{index + 1:05d}-of-{num_shards:05d}.safetensors"


def _write_safetensors(path: Path, shard: list[StoredPart],
                       tensors: Iterator[tuple[StoredPart, torch.Tensor]], progress: tqdm) -> None:
    """Writes the header for `shard`, then takes its tensors one by one from `tensors` (in the same order)."""
    with path.open("wb") as f:
        f.write(_safetensors_header(shard))
        for _ in shard:
            _, tensor = next(tensors)
            data = tensor.contiguous().view(torch.uint8).numpy()  # the raw little-endian bytes, no copy
            f.write(data.data)
            progress.update(data.nbytes)


def _safetensors_header(shard: list[StoredPart]) -> bytes:
    """The 8-byte little-endian header length, then the JSON header, padded with spaces to 8-byte alignment."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for part in shard:
        end = offset + _num_bytes(part)
        header[part.stored_name] = {
            "dtype": SAFETENSORS_DTYPE_TAGS[part.dtype], "shape": list(part.shape), "data_offsets": [offset, end]}
        offset = end
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    return len(header_bytes).to_bytes(8, "little") + header_bytes


def _num_bytes(part: StoredPart) -> int:
    return math.prod(part.shape) * part.dtype.itemsize


def _original_dtype_tags(config: ModelConfig) -> dict[str, str]:
    """dtypes.json: the logical type of each tensor; the uint8 ones are FP4 nibble pairs or UE8 exponents."""
    tags = {}
    for name, (_, dtype) in expected_tensors(config).items():
        if dtype == torch.uint8:
            tags[name] = "FP4" if name.endswith(".blocks") else "UE8"
        else:
            tags[name] = SAFETENSORS_DTYPE_TAGS[dtype]
    return tags


def _write_json(path: Path, content: object) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


# CLI ---------------------------------------------------------------------------------------------------------
def add_make_checkpoint_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "make-checkpoint", help="write a random-weight checkpoint in the real gpt-oss format",
        description="Write a random-weight gpt-oss checkpoint (real tensor names, shapes, dtypes, MXFP4 experts) "
                    "for tests and benchmarks without downloading the released weights.")
    parser.add_argument("--preset", required=True, choices=list(PRESETS), help="model shape")
    parser.add_argument("--layout", choices=LAYOUTS, default="original",
                        help="original (the hub's original/ folder) or hf (the hub's root)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same tensors in either layout")
    parser.add_argument("--out", type=Path, required=True, help="output directory (must hold no .safetensors)")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9,
                        help="largest shard, in GB of tensor data (default %(default)s)")
    parser.set_defaults(func=run_make_checkpoint)
    return parser


def run_make_checkpoint(args: argparse.Namespace) -> int:
    config = preset(args.preset)
    paths = write_checkpoint(config, args.out, layout=args.layout, seed=args.seed,
                             max_shard_bytes=int(args.max_shard_gb * 1e9))
    size_gb = sum(path.stat().st_size for path in paths) / 1e9
    print(f"wrote {args.preset} ({args.layout} layout, seed {args.seed}) to {args.out}: "
          f"{len(paths)} safetensors file(s), {size_gb:.2f} GB")
    return 0
