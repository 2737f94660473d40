"""TinyStories as next-token windows: read the stories, split them, train the tokenizer, cache both.

Source: every `*.txt` and `*.txt.gz` in the data folder (`--data-dir` or $ESPER_DATA_DIR), in name
order, stories separated by lines holding only `<|endoftext|>`. A story counts when a separator
closes it: text after the last separator is dropped, because the shared sample is a byte range that
cuts its last story mid-sentence. There is no download: missing text is a `DataError` naming the
options.

Split by story, never by window, so no story straddles two splits: a seeded shuffle, then the last
`val_fraction` of the stories validate and the `test_fraction` before them test. The byte-level BPE
tokenizer (`esper.tolaria.tokenizer`) is trained on the training stories only.

Layout (Dataset kind "tokens"): each split is one token stream, every story followed by the
end-of-text id, cut into windows of `context` tokens: x [N, T] int64 and y [N, T] int64, y being the
same tokens one step on. So a batch is (inputs, next tokens) as (images, labels) are, and the
trainer's loss is [B, T, vocab] logits against [B, T] targets. Windows do not overlap (each
validation token is scored exactly once) and cross story boundaries as GPT-2's training does; the
tail shorter than a window is dropped.

Cache (the data folder may be read-only): under the cache dir, keyed by the source files (name, size,
mtime) and every setting that changes the result, the tokenizer as JSON and the three token streams
via torch.save (loaded with weights_only=True). The windows are cut on load, so a change of context
reuses the entry.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from pathlib import Path

import torch

from esper.tolaria.data import (
    DataError,
    Dataset,
    default_cache_dir,
    read_tensor_cache,
    resolve_data_dir,
    write_cache,
)
from esper.tolaria.tokenizer import FORMAT, BPETokenizer

SEPARATOR = re.compile(r"^<\|endoftext\|>[ \t\r]*$", re.MULTILINE)
SPLITS = ("train", "val", "test")


def _options(problem: str) -> str:
    return (
        f"{problem}. Point --data-dir (or ESPER_DATA_DIR) at a folder holding TinyStories text "
        "(*.txt or *.txt.gz, stories separated by <|endoftext|> lines), such as shared/data/tinystories/; "
        "there is no download (the full set is at huggingface.co/datasets/roneneldan/TinyStories)."
    )


def load_tinystories(
    data_dir: str | Path | None,
    *,
    cache_dir: Path | None = None,
    vocab_size: int = 2048,
    context: int = 128,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
) -> Dataset:
    """TinyStories windows of `context` tokens with a BPE tokenizer of `vocab_size` ids (at most)."""
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 < val_fraction, test_fraction and a sum < 1, got {val_fraction}, {test_fraction}")
    folder = resolve_data_dir(data_dir)
    if folder is None:
        raise DataError(_options("no TinyStories folder given"))
    files = sorted(p for p in folder.glob("*.txt*") if p.name.endswith((".txt", ".txt.gz")))
    if not files:
        raise DataError(_options(f"no *.txt or *.txt.gz in {folder}"))

    settings = {"files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
                "vocab_size": vocab_size, "val_fraction": val_fraction, "test_fraction": test_fraction,
                "split_seed": split_seed, "tokenizer": FORMAT}
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    cache_dir = cache_dir or default_cache_dir()
    tokenizer_path = cache_dir / f"tinystories-{key}.tokenizer.json"
    tokens_path = cache_dir / f"tinystories-{key}.tokens.pt"

    tokenizer = _read_tokenizer(tokenizer_path)
    streams = read_tensor_cache(tokens_path, SPLITS) if tokenizer is not None else None
    if streams is None:
        stories = split_stories(read_stories(files), val_fraction, test_fraction, split_seed)
        tokenizer = BPETokenizer.train(stories["train"], vocab_size)
        streams = tuple(token_stream(tokenizer, stories[s]) for s in SPLITS)
        write_cache(tokenizer_path, lambda f: f.write(tokenizer.to_json().encode()))
        write_cache(tokens_path, lambda f: torch.save(dict(zip(SPLITS, streams)), f))

    windows = {}
    for split, stream in zip(SPLITS, streams):
        windows[split] = _windows(stream, context)
        if len(windows[split][0]) == 0:
            raise DataError(_options(f"the {split} split of {folder} is shorter than one window "
                                     f"of {context + 1} tokens"))
    return Dataset(
        "tinystories", *windows["train"], *windows["val"], *windows["test"],
        num_classes=tokenizer.vocab_size, mean=(), std=(), kind="tokens", tokenizer=tokenizer,
    )


def read_stories(files: list[Path]) -> list[str]:
    """Every story closed by a separator, stripped of surrounding whitespace, empty ones dropped.
    Invalid UTF-8 (a byte range may cut a character) becomes U+FFFD."""
    stories = []
    for path in files:
        try:
            raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; EOFError: truncated
            raise DataError(_options(f"could not read {path} ({e})")) from e
        *closed, _unclosed = SEPARATOR.split(raw.decode("utf-8", errors="replace"))
        stories += [s.strip() for s in closed if s.strip()]
    return stories


def split_stories(stories: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded shuffle; the last val_fraction of stories validate, the test_fraction before them test."""
    n = len(stories)
    n_val, n_test = max(1, int(n * val_fraction)), max(1, int(n * test_fraction))
    if n - n_val - n_test < 1:
        raise DataError(_options(f"only {n} complete stories: too few for train, validation and test"))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [stories[i] for i in order]
    n_train = n - n_val - n_test
    return {"train": shuffled[:n_train], "test": shuffled[n_train:n_train + n_test],
            "val": shuffled[n_train + n_test:]}


def token_stream(tokenizer: BPETokenizer, stories: list[str]) -> torch.Tensor:
    """[L] int64: each story's tokens followed by the end-of-text id."""
    ids: list[int] = []
    for story in stories:
        ids += tokenizer.encode(story)
        ids.append(tokenizer.eot)
    return torch.tensor(ids, dtype=torch.int64)


def _windows(stream: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: x [N, T] and y [N, T] = the tokens one step on, N = (L - 1) // T."""
    n = (len(stream) - 1) // context
    x = stream[: n * context].view(n, context)
    y = stream[1 : n * context + 1].view(n, context)
    return x, y


def _read_tokenizer(path: Path) -> BPETokenizer | None:
    """The cached tokenizer, or None when there is none or it is unreadable (then it is rebuilt)."""
    try:
        return BPETokenizer.load(path)
    except (OSError, ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
        return None
