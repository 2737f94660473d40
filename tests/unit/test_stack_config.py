"""The stack's ports are defined once (esper.transport.config.PORTS); `.env`, `ops/prometheus.yml`
and the Procfile must agree with that table."""

import re
from pathlib import Path

from esper.transport.config import HOST_DEFAULT, PORTS, StackEndpoints

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
