"""Tuned schedule knobs per GPU arch: ``schedules/<arch>.json``, read by the build and the tuner.

A record names the kernel it is for (head_dim, max_group, optionally dtype) and its knobs. A
kernel without a record gets the defaults, with the pipeline shortened until it fits the arch's
shared memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .attention import AttentionSpec, GpuKnobs

# Shared memory one block may use (opt-in maximum), bytes.
SMEM_PER_BLOCK = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448, "sm_90a": 232448}
STATIC_SMEM_LIMIT = 48 * 1024


def records_dir() -> Path:
    return Path(os.environ.get("LEAN_TVM_SCHEDULES", Path(__file__).resolve().parent.parent / "schedules"))


def load_records(arch: str, path: str | None = None) -> list[dict]:
    p = Path(path) if path else records_dir() / f"{arch}.json"
    if not p.exists():
        return []
    with open(p) as f:
        data = json.load(f)
    if data.get("arch") not in (None, arch):
        raise ValueError(f"{p}: records are for {data['arch']}, not {arch}")
    return data.get("records", [])


def _matches(record: dict, spec: AttentionSpec) -> bool:
    return (record.get("head_dim") == spec.head_dim and record.get("max_group") == spec.max_group
            and record.get("dtype", spec.dtype) == spec.dtype)


def fits(knobs: GpuKnobs, spec: AttentionSpec, arch: str) -> bool:
    static = knobs.smem_bytes(spec) - knobs.ring_bytes(spec)
    return static <= STATIC_SMEM_LIMIT and knobs.smem_bytes(spec) <= SMEM_PER_BLOCK.get(arch, 101376)


def knobs_for(records: list[dict], spec: AttentionSpec, arch: str) -> GpuKnobs:
    """The record's knobs, else defaults with as many pipeline stages (<= 4) as fit."""
    for record in records:
        if _matches(record, spec):
            knobs = GpuKnobs(**record["knobs"])
            if not fits(knobs, spec, arch):
                raise ValueError(f"schedule record for {spec.name} on {arch} does not fit shared memory: {knobs}")
            return knobs
    for stages in (4, 3, 2):
        knobs = GpuKnobs(stages=stages)
        if fits(knobs, spec, arch):
            return knobs
    for max_batch in (512, 256):
        knobs = GpuKnobs(stages=2, max_batch=max_batch)
        if fits(knobs, spec, arch):
            return knobs
    raise ValueError(f"no schedule of {spec.name} fits the shared memory of {arch}")


def record(spec: AttentionSpec, knobs: GpuKnobs, **measured) -> dict:
    return {"dtype": spec.dtype, "head_dim": spec.head_dim, "max_group": spec.max_group,
            "knobs": dataclasses.asdict(knobs), **measured}
