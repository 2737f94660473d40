"""The stack's ports are defined once (esper.transport.config.PORTS); `.env`, `ops/prometheus.yml`
and the Procfile must agree with that table."""

import importlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from esper.cli import UsageError, main
from esper.simic.checkpoint import load_checkpoint, save_checkpoint
from esper.transport.config import HOST_DEFAULT, PORTS, StackEndpoints, endpoint, grpc_target
from esper.transport.trajectories import Spool

REPO = Path(__file__).resolve().parents[2]
METRICS_PORT_OF_JOB = {"nissa_hub": "ESPER_HUB_METRICS_PORT", "tamiyo_server": "ESPER_TAMIYO_METRICS_PORT",
                       "tolaria_worker": "ESPER_WORKER_METRICS_PORT", "karn": "ESPER_KARN_METRICS_PORT",
                       "simic_learner": "ESPER_LEARNER_METRICS_PORT"}


def dotenv() -> dict[str, str]:
    lines = (REPO / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_dotenv_matches_the_defaults():
    env = dotenv()
    assert env["ESPER_HOST"] == HOST_DEFAULT
    assert {name: int(env[name]) for name in PORTS} == {name: default for name, (default, _) in PORTS.items()}


def test_prometheus_scrapes_every_service_on_its_default_port():
    text = (REPO / "ops" / "prometheus.yml").read_text()
    jobs = dict(re.findall(r"job_name:\s*(\w+)\s+static_configs:\s+- targets:\s*\[\"127\.0\.0\.1:(\d+)\"\]", text))
    assert {job: int(port) for job, port in jobs.items()} == {
        job: PORTS[var][0] for job, var in METRICS_PORT_OF_JOB.items()}


def test_procfile_runs_every_service_and_ports_are_distinct():
    procfile = (REPO / "Procfile").read_text()
    for service in ("nissa_hub", "tamiyo_server", "karn", "tolaria_worker", "simic_learner"):
        assert f"python -m services.{service}" in procfile
        assert (REPO / "services" / service / "__main__.py").is_file()
    defaults = [default for default, _ in PORTS.values()]
    assert len(set(defaults)) == len(defaults)


def test_environment_overrides_a_port(monkeypatch):
    monkeypatch.setenv("ESPER_TAMIYO_PORT", "6000")
    assert StackEndpoints.from_env().tamiyo_target == "127.0.0.1:6000"


def test_a_host_that_makes_no_address_is_one_line(monkeypatch, capsys):
    """Read when the command runs, ESPER_HOST still passes the flags' own checks (a policy query had been retried
    as if the server were down, and the TUI had ended in a ZMQError traceback)."""
    monkeypatch.setenv("ESPER_HOST", "bad host")
    for argv in (["policy", "query", "obs.json"], ["tui"]):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == "esper: error: $ESPER_HOST 'bad host': 'tcp://bad host:5561' is " \
                                                  "not a ZeroMQ endpoint (tcp://HOST:PORT)"


def test_an_ipv6_host_makes_addresses_the_flags_accept(monkeypatch):
    monkeypatch.setenv("ESPER_HOST", "::1")
    env = StackEndpoints.from_env()
    assert endpoint(env.tcp(env.hub_pub)) == f"tcp://[::1]:{env.hub_pub}"
    assert grpc_target(env.tamiyo_target) == f"[::1]:{env.tamiyo}"


@pytest.mark.parametrize("name, value", [("ESPER_TAMIYO_PORT", "abc"), ("ESPER_HUB_SUB_PORT", "70000"),
                                         ("ESPER_KARN_METRICS_PORT", "-2")])
def test_a_malformed_port_variable_is_one_line(monkeypatch, capsys, name, value):
    """For `esper` (its stack and bus commands read the ports) and for every service alike; the commands that
    need no stack run (a malformed variable had stopped them all, read as the parser was built)."""
    monkeypatch.setenv(name, value)
    said = f"esper: error: ${name} must be a port number, {-1 if 'METRICS' in name else 0} to 65535, not {value!r}"
    assert main(["stack", "status"]) == 2
    assert capsys.readouterr().err.strip() == said
    if name != "ESPER_KARN_METRICS_PORT":  # what these read
        assert main(["tui"] if name == "ESPER_HUB_SUB_PORT" else ["policy", "query", "obs.json"]) == 2
        assert capsys.readouterr().err.strip() == said
    assert main(["blueprints", "--task", "synthetic"]) == 0


def service(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=env)


def test_a_service_refuses_a_port_it_cannot_take_in_one_line():
    """A port past 65535 (which gRPC had taken modulo 65536, listening elsewhere without a word), a malformed
    ESPER_* variable, and a port another process holds (a second stack): one line each, no traceback."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = str(held.getsockname()[1])
        cases = [
            (service("services.tamiyo_server", "--port", "99999", "--metrics-port", "-1"), 2,
             "argument --port: must be a port number, 0 to 65535, not '99999'"),
            (service("services.nissa_hub", env={**os.environ, "ESPER_HUB_PUB_PORT": "abc"}), 2,
             "nissa_hub: error: $ESPER_HUB_PUB_PORT must be a port number"),
            (service("services.nissa_hub", "--pub-port", taken, "--metrics-port", "-1"), 1,
             "nissa_hub: error: cannot listen: Address already in use"),
            (service("services.tamiyo_server", "--port", taken, "--metrics-port", "-1"), 1,
             "tamiyo_server: error: cannot listen: Failed to bind"),
            (service("services.karn", "--metrics-port", taken), 1, "karn: error: cannot listen: [Errno 98]"),
        ]
    for done, status, needle in cases:
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == status and needle in last and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("name, flag, value, expected", [
    ("nissa_hub", "--retain-runs", "-1", "at least 1"),  # had emptied its run table and crashed at the first event
    ("karn", "--max-runs", "0", "at least 1"),
    ("simic_learner", "--max-policy-lag", "-1", "at least 0"),  # had dropped the current version's statistics
    ("simic_learner", "--republish-s", "0", "at least 0.1"),
    ("simic_learner", "--lr", "nan", "a finite number"),  # had failed inside Adam
    ("simic_learner", "--clip-ratio", "nan", "a finite number"),  # had trained a policy that never moved
    ("tamiyo_server", "--workers", "0", "at least 1"),
    ("tamiyo_server", "--grace-s", "nan", "a finite number"),
    ("tolaria_worker", "--window", "0", "at least 1"),
    ("tolaria_worker", "--resend-s", "-5", "at least 0.1"),
    ("tolaria_worker", "--deadline-s", "inf", "a finite number"),
    ("tolaria_worker", "--deadline-s", "1e308", "at most 3600.0"),  # gRPC's deadline had overflowed: expired at once
    ("tolaria_worker", "--resend-s", "1e300", "at most 3600.0"),  # each had ended in OverflowError
    ("simic_learner", "--republish-s", "1e300", "at most 3600.0"),
    ("tamiyo_server", "--grace-s", "1e308", "at most 3600.0"),
    ("tolaria_worker", "--patience-s", "-1", "at least 0"),
])
def test_a_service_refuses_a_count_or_duration_it_cannot_use_in_one_line(name, flag, value, expected, capsys):
    said = refusal(name, flag, value, capsys)
    assert said.endswith(f"argument {flag}: must be {expected}, got {value}"), said


@pytest.mark.parametrize("name, flag, value", [
    ("tolaria_worker", "--runs-dir", "/proc"), ("tolaria_worker", "--spool-dir", "/proc/spool"),
    ("tolaria_worker", "--telemetry-file", "/proc/t.jsonl"), ("simic_learner", "--runs-dir", "/proc"),
    ("simic_learner", "--save", "/proc/policy.pt"), ("simic_learner", "--summary", "/proc/summary.json"),
    ("karn", "--journal", "/proc/journal.db"),
])
def test_a_service_refuses_an_output_it_cannot_write_in_one_line(name, flag, value, capsys):
    """Each had ended in a traceback when it first wrote there: the worker after its first episode trained.
    /proc takes no new entry, even from root (whom permission bits would not stop)."""
    said = refusal(name, flag, value, capsys)
    assert said.endswith(f"{flag} {value}: nothing can be written in /proc (No such file or directory)"), said


@pytest.mark.parametrize("name, argv", [("tolaria_worker", ["--ppo", "--spool-dir", "spool"]),
                                        ("tolaria_worker", []), ("simic_learner", [])])
def test_a_service_checks_its_outputs_as_it_parses_and_makes_none(name, argv, tmp_path, monkeypatch):
    """The check as the flags are parsed makes no folder: a PPO worker whose spool lies elsewhere writes nothing
    under --runs-dir, and had left an empty runs/ wherever it was started."""
    monkeypatch.chdir(tmp_path)
    importlib.import_module(f"services.{name}.__main__").parse(["--task", "synthetic", *argv])
    assert list(tmp_path.iterdir()) == []


def test_karn_refuses_a_journal_that_is_a_folder(tmp_path, capsys):
    said = refusal("karn", "--journal", str(tmp_path), capsys)
    assert said.endswith(f"--journal {tmp_path} is a folder: name a file"), said


def refusal(name: str, flag: str, value: str, capsys) -> str:
    """What the service's flag parser says to `flag value`: its UsageError, which the service's main says in one
    line, exit 2 (test_every_service_says_a_bad_flag_in_one_line)."""
    parse = importlib.import_module(f"services.{name}.__main__").parse
    with pytest.raises(UsageError) as refused:
        parse([flag, value, *(["--ppo"] if name == "tolaria_worker" else [])])
    return str(refused.value)


@pytest.mark.parametrize("name", sorted(METRICS_PORT_OF_JOB))
@pytest.mark.parametrize("argv, said", [(["--metrics-port", "70000"], "argument --metrics-port: must be a port"),
                                        (["--no-such-flag"], "unrecognized arguments: --no-such-flag")])
def test_every_service_says_a_bad_flag_in_one_line(name, argv, said, capsys):
    """nissa_hub, tamiyo_server and karn had printed argparse's usage block before the error (as
    services/README promises, the others said it in one line). Through the services' `python -m` entry."""
    from esper.transport.lifecycle import run_service

    main = importlib.import_module(f"services.{name}.__main__").main
    assert run_service(name, lambda: main(argv)) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(f"{name}: error: {said}"), err


