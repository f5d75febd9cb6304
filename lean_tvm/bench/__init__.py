"""The benchmark package: LeanAttention against its peers on a GPU, and the tools around it.

It imports the product (``lean_tvm``) and is never imported by it. Commands:

    python -m lean_tvm.bench --quick | --full       the suite (suite.py; shapes in grid.py, systems in
                                                    systems.py, files in report.py, timing in timing.py)
    python -m lean_tvm.bench.libraries --arch ...   the yardstick and TVM's peer kernel (libraries.py)
    python -m lean_tvm.bench.targets DIR            the speed targets, evaluated from a run (targets.py)
    python -m lean_tvm.bench.ncu ...                DRAM throughput and stall reasons under ncu (ncu.py)
    python -m lean_tvm.bench.tune build|measure|select   the schedule knobs (tune.py)
    python -m lean_tvm.bench.hf_generate --out DIR  transformers' generate() tokens/s per attention backend
                                                    (hf_generate.py; needs the hf extra)
"""
