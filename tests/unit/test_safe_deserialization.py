"""No unsafe deserialization anywhere in the tree: no pickle, no recv_pyobj, torch.load only with
weights_only=True, and a torch that has the safe loader by default (>= 2.10)."""

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREES = ("libs", "services", "bench", "tests")


def python_files():
    for tree in TREES:
        for path in (ROOT / tree).rglob("*.py"):
            if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                yield path


def offences(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle") for n in names):
                found.append(f"{path}:{node.lineno}: imports a pickle module")
        if isinstance(node, ast.Attribute) and node.attr in ("recv_pyobj", "send_pyobj"):
            found.append(f"{path}:{node.lineno}: {node.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    return found


def test_the_tree_deserializes_nothing_unsafely():
    files = list(python_files())
    assert len(files) > 50  # the scan really covers the project
    bad = [o for path in files for o in offences(path)]
    assert bad == [], "\n".join(bad)


def test_the_scan_catches_each_offence(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import pickle\nimport torch\nsock.recv_pyobj()\ntorch.load('x')\n"
                      "torch.load('y', weights_only=False)\ntorch.load('z', weights_only=True)\n")
    assert sorted(o.split(": ", 1)[1] for o in offences(sample)) == [
        "imports a pickle module", "recv_pyobj", "torch.load without weights_only=True",
        "torch.load without weights_only=True"]


def test_torch_is_pinned_at_or_above_2_10():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [d for d in deps if re.match(r"torch\b", d) and not d.startswith("torchvision")]
    low = re.search(r">=\s*(\d+)\.(\d+)", torch_req)
    assert low and (int(low[1]), int(low[2])) >= (2, 10), torch_req