def test_the_learner_refuses_to_anneal_over_episodes_its_workers_multiply(capsys, tmp_path):
    """Each worker plays --episodes, so with W workers a decay over the learner's --episodes would reach a rate
    of 0 after 1/W of the data and publish unchanged weights from then on, silently. Its --help does not offer
    the flag (it had listed it, from the shared PPO flags); `esper train ppo --help` does."""
    parse = importlib.import_module("services.simic_learner.__main__").parse
    with pytest.raises(UsageError, match="--anneal-lr: the learner cannot know how many episodes"):
        parse(["--anneal-lr"])
    # The entropy bonus's anneal over --episodes likewise (it had ended after 1/W of the data); over episodes
    # given explicitly, which the learner counts over all workers, it is taken.
    anneal = ["--entropy-coef-start", "0.1", "--entropy-coef-end", "0", "--runs-dir", str(tmp_path)]
    with pytest.raises(UsageError, match="give --entropy-anneal-episodes, the episodes of all workers together"):
        parse(anneal)
    assert parse([*anneal, "--entropy-anneal-episodes", "400"])
    # A learner trained so before this refusal restarts as it was (its --save there), with a warning.
    (tmp_path / "simic_learner.pt").write_bytes(b"its checkpoint")
    capsys.readouterr()
    assert parse(anneal)
    assert "simic_learner: warning: --entropy-coef-start/--entropy-coef-end anneal over --episodes" in \
        capsys.readouterr().err
    for show_help in (lambda: parse(["--help"]), lambda: main(["train", "ppo", "--help"])):
        with pytest.raises(SystemExit):
            show_help()
    learner_help, train_help = capsys.readouterr().out.split("usage: esper train ppo")
    assert "--lr" in learner_help and "--anneal-lr" not in learner_help
    assert "--anneal-lr" in train_help


