"""Build the lean_tvm operator library for a GPU arch: ``python scripts/build_operator.py --arch sm_90a``."""

from lean_tvm.build import main

if __name__ == "__main__":
    raise SystemExit(main())
