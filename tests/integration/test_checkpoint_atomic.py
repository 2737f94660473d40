"""Issue 8, promise 3: a process SIGKILLed at random moments while it saves checkpoints leaves the previous
or the new checkpoint, never part of one (simic.checkpoint.save_checkpoint, which PPO runs and episode
checkpoints both use)."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import torch
from esper.simic.checkpoint import load_checkpoint, save_checkpoint
from support import recorded_syncs

FORMAT = "esper.test.atomic/1"
KILLS = 20
PAYLOAD = 2_000_000  # float32 values, 8 MB: a save takes long enough to be hit mid-write


def save_forever(path, saved) -> None:
    """Child: checkpoints i = last + 1, last + 2, ..., each full of its own number; reports each once saved."""
    torch.set_num_threads(1)
    i = load_checkpoint(path, FORMAT)["i"]
    while True:
        i += 1
        save_checkpoint({"i": i, "payload": torch.full((PAYLOAD,), float(i))}, path, FORMAT)
        saved.send(i)


def test_sigkill_during_saves_leaves_the_previous_or_the_new_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    fork = multiprocessing.get_context("fork")  # a real process without re-importing torch each time
    rng = random.Random(0)
    outcomes = {"previous": 0, "new": 0, "mid_write": 0}
    save_checkpoint({"i": 0, "payload": torch.zeros(PAYLOAD)}, path, FORMAT)
    confirmed = 0
    for _ in range(KILLS):
        receive, send = fork.Pipe(duplex=False)
        child = fork.Process(target=save_forever, args=(path, send))
        child.start()
        send.close()
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        try:
            while receive.poll():
                confirmed = receive.recv()
        except EOFError:  # everything the dead child sent has been read
            pass
        receive.close()
        outcomes["mid_write"] += path.with_name(path.name + ".tmp").exists()
        state = load_checkpoint(path, FORMAT)  # raises on a partial file
        assert torch.equal(state["payload"], torch.full((PAYLOAD,), float(state["i"])))
        # The child confirms a save after os.replace: the file holds that one or, killed in between, the next.
        assert state["i"] in (confirmed, confirmed + 1), (state["i"], confirmed)
        outcomes["previous" if state["i"] == confirmed else "new"] += 1
        confirmed = state["i"]
    print(f"{KILLS} SIGKILLs: {outcomes['mid_write']} during a write (temp file left), loaded "
          f"{outcomes['previous']} x the last confirmed checkpoint, {outcomes['new']} x a newer complete one, "
          f"0 partial; {confirmed} checkpoints written in all")
    assert outcomes["previous"] + outcomes["new"] == KILLS
    assert outcomes["mid_write"] > 0, "no kill landed during a write: the test proved nothing"


def test_a_saved_checkpoint_is_on_disk_before_save_returns(tmp_path):
    """The learner acks trajectories once its checkpoint is saved, and workers then delete them: the file is
    fsynced before its rename and the directory after it, so a power cut cannot undo a save that was acked."""
    tmp_path = tmp_path.resolve()  # as /proc/self/fd names it
    path = tmp_path / "checkpoint.pt"
    with recorded_syncs() as calls:
        save_checkpoint({"i": 1}, path, FORMAT)
    assert calls == [("fsync", f"{path}.tmp"), ("replace", str(path)), ("fsync", str(tmp_path))]
    assert load_checkpoint(path, FORMAT)["i"] == 1