def test_a_restarted_learner_continues_its_save_not_the_checkpoint_it_began_from(tmp_path):
    """--resume starts a learner; started again with the same flags (an .env's), it continues its own --save,
    where its updates and accepted trajectories since are (it had gone back to --resume, dropping them).
    Here --save is torn, so the learner that reads it says so and exits 2; one that read --resume served on."""
    began = tmp_path / "began.pt"
    flags = ["--task", "synthetic", "--max-epochs", "2", "--max-batches", "1", "--n-envs", "1"]
    assert main(["train", "ppo", *flags, "--episodes", "1", "--save", str(began), "--runs-dir", str(tmp_path / "runs"),
                 "--telemetry-level", "off"]) == 0
    save = tmp_path / "learner.pt"
    save.write_bytes(began.read_bytes()[:100])
    learner = service("services.simic_learner", *flags, "--episodes", "4", "--resume", str(began), "--save", str(save),
                      "--port", "0", "--weights-port", "0", "--metrics-port", "-1", "--hub-pub", "")
    assert learner.returncode == 2 and f"cannot resume from {save}:" in learner.stderr, learner.stderr
    assert f"--resume {began} is not read: this learner continues its own --save {save}" in learner.stderr


@pytest.mark.parametrize("damage, why", [("inbox_json", "JSONDecodeError: "),
                                         ("config_json", "KeyError: 'config_json'")])
