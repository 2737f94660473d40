"""Constants the tests share, importable as `support` (pytest puts tests/ on sys.path; a module named
`conftest` is not importable unambiguously once tests/integration/ has its own)."""

from pathlib import Path

from esper.kasmina.hosts import HostSpec

# CI clones the repository next to a copy of shared/; so does every developer checkout.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_DIR = SHARED / "data" / "cifar10"
TINYSTORIES_DIR = SHARED / "data" / "tinystories"

# The tinystories host's shape at a size a test runs in milliseconds: 3 blocks (early, mid, late
# after blocks 0, 1, 2, as on the synthetic CNN), width 32, 2 heads, 64 tokens, 16 positions.
TINY_LM = HostSpec("tiny_lm", "transformer", 64, (32, 32, 32), 64, heads=2, context=16)
