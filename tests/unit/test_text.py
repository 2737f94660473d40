"""TinyStories loading (stories, split, windows, cache, errors) and the byte-level BPE tokenizer."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from support import TINYSTORIES_DIR
from esper.cli import main
from esper.tolaria import text
from esper.tolaria.data import DataError, load_task_data
from esper.tolaria.text import load_tinystories
from esper.tolaria.tokenizer import EOT_TEXT, BPETokenizer

N_STORIES = 40
TRICKY = [
    "",
    "Once upon a time, Lily's dog said: \"don't go!\"\n\nThe end.",
    "  leading and trailing spaces   ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "numbers 12345 and 3.14, underscores snake_case__x",
    "curly “quotes” — dashes – and señor, naïve café, 日本語, emoji 🙂",
    f"a literal {EOT_TEXT} inside text",
]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """Tests must not pick up a developer's data or cache directory."""
    monkeypatch.delenv("ESPER_DATA_DIR", raising=False)
    monkeypatch.delenv("ESPER_CACHE_DIR", raising=False)


def story(i: int) -> str:
    """Story i names itself (`Story 7.`), so the split can be read back from decoded text."""
    return (f"Story {i}. Once upon a time, there was a little cat named Tom. Tom liked to play "
            f"with a red ball in the big garden.\nOne day, Tom saw {i % 5} birds. They were happy.")


def write_stories(path: Path, n: int = N_STORIES, tail: str = "Story 999. This one is cut mid-sen") -> None:
    """The shared file's format: stories separated by <|endoftext|> lines (one followed by a line
    holding a space, as in the original), and an unclosed story at the end."""
    body = "".join(f"{story(i)}\n<|endoftext|>\n" + (" \n" if i == 3 else "") for i in range(n)) + tail
    path.write_bytes(gzip.compress(body.encode()) if path.name.endswith(".gz") else body.encode())


def write_truncated_gzip(path: Path) -> None:
    """A download cut short: the first half of a gzip stream."""
    data = gzip.compress("".join(f"{story(i)}\n<|endoftext|>\n" for i in range(10)).encode())
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def stories_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_stories(d / "stories.txt.gz")
    return d


def story_ids(ds, split: str) -> set[int]:
    """Story numbers found in a split's decoded windows."""
    found = ds.tokenizer.decode(getattr(ds, f"{split}_x").flatten().tolist())
    return {int(part.split(".")[0]) for part in found.split("Story ")[1:] if part.split(".")[0].isdigit()}


def load(d: Path, tmp_path: Path, **kwargs):
    return load_tinystories(d, cache_dir=tmp_path / "cache", vocab_size=300, context=8, **kwargs)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_any_text_and_learns_the_requested_merges():
    tok = BPETokenizer.train([story(i) for i in range(20)], vocab_size=300)
    assert len(tok.merges) == 300 - 257 and tok.vocab_size == 300 and tok.eot == 299
    for s in TRICKY + [story(99)]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert all(0 <= i < tok.eot for i in ids)  # encode never produces end-of-text
    assert len(tok.encode(story(1))) < 0.6 * len(story(1).encode())  # merges compress the training text
    assert tok.decode([*tok.encode("The end."), tok.eot]) == f"The end.{EOT_TEXT}"


def test_tokenizer_is_deterministic_and_round_trips_through_json(tmp_path):
    texts = [story(i) for i in range(20)]
    a, b = BPETokenizer.train(texts, 320), BPETokenizer.train(texts, 320)
    assert a.merges == b.merges
    a.save(tmp_path / "tok.json")
    loaded = BPETokenizer.load(tmp_path / "tok.json")
    assert loaded.merges == a.merges and loaded.encode(story(3)) == a.encode(story(3))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else", "merges": []}))
    with pytest.raises(ValueError):
        BPETokenizer.load(tmp_path / "bad.json")


def test_tokenizer_stops_when_no_pair_is_left():
    tok = BPETokenizer.train(["ab ab"], vocab_size=1000)
    assert tok.vocab_size < 1000 and tok.decode(tok.encode("ab ba")) == "ab ba"