def test_a_learner_refuses_a_damaged_checkpoint_in_one_line(damage, why, tmp_path):
    """A checkpoint of the right format whose inbox or config is damaged had ended the learner in a traceback
    (exit 1) after it had announced its run; it says so in one line, exit 2, and keeps the file."""
    began = tmp_path / "began.pt"
    flags = ["--task", "synthetic", "--max-epochs", "2", "--max-batches", "1", "--n-envs", "1"]
    assert main(["train", "ppo", *flags, "--episodes", "1", "--save", str(began), "--runs-dir", str(tmp_path / "runs"),
                 "--telemetry-level", "off"]) == 0
    state = load_checkpoint(began)
    state.pop("format")
    save = tmp_path / "learner.pt"
    save_checkpoint(state | {"inbox_json": "{"} if damage == "inbox_json" else
                    {k: v for k, v in state.items() if k != "config_json"}, save)
    kept = save.read_bytes()
    learner = service("services.simic_learner", *flags, "--episodes", "4", "--save", str(save), "--port", "0",
                      "--weights-port", "0", "--metrics-port", "-1", "--hub-pub", "")
    assert learner.returncode == 2 and "Traceback" not in learner.stderr, learner.stderr
    assert f"cannot resume from {save}: {save} cannot be continued ({why}" in learner.stderr, learner.stderr
    assert save.read_bytes() == kept


@pytest.fixture
def hub_stand_in():
    """An endpoint that subscribes to whatever publishes to it, as the hub does, so that a worker attaches at once
    (it waits 10 s for a hub that is not there). Polled, as the hub's loop polls: ZeroMQ attaches a new peer, and
    sends it the subscription, only when the socket's own thread touches it."""
    ctx = zmq.Context()
    hub = ctx.socket(zmq.XSUB)
    port = hub.bind_to_random_port("tcp://127.0.0.1")
    hub.send(b"\x01")
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            if hub.poll(50):
                hub.recv_multipart()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{port}"
    done.set()
    thread.join(5)
    hub.close(linger=0)
    ctx.term()


@pytest.mark.parametrize("ppo", [[], ["--ppo"]])
def test_a_worker_without_its_data_says_so_in_one_line(ppo, tmp_path, hub_stand_in):
    """Missing CIFAR-10 had ended either kind of worker in a DataError traceback; it is one logged line, as
    `esper train` prints it."""
    worker = service("services.tolaria_worker", *ppo, "--task", "cifar10", "--data-dir", str(tmp_path),
                     "--hub-pub", hub_stand_in, "--metrics-port", "-1", "--runs-dir", str(tmp_path / "runs"),
                     "--exit-when-done")
    assert worker.returncode == 1 and "Traceback" not in worker.stderr, worker.stderr
    assert f"tolaria_worker ERROR no CIFAR-10 data in {tmp_path}" in worker.stderr


