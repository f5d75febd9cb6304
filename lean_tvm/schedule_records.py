"""Tuned schedule knobs per GPU arch: ``schedules/<arch>.json``, read by the build and the tuner.

A record names the kernel it is for (head_dim, max_group, optionally dtype and kv_dtype) and its
knobs. A kernel without a record gets the defaults, with the pipeline shortened until it fits the
arch's shared memory; an fp8 kernel without one gets another fp8 dtype's record of the same kernel,
else its 16-bit kernel's knobs with twice the stages (and its batch tile cost, unless its record has one).
A record's optional ``batch_knobs`` and ``batch_tile_cost`` (> 0) add a second kernel, the batch
variant, for launches of many tiles (``plan.BATCH_VARIANT_TILES``): its own knobs (e.g. two CTAs
per SM, which overlap one CTA's tile switches with the other's streaming) and a stream-K plan that
charges each tile that cost (``plan.stream_k_edges``). A few long tiles never need it,
and their kernel stays free of the cost arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .spec import KV_DTYPES, AttentionSpec, GpuKnobs

# Shared memory one block may use (opt-in maximum) and one SM holds, bytes.
SMEM_PER_BLOCK = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448, "sm_90a": 232448}
SMEM_PER_SM = {"sm_80": 167936, "sm_86": 102400, "sm_89": 102400, "sm_90": 233472, "sm_90a": 233472}
SMEM_RESERVED_PER_BLOCK = 1024  # the driver's per-CTA reservation
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
            and record.get("dtype", spec.dtype) == spec.dtype and record.get("kv_dtype") == spec.kv_dtype)


def _record(records: list[dict], spec: AttentionSpec) -> dict | None:
    """``spec``'s record; for an fp8 kernel without one, another fp8 cache dtype's record of the
    same kernel (the bytes and the code are the same but for one conversion instruction)."""
    found = next((r for r in records if _matches(r, spec)), None)
    if found is not None or not spec.kv_dtype:
        return found
    return next((r for r in records if r.get("kv_dtype") in KV_DTYPES
                 and _matches(r, dataclasses.replace(spec, kv_dtype=r["kv_dtype"]))), None)


def _fp8_from_16bit(knobs: GpuKnobs | None, spec: AttentionSpec, arch: str) -> GpuKnobs | None:
    """An fp8 kernel without a record of its own: the 16-bit kernel's knobs with twice the
    pipeline stages (the same bytes in flight: a stage holds half as many), if they fit."""
    if knobs is None:
        return None
    doubled = dataclasses.replace(knobs, stages=2 * knobs.stages)
    return doubled if fits(doubled, spec, arch) else knobs


def fits(knobs: GpuKnobs, spec: AttentionSpec, arch: str) -> bool:
    """Within the static and per-block limits, and ``ctas_per_sm`` CTAs fit one SM together."""
    per_cta = knobs.smem_bytes(spec)
    return (knobs.static_smem_bytes(spec) <= STATIC_SMEM_LIMIT
            and per_cta <= SMEM_PER_BLOCK.get(arch, 101376)
            and knobs.ctas_per_sm * (per_cta + SMEM_RESERVED_PER_BLOCK) <= SMEM_PER_SM.get(arch, 102400))


def _fitting(knobs: dict, spec: AttentionSpec, arch: str, refusal: str) -> GpuKnobs:
    """A record's knobs, refused with ``refusal`` (formatted with the kernel's name and the arch)
    if they do not fit the arch's shared memory."""
    made = GpuKnobs(**knobs)
    if not fits(made, spec, arch):
        raise ValueError(refusal.format(name=spec.name, arch=arch) + f": {made}")
    return made


def knobs_for(records: list[dict], spec: AttentionSpec, arch: str) -> GpuKnobs:
    """The record's knobs, else defaults with as many pipeline stages (<= 4) as fit."""
    found = _record(records, spec)
    if found is not None:
        return _fitting(found["knobs"], spec, arch, "schedule record for {name} on {arch} does not fit shared memory")
    if spec.kv_dtype:
        return _fp8_from_16bit(knobs_for(records, dataclasses.replace(spec, kv_dtype=None), arch), spec, arch)
    for stages in (4, 3, 2):
        knobs = GpuKnobs(stages=stages)
        if fits(knobs, spec, arch):
            return knobs
    for max_batch in (512, 256):
        knobs = GpuKnobs(stages=2, max_batch=max_batch)
        if fits(knobs, spec, arch):
            return knobs
    raise ValueError(f"no schedule of {spec.name} fits the shared memory of {arch}")


def batch_knobs(records: list[dict], spec: AttentionSpec, arch: str) -> GpuKnobs | None:
    """The batch variant's knobs of ``spec`` (None: the plain kernel's)."""
    found = _record(records, spec)
    if found is not None:
        if "batch_knobs" not in found:
            return None
        return _fitting(found["batch_knobs"], spec, arch, "batch knobs for {name} on {arch} do not fit shared memory")
    if spec.kv_dtype:
        return _fp8_from_16bit(batch_knobs(records, dataclasses.replace(spec, kv_dtype=None), arch), spec, arch)
    return None


def batch_tile_cost(records: list[dict], spec: AttentionSpec) -> int:
    """The tile cost of ``spec``'s batch variant, 0 for none."""
    found = _record(records, spec)
    if spec.kv_dtype and (found is None or "batch_tile_cost" not in found):  # the 16-bit kernel's
        return batch_tile_cost(records, dataclasses.replace(spec, kv_dtype=None))
    cost = found.get("batch_tile_cost", 0) if found else 0
    if not isinstance(cost, int) or cost < 0:
        raise ValueError(f"schedule record for {spec.name}: batch_tile_cost must be an int >= 0, got {cost!r}")
    return cost


def merge_records(new: list[dict], old: list[dict]) -> list[dict]:
    """``new`` records with each ``batch_tile_cost`` of ``old`` carried over (the tuner re-selects
    knobs but does not measure the tile cost: it comes from an A/B, NOTES.md), then the ``old``
    records of kernels ``new`` does not cover (a tuning run of some head dims keeps the others)."""
    def family(r):
        return r.get("head_dim"), r.get("max_group"), r.get("dtype"), r.get("kv_dtype")

    out = []
    for r in new:
        cost = next((o["batch_tile_cost"] for o in old if "batch_tile_cost" in o and family(o) == family(r)), None)
        out.append(r if cost is None else {**r, "batch_tile_cost": cost})
    covered = {family(r) for r in new}
    return out + [o for o in old if family(o) not in covered]


def record(spec: AttentionSpec, knobs: GpuKnobs, any_dtype: bool = False, **measured) -> dict:
    """A record for ``spec``; with ``any_dtype`` it serves every dtype of that head dim and group."""
    head = ({} if any_dtype else {"dtype": spec.dtype}) | ({"kv_dtype": spec.kv_dtype} if spec.kv_dtype else {})
    return {**head, "head_dim": spec.head_dim, "max_group": spec.max_group, "knobs": dataclasses.asdict(knobs),
            **measured}