# ----------------------------------------------------------------------------- stories and split
def test_split_is_by_story_disjoint_complete_and_seeded(stories_dir, tmp_path):
    """Every closed story lands in exactly one split (the unclosed tail in none); the same seed gives
    the same split, another seed another; 10% validate, 10% test."""
    a = load(stories_dir, tmp_path, split_seed=1)
    ids = {split: story_ids(a, split) for split in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert ids["train"] | ids["val"] | ids["test"] <= set(range(N_STORIES))
    assert len(ids["val"]) >= 3 and len(ids["test"]) >= 3  # 4 stories each, windows may cut one off
    stories = text.read_stories([stories_dir / "stories.txt.gz"])
    assert len(stories) == N_STORIES and all(s.startswith("Story ") for s in stories)
    split = text.split_stories(stories, 0.1, 0.1, seed=1)
    assert [len(split[s]) for s in ("train", "val", "test")] == [32, 4, 4]

    same = load(stories_dir, tmp_path, split_seed=1)
    assert all(torch.equal(getattr(a, k), getattr(same, k)) for k in ("train_x", "val_x", "test_x"))
    other = load(stories_dir, tmp_path, split_seed=2)
    assert story_ids(other, "val") != ids["val"]


def test_windows_are_next_token_pairs_of_one_stream(stories_dir, tmp_path):
    ds = load(stories_dir, tmp_path)
    assert ds.kind == "tokens" and ds.mean == () and ds.num_classes == ds.tokenizer.vocab_size == 300
    assert ds.train_x.shape[1] == 8 and ds.train_x.dtype == torch.int64
    for x, y in ((ds.train_x, ds.train_y), (ds.val_x, ds.val_y), (ds.test_x, ds.test_y)):
        assert x.shape == y.shape
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x one token on ...
        assert torch.equal(y[:-1, -1], x[1:, 0])  # ... across window boundaries too
    stream = torch.cat([ds.train_x.flatten(), ds.train_y[-1, -1:]])
    decoded = ds.tokenizer.decode(stream.tolist())
    assert decoded.count(EOT_TEXT) >= 1 and "Story 999" not in decoded


def test_plain_text_works_and_matches_gzip(tmp_path):
    plain, gz = tmp_path / "plain", tmp_path / "gz"
    plain.mkdir(), gz.mkdir()
    write_stories(plain / "stories.txt")
    write_stories(gz / "stories.txt.gz")
    a, b = load(plain, tmp_path), load(gz, tmp_path)
    assert torch.equal(a.train_x, b.train_x) and a.tokenizer.merges == b.tokenizer.merges


# ----------------------------------------------------------------------------- cache
def test_second_load_comes_from_the_cache(stories_dir, tmp_path, monkeypatch):
    before = sorted(stories_dir.iterdir())
    first = load(stories_dir, tmp_path)
    assert sorted(stories_dir.iterdir()) == before, "the data dir may be read-only: never write there"
    (tok_file,) = (tmp_path / "cache").glob("tinystories-*.tokenizer.json")
    (tokens_file,) = (tmp_path / "cache").glob("tinystories-*.tokens.pt")
    assert json.loads(tok_file.read_text())["merges"] == [list(m) for m in first.tokenizer.merges]
    assert set(torch.load(tokens_file, weights_only=True)) == {"train", "val", "test"}

    def no_work(*args, **kwargs):
        raise AssertionError("trained or read the text again despite the cache")

    monkeypatch.setattr(BPETokenizer, "train", no_work)
    monkeypatch.setattr(text, "read_stories", no_work)
    again = load(stories_dir, tmp_path)
    assert torch.equal(again.train_x, first.train_x) and again.tokenizer.merges == first.tokenizer.merges
    # Another context cuts the same cached streams into other windows.
    assert load_tinystories(stories_dir, cache_dir=tmp_path / "cache", vocab_size=300, context=4).train_x.shape[1] == 4


def test_corrupt_cache_is_rebuilt(stories_dir, tmp_path):
    first = load(stories_dir, tmp_path)
    for f in (tmp_path / "cache").iterdir():
        f.write_bytes(b"garbage")
    again = load(stories_dir, tmp_path)
    assert torch.equal(again.val_x, first.val_x)
    assert BPETokenizer.load(next((tmp_path / "cache").glob("*.tokenizer.json"))).merges == first.tokenizer.merges


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("setup, needle", [
    (lambda d: None, "no TinyStories folder given"),
    (lambda d: d, "no *.txt or *.txt.gz"),
    (lambda d: write_truncated_gzip(d / "cut.txt.gz") or d, "could not read"),
    (lambda d: write_stories(d / "few.txt", n=2) or d, "too few"),
])
def test_missing_or_unusable_data_is_a_data_error_naming_the_options(tmp_path, setup, needle):
    d = tmp_path / "data"
    d.mkdir()
    with pytest.raises(DataError) as info:
        load_tinystories(setup(d), cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert needle in message and "--data-dir" in message and "ESPER_DATA_DIR" in message
    assert not list(tmp_path.glob("cache/*")), "nothing cached from a failed read"


def test_cli_reports_missing_text_with_status_1(tmp_path, capsys):
    code = main(["train", "static", "--task", "tinystories", "--data-dir", str(tmp_path),
                 "--runs-dir", str(tmp_path / "runs")])
    assert code == 1 and "TinyStories" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["static", "ppo"])
def test_text_of_less_than_one_batch_is_one_line_before_any_run_directory(mode, tmp_path, capsys):
    """40 stories make 10 training windows, fewer than a batch of 16: a ValueError traceback at the first
    step had followed, a run directory made for each try."""
    write_stories(tmp_path / "few.txt", n=40)
    code = main(["train", mode, "--task", "tinystories", "--data-dir", str(tmp_path), "--max-epochs", "1",
                 "--max-batches", "1", "--runs-dir", str(tmp_path / "runs")])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"esper: error: {tmp_path}: its training split holds 10 items, fewer than one batch of 16"
    assert not [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]


def test_task_loader_fits_the_data_to_the_host(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(text, "load_tinystories", lambda d, **kw: calls.append((d, kw)) or SimpleNamespace(train_x=[0]))
    load_task_data("tinystories", "some/dir", cache_dir=tmp_path)
    assert calls == [("some/dir", {"cache_dir": tmp_path, "vocab_size": 2048, "context": 128})]


# ----------------------------------------------------------------------------- the shared sample
@pytest.mark.skipif(not any(TINYSTORIES_DIR.glob("*.txt.gz")), reason="no shared data")
def test_shared_sample_loads_into_the_documented_split(tmp_path):
    """SOURCE.md: 2,316 complete stories plus a truncated one; 10% / 10% by story; the tokenizer
    reaches its 2,048 ids and every story round-trips."""
    stories = text.read_stories(sorted(TINYSTORIES_DIR.glob("*.txt.gz")))
    assert len(stories) == 2316 and stories[0].startswith("One day, a little girl named Lily found a needle")
    ds = load_tinystories(TINYSTORIES_DIR, cache_dir=tmp_path / "cache")
    assert ds.num_classes == 2048 and ds.train_x.shape[1] == 128
    assert 3000 < len(ds.train_x) and 350 < len(ds.val_x) and 350 < len(ds.test_x)
    assert all(ds.tokenizer.decode(ds.tokenizer.encode(s)) == s for s in stories[:200])
    assert int(ds.train_x.max()) < 2048 and (ds.train_x == ds.tokenizer.eot).sum() > 1000


@pytest.mark.slow
@pytest.mark.skipif(not any(TINYSTORIES_DIR.glob("*.txt.gz")), reason="no shared data")
def test_train_then_sample_on_the_shared_sample(tmp_path, monkeypatch, capsys):
    """`esper train heuristic --task tinystories` writes a run whose model folder carries the
    tokenizer, and `esper sample` prints that many samples from it."""
    monkeypatch.setenv("ESPER_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["train", "heuristic", "--task", "tinystories", "--data-dir", str(TINYSTORIES_DIR),
                 "--max-epochs", "1", "--max-batches", "2", "--runs-dir", str(tmp_path / "runs")]) == 0
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]  # beside karn.db
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_params"] == 1_071_872 and 6 < summary["val_loss"] < 8  # ln 2048 = 7.6 at init
    assert json.loads((run_dir / "config.json").read_text())["env"]["train"]["optimizer"] == "adamw"
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--num-samples", "2", "--max-tokens", "5", "--prompt", "Once upon"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("Once upon") == 2
    assert main(["sample", str(tmp_path)]) == 2  # not a language-model run
    assert main(["sample", str(run_dir), "--prompt", "a\udcff"]) == 2  # a command line's bytes that are not UTF-8
    assert "--prompt is not UTF-8 text" in capsys.readouterr().err
    # A model folder damaged since: one line naming it (tracebacks before), whichever file it is.
    model = run_dir / "model"
    originals = {path: path.read_bytes() for path in model.iterdir()}
    weights = originals[model / "weights.pt"]
    tokenizer = json.loads(originals[model / "tokenizer.json"])
    nan = {k: v.float().fill_(float("nan")) for k, v in torch.load(model / "weights.pt", weights_only=True).items()}

    def with_merges(merges) -> None:
        (model / "tokenizer.json").write_text(json.dumps(tokenizer | {"merges": merges}))

    for damage, said in ((lambda: (model / "weights.pt").write_bytes(weights[:1000]),
                          " cannot be loaded (ValueError: "),
                         (lambda: (model / "architecture.json").unlink(), " cannot be loaded (FileNotFoundError: "),
                         (lambda: (model / "tokenizer.json").write_text("{"), " cannot be loaded (JSONDecodeError: "),
                         # Each of these had been a traceback, the last two as the samples were drawn.
                         (lambda: with_merges([[5000, 1]]), " cannot be loaded (IndexError: "),
                         (lambda: with_merges(tokenizer["merges"] + [[104, 101]] * 9), ": its tokenizer has 2057 "
                          "tokens, its model 2048: not the tokenizer this model was trained with"),
                         (lambda: torch.save(nan, model / "weights.pt"), " cannot be loaded (ValueError: weights that "
                          "are not finite: ")):
        for path, content in originals.items():
            path.write_bytes(content)
        damage()
        assert main(["sample", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"esper: error: {model}{said}"), err


@pytest.mark.skipif(not any(TINYSTORIES_DIR.glob("*.txt.gz")), reason="no shared data")
def test_ppo_drives_the_language_model_host(tmp_path, monkeypatch):
    """The PPO controller steps the same environment on the transformer host: one update happens."""
    monkeypatch.setenv("ESPER_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["train", "ppo", "--task", "tinystories", "--data-dir", str(TINYSTORIES_DIR), "--episodes", "1",
                 "--n-envs", "1", "--update-every", "1", "--max-epochs", "2", "--max-batches", "1",
                 "--num-workers", "1", "--runs-dir", str(tmp_path / "runs")]) == 0
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]  # beside karn.db
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "tinystories" and summary["updates"] == 1