def test_a_ppo_worker_refuses_a_spool_of_another_experiment(tmp_path, hub_stand_in):
    """A worker started with new settings and an old --worker-id had gone on from the old experiment's episode
    count (here: played nothing, exit 0, its learner waiting for ever). The spool now records its experiment;
    the same one with more --episodes continues it, and a spool with nothing played is anyone's."""
    worker = importlib.import_module("services.tolaria_worker.__main__")
    flags = ["--ppo", "--task", "synthetic", "--max-epochs", "2", "--n-envs", "1", "--episodes", "2",
             "--spool-dir", str(tmp_path / "spool"), "--runs-dir", str(tmp_path / "runs")]
    spool = Spool(tmp_path / "spool")
    worker.claim_spool(spool, worker.parse(flags).run.trainer)  # nothing played yet: a new experiment may take it
    worker.claim_spool(spool, worker.parse([*flags, "--max-epochs", "5"]).run.trainer)
    spool.close()
    (tmp_path / "spool" / "progress.json").write_text('{"progress": 2}')  # its two episodes played and acked
    spool = Spool(tmp_path / "spool")
    worker.claim_spool(spool, worker.parse([*flags, "--max-epochs", "5", "--episodes", "4"]).run.trainer)
    assert json.loads((tmp_path / "spool" / "experiment.json").read_text())["episodes"] == 2  # its own, kept
    with pytest.raises(worker.OtherExperiment, match=r"\(env.max_epochs differs\)"):
        worker.claim_spool(spool, worker.parse([*flags, "--max-epochs", "2"]).run.trainer)
    spool.close()
    refused = service("services.tolaria_worker", *flags, "--hub-pub", hub_stand_in, "--metrics-port", "-1",
                      "--exit-when-done")
    assert refused.returncode == 2, refused.stderr
    assert (f"tolaria_worker ERROR {tmp_path / 'spool'} holds the rounds of another experiment (env.max_epochs "
            f"differs): delete it to start afresh, or give this experiment its own --worker-id or --spool-dir"
            ) in refused.stderr


