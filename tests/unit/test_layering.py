"""The library never needs the network: domain packages import neither zmq nor grpc."""

import subprocess
import sys


def test_domains_do_not_import_wire_libraries():
    code = (
        "import sys\n"
        "import esper.kasmina, esper.tolaria.trainer, esper.tamiyo, esper.simic, esper.nissa, esper.experiment\n"
        "import esper.karn.tui, esper.karn.runs_db, esper.karn.report\n"
        "from argparse import Namespace\n"
        "from esper.karn.dashboard.launch import dashboard_config\n"  # `esper train --dashboard`'s setup
        "dashboard_config(Namespace(dashboard=True, dashboard_host='localhost', dashboard_port=0,\n"
        "                           dashboard_token=None))\n"
        "bad = [m for m in ('zmq', 'grpc') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"wire libraries imported by the library: {out.stdout.strip()}"
