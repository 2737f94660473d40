"""Checkpoints (PPO runs, and episodes of a growth run): written atomically, read with
`torch.load(weights_only=True)` only.

A PPO checkpoint is a dict of tensors and plain Python values (no pickled objects): the network and Adam
state dicts, the normalizers' statistics as tensors, the RNG states as uint8 tensors, the counters, the
resolved config as JSON and the run's history so far. It is written to `<path>.tmp`, flushed to disk
and moved over `<path>` with os.replace (`write_durably`), so a crash leaves either the old checkpoint or
the new one, never half of one. Episode checkpoints (`GrowthEnv.state_dict`) go through the same two functions
under their own format name, with `rng_state()` for every random generator a run draws from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from esper.durable import write_durably
from esper.tamiyo.features import FeatureSpec, RunningMeanStd
from esper.tamiyo.network import ActorCritic, NeuralPolicy

FORMAT = "esper.simic.ppo/1"


class ResumeError(ValueError):
    """--resume names a checkpoint this run cannot continue (another format or another config)."""


@contextmanager
def contents_checked(path: Path | str, use: str = "continued") -> Iterator[None]:
    """Whatever reading the checkpoint at `path` raises inside, as a ResumeError ("<path> cannot be <use>
    (...)"): a file of the right format made or damaged by hand (a key missing, a value of another type, a
    tensor of another shape) is refused in one line, where the reading is done before anything is written."""
    try:
        yield
    except (ResumeError, torch.OutOfMemoryError):
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        why = (str(exc).strip().splitlines() or [""])[0]
        raise ResumeError(f"{path} cannot be {use} ({type(exc).__name__}: {why})") from None


def changed_settings(cfg, saved: dict, may_change: tuple[str, ...]) -> list[str]:
    """The settings in which the config dataclass `cfg` differs from `saved` (the JSON of the config a
    run started with), but those in `may_change`: what resuming with `cfg` would silently change.
    Nested fields are named down to the field ("env.max_epochs"). A setting added since the run was
    saved is no change while `cfg` holds its default (policy_sha256: "" for a run without a policy)."""
    def flat(config) -> dict:
        return _flat(json.loads(json.dumps(dataclasses.asdict(config))))  # tuples -> lists, as saved

    current = flat(cfg)
    saved = flat(type(cfg)()) | _flat(saved)
    return sorted(k for k in current.keys() | saved.keys() if k not in may_change and current.get(k) != saved.get(k))


def _flat(config: dict, prefix: str = "") -> dict:
    """{"env": {"max_epochs": 5}} -> {"env.max_epochs": 5}."""
    out = {}
    for key, value in config.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
    return out


def file_sha256(path: str | Path | None) -> str:
    """A policy file's digest ("" for none): a resume refuses a policy rewritten since (PPO rewrites its
    checkpoint as it trains), which would decide one experiment's episodes with two policies."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


def save_checkpoint(state: dict, path: Path, fmt: str = FORMAT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, lambda f: torch.save({"format": fmt, **state}, f))


def load_checkpoint(path: Path, fmt: str = FORMAT) -> dict:
    """The state save_checkpoint wrote; ResumeError for any file that is not one (a missing file aside)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # whatever torch.load makes of a file that is not a checkpoint at all
        raise ResumeError(f"{path} is not a checkpoint (torch.load: {type(exc).__name__})") from None
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found != fmt:
        raise ResumeError(f"{path} is not an {fmt} checkpoint (format {found!r})")
    return state


def rng_state() -> dict:
    """Python's, numpy's, torch's CPU and every CUDA device's random state, as tensors and plain values."""
    _, keys, pos, has_gauss, cached = np.random.get_state()  # ("MT19937", uint32[624], int, int, float)
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "cached_gaussian": cached}}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def build_network(state: dict) -> tuple[ActorCritic, FeatureSpec]:
    """The network a checkpoint (or the learner's weights message) describes, with its weights. It is built
    on the meta device, shapes only, and takes the state's tensors as its own: a hidden_size the tensors do
    not have is refused by load_state_dict before anything is allocated (built first, 8,000 had cost 37 s
    and 1.2 GB, 65,535 would have cost 34 GB). Weights that are not all finite are refused too: served,
    every decision had failed while the server said SERVING, the last good policy gone."""
    spec = FeatureSpec.from_dict(state["feature_spec"])
    with torch.device("meta"):
        network = ActorCritic(spec.dim, len(spec.slots), len(spec.blueprints), state["hidden_size"])
    network.load_state_dict({name: tensor.to(torch.float32) for name, tensor in state["network"].items()},
                            assign=True)
    if not_finite := [name for name, tensor in network.state_dict().items() if not tensor.isfinite().all()]:
        raise ValueError(f"policy weights that are not finite: {', '.join(not_finite)}")
    return network, spec


def load_policy(path: Path | str, greedy: bool = True, seed: int = 0) -> NeuralPolicy:
    """The trained policy of a checkpoint as a tamiyo Policy (for evaluation and `esper compare`). A
    simic_learner's checkpoint gives its version's observation statistics, those tamiyo_server normalized
    with (obs_stats), not obs_rms, which has gone on with the rows pending since."""
    state = load_checkpoint(Path(path))
    version = state["counters"]["updates"]
    served = dict(state.get("obs_stats", [])).get(version)
    return policy_from_state(state | ({"obs_rms": served} if served is not None else {}), str(version), greedy, seed)


def policy_from_state(state: dict, version: str, greedy: bool = True, seed: int = 0) -> NeuralPolicy:
    """A NeuralPolicy from the policy part of a checkpoint (feature_spec, hidden_size, clip_obs, network,
    obs_rms): what a checkpoint holds and what simic_learner publishes to tamiyo_server."""
    network, spec = build_network(state)
    obs_rms = RunningMeanStd((spec.dim,))
    obs_rms.load(state["obs_rms"])
    if not (isinstance(clip := state["clip_obs"], (int, float)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip_obs {clip!r} is no positive number")
    return NeuralPolicy(network, spec, obs_rms, float(clip), version=version, greedy=greedy, seed=seed)