def test_a_ppo_worker_asking_a_server_of_another_policy_says_so_in_one_line(tmp_path, hub_stand_in):
    """A --ppo worker pointed at a tamiyo_server of the heuristic (a real gRPC server here) had ended in a
    ValueError traceback; it logs the one line that says what to start instead, and exits 1."""
    import grpc
    from concurrent import futures

    from esper.leyline import tamiyo_pb2_grpc
    from esper.tamiyo import HeuristicPolicy
    from esper.transport.policy_service import TamiyoServicer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tamiyo_pb2_grpc.add_TamiyoServicer_to_server(TamiyoServicer(HeuristicPolicy()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        worker = service("services.tolaria_worker", "--ppo", "--task", "synthetic", "--max-epochs", "2",
                         "--n-envs", "1", "--episodes", "1", "--tamiyo", f"127.0.0.1:{port}", "--hub-pub",
                         hub_stand_in, "--learner", "tcp://127.0.0.1:1", "--metrics-port", "-1", "--runs-dir",
                         str(tmp_path), "--exit-when-done")
    finally:
        server.stop(None)
    assert worker.returncode == 1 and "Traceback" not in worker.stderr, worker.stderr
    assert ("tolaria_worker ERROR the policy server serves heuristic, not the neural policy: PPO workers need "
            "tamiyo_server --policy neural") in worker.stderr


class Misdecides:
    """A policy server's policy that answers an action the run cannot take, or fails (gRPC's UNKNOWN)."""

    name, version = "misdecides", ""

    def __init__(self, answer: str):
        self.answer = answer

    def decide(self, obs):
        from esper.leyline import Action, Decision, Operation

        if self.answer == "fails":
            raise RuntimeError("a policy's bug")
        action = {"a slot the run lacks": Action(operation=Operation.OPERATION_CULL, slot="nope"),
                  "a blueprint this build lacks": Action(operation=Operation.OPERATION_GERMINATE, slot="mid",
                                                         blueprint=99)}[self.answer]
        return Decision(action=action)


@pytest.mark.parametrize("answer, said", [
    ("a slot the run lacks", "decided an action the run cannot take: unknown or disabled slot 'nope'"),
    ("a blueprint this build lacks", "decided an action the run cannot take: blueprint unknown (99) does not fit"),
    ("fails", "refused the decision: UNKNOWN: Exception calling application: a policy's bug"),
])
def test_a_worker_told_what_it_cannot_do_says_so_in_one_line(answer, said, tmp_path, hub_stand_in):
    """Each had ended the worker in a traceback (IllegalAction, a ValueError naming blueprint 99, gRPC's
    _InactiveRpcError); it logs one line and exits 1, its run left unfinished for a restart to continue."""
    from concurrent import futures

    import grpc

    from esper.leyline import tamiyo_pb2_grpc
    from esper.transport.policy_service import TamiyoServicer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tamiyo_pb2_grpc.add_TamiyoServicer_to_server(TamiyoServicer(Misdecides(answer)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        worker = service("services.tolaria_worker", "--task", "synthetic", "--max-epochs", "2", "--max-batches", "1",
                         "--tamiyo", f"127.0.0.1:{port}", "--hub-pub", hub_stand_in, "--metrics-port", "-1",
                         "--runs-dir", str(tmp_path), "--exit-when-done")
    finally:
        server.stop(None)
    assert worker.returncode == 1 and "Traceback" not in worker.stderr, worker.stderr
    assert f"tolaria_worker ERROR tamiyo at 127.0.0.1:{port} {said}" in worker.stderr, worker.stderr
    (run_dir,) = tmp_path.glob("*_s42")
    assert not (run_dir / "summary.json").exists() and (run_dir / "telemetry.jsonl").is_file()


def test_a_worker_groups_its_episodes_as_esper_train_does(tmp_path):
    """tolaria_worker takes --grouped with esper train's refusals; by default its runs group where esper
    train's do (on CUDA; not here, on the CPU)."""
    parse = importlib.import_module("services.tolaria_worker.__main__").parse
    experiment = ["--task", "synthetic", "--episodes", "2", "--device", "cpu", "--runs-dir", str(tmp_path)]
    assert parse([*experiment, "--grouped"]).run.grouped is True
    assert parse(experiment).run.grouped is False
    with pytest.raises(UsageError, match="--grouped trains CNN hosts .* leave out --precision bf16"):
        parse([*experiment, "--grouped", "--precision", "bf16"])


def test_a_restarted_worker_continues_its_runs_the_way_they_were_trained(tmp_path):
    """The default grouping follows the device (and under --no-cuda-graph the episode count), so a worker
    restarted elsewhere, or on a new version, could find its runs trained the other way: as another config's,
    it had left them unfinished and started every episode anew. With --grouped left out it now continues them
    their own way; --fresh, or the way given, starts anew."""
    parse = importlib.import_module("services.tolaria_worker.__main__").parse
    experiment = ["--task", "synthetic", "--max-epochs", "1", "--max-batches", "1", "--episodes", "2",
                  "--device", "cpu", "--runs-dir", str(tmp_path)]
    assert main(["train", "heuristic", *experiment, "--grouped"]) == 0  # as the worker's default on CUDA would
    assert parse(experiment).run.grouped is True  # the CPU's default is not grouped
    assert parse([*experiment, "--fresh"]).run.grouped is False
    assert parse([*experiment, "--no-grouped"]).run.grouped is False
    assert main(["train", "heuristic", *experiment, "--no-grouped"]) == 0  # runs of both ways: the default's
    assert parse(experiment).run.grouped is False


@pytest.mark.parametrize("name, flag", [("karn", "--hub-sub"), ("karn", "--hub-snapshot"),
                                        ("tamiyo_server", "--learner-weights"), ("tolaria_worker", "--hub-pub"),
                                        ("tolaria_worker", "--learner"), ("simic_learner", "--hub-pub")])
@pytest.mark.parametrize("value", ["foo", "tcp://127.0.0.1:99999", "tcp://127.0.0.1"])
def test_a_service_refuses_a_malformed_endpoint_in_one_line(name, flag, value, capsys):
    """It had ended the service in a ZMQError traceback when it connected."""
    said = refusal(name, flag, value, capsys)
    assert said.endswith(f"argument {flag}: {value!r} is not a ZeroMQ endpoint (tcp://HOST:PORT)"), said


def test_stack_status_reads_what_answers_and_skips_what_is_off(monkeypatch, capsys):
    """A /metrics port that answers with something other than HTTP is DOWN, not a traceback (BadStatusLine
    is no OSError); a switched-off one (-1) is not asked, so a stack without /metrics can be healthy."""
    with socket.socket() as garbage:
        garbage.bind(("127.0.0.1", 0))
        garbage.listen()

        def answer() -> None:
            connection, _ = garbage.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"garbage\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        for name in PORTS:
            if name.endswith("_METRICS_PORT"):
                monkeypatch.setenv(name, "-1")
        monkeypatch.setenv("ESPER_HUB_METRICS_PORT", str(garbage.getsockname()[1]))
        with socket.socket() as closed:  # a port nothing listens on: tamiyo_server is down
            closed.bind(("127.0.0.1", 0))
            monkeypatch.setenv("ESPER_TAMIYO_PORT", str(closed.getsockname()[1]))
        assert main(["stack", "status", "--timeout-s", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "tamiyo_server grpc" in lines[0] and "UNAVAILABLE" in lines[0]
    assert "nissa_hub metrics" in lines[1] and lines[1].endswith("DOWN (not HTTP: BadStatusLine)"), lines


def test_policy_query_of_a_file_that_is_not_text_is_one_line(tmp_path, capsys):
    observation = tmp_path / "obs.json"
    observation.write_bytes(b"\xff\xfe{}")
    assert main(["policy", "query", str(observation)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"esper: error: {observation}: 'utf-8' codec can't decode"), err


@pytest.mark.parametrize("flag, value, said", [
    ("--deadline-s", "nan", "must be a finite number, got nan"),  # had retried forever
    ("--deadline-s", "1e308", "must be at most 3600.0, got 1e308"),  # had expired at once, as if the server were down
    ("--deadline-s", "-1", "must be at least 0.01, got -1"),  # had asked, then said "no answer in -1 s"
    ("--wait-s", "-3", "must be at least 0, got -3"),
    ("--tamiyo", "bad::", "'bad::' is not a gRPC server's HOST:PORT"),  # had been retried as if the server were down
    ("--tamiyo", "127.0.0.1:0", "'127.0.0.1:0' is not a gRPC server's HOST:PORT"),
])
def test_policy_query_refuses_a_flag_it_cannot_use_in_one_line(flag, value, said, tmp_path, capsys):
    observation = tmp_path / "obs.json"
    observation.write_text("{}")
    assert main(["policy", "query", str(observation), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"esper: error: argument {flag}: {said}", err


@pytest.mark.parametrize("value, said", [("0", "must be at least 0.01, got 0"),  # every service had been DOWN
                                         ("nan", "must be a finite number, got nan"), ("inf", "must be a finite "
                                         "number, got inf"), ("1e308", "must be at most 3600.0, got 1e308")])
def test_stack_status_refuses_a_timeout_it_cannot_use_in_one_line(value, said, capsys):
    assert main(["stack", "status", "--timeout-s", value]) == 2  # each had ended in a traceback
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"esper: error: argument --timeout-s: {said}"


@pytest.mark.parametrize("value", ["foo", "127.0.0.1:99999", "127.0.0.1", "tcp://127.0.0.1:50051"])
def test_a_worker_refuses_a_malformed_tamiyo_target_in_one_line(value, capsys):
    said = refusal("tolaria_worker", "--tamiyo", value, capsys)
    assert said.endswith(f"argument --tamiyo: {value!r} is not a gRPC server's HOST:PORT"), said


def test_karn_runs_with_its_metrics_switched_off():
    """-1 is "no /metrics" for every service, karn too (it had taken -1 and died on it in a traceback)."""
    karn = subprocess.Popen([sys.executable, "-m", "services.karn", "--metrics-port", "-1"], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)
        assert karn.poll() is None, karn.stderr.read()
    finally:
        karn.terminate()
        assert karn.wait(30) == 0 and "Traceback" not in karn.stderr.read()


def test_metrics_keeps_a_client_that_hung_up_off_the_services_stderr(capsys):
    """socketserver had printed a ConnectionResetError traceback for a client that sent a long request line
    and hung up before reading the 414; what else a request's thread raises is still printed."""
    from prometheus_client import CollectorRegistry

    from esper.transport.metrics_http import start_metrics

    server = start_metrics("127.0.0.1", 0, registry=CollectorRegistry())
    try:
        for error in (ConnectionResetError("peer"), BrokenPipeError("pipe"), ValueError("a bug")):
            try:
                raise error
            except Exception:
                server.handle_error(None, ("127.0.0.1", 1))
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert "ValueError: a bug" in err and "ConnectionResetError" not in err and "BrokenPipeError" not in err
