"""Building the CUDA library on a machine without a GPU: sources, nvcc, resources, manifest."""

import json
import os
import shutil

import pytest

pytest.importorskip("tvm")

from lean_tvm import build  # noqa: E402
from lean_tvm.schedule_records import SMEM_PER_BLOCK  # noqa: E402
from lean_tvm.spec import AttentionSpec  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


@pytest.fixture(scope="module", params=["sm_90a", "sm_80"])
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    specs = [AttentionSpec("float16", 128, 8), AttentionSpec("bfloat16", 64, 16)]
    manifest = build.build_cuda(request.param, str(out), specs)
    return request.param, out, manifest


@needs_nvcc
def test_library_and_manifest_are_written(built):
    arch, out, manifest = built
    assert (out / f"lean_tvm_{arch}.so").stat().st_size > 100_000
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["arch"] == arch and manifest["tvm_version"].startswith("0.27")
    names = {k["name"] for k in manifest["kernels"]}
    assert {"lean_attention_float16_d128_g8", "lean_attention_bfloat16_d64_g16", "stream_k_gemv_float16",
            "stream_read"} <= names
    assert len(manifest["source_sha256"]) == 64


@needs_nvcc
def test_generated_cuda_has_the_persistent_walk_and_the_flag_protocol(built):
    arch, out, _ = built
    src = (out / f"lean_tvm_{arch}.cu").read_text()
    for needle in ["blockIdx.x", "cp.async.cg.shared.global", "cp.async.wait_group", "ldmatrix.sync.aligned",
                   "movmatrix.sync.aligned.m8n8.trans.b16", "mma.sync.aligned.m16n8k16",
                   "st.release.gpu.global.s32", "ld.acquire.gpu", "__syncthreads_or", "__ballot_sync",
                   "cudaFuncAttributeMaxDynamicSharedMemorySize", "cudaLaunchKernelEx"]:
        assert needle in src, needle


@needs_nvcc
def test_kernels_fit_registers_and_shared_memory(built):
    arch, _, manifest = built
    for k in manifest["kernels"]:
        if k["op"] != "decode_attention":
            continue
        res = k["resources"]
        assert res["registers"] <= 255 and res["spill_bytes"] == 0, (k["name"], res)
        assert res["smem_bytes"] + k["dynamic_smem_bytes"] <= SMEM_PER_BLOCK[arch], k["name"]


def test_missing_nvcc_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    with pytest.raises(build.BuildError, match="nvcc not found"):
        build.build_cuda("sm_90a", str(tmp_path / "out"), [AttentionSpec("float16", 128)])


def test_unknown_arch_is_a_clear_error(tmp_path):
    with pytest.raises(build.BuildError, match="--arch"):
        build.build_cuda("sm_70", str(tmp_path), [AttentionSpec("float16", 128)])


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        build.main(["--help"])
    assert e.value.code == 0 and "--arch" in capsys.readouterr().out
    assert build.main(["--arch", "sm_61", "--out", os.devnull]) == 2
