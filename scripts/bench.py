"""The benchmark suite from a checkout: python scripts/bench.py --quick (see lean_tvm/bench.py)."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.exit(__import__("lean_tvm.bench", fromlist=["main"]).main())
