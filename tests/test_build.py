"""Building the CUDA library on a machine without a GPU: sources, nvcc, resources, manifest."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("tvm")

from lean_tvm import build  # noqa: E402
from lean_tvm.bench import grid, libraries, systems, tvm_peer  # noqa: E402
from lean_tvm.schedule_records import SMEM_PER_BLOCK  # noqa: E402
from lean_tvm.spec import AttentionSpec  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


@pytest.fixture(scope="module", params=["sm_90a", pytest.param("sm_80", marks=pytest.mark.slow)])
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    specs = [AttentionSpec("float16", 128, 8), AttentionSpec("bfloat16", 64, 16)]
    manifest = build.build_cuda(request.param, str(out), specs, kv_dtypes=("float8_e4m3fn",))
    return request.param, out, manifest


@needs_nvcc
def test_library_and_manifest_are_written(built):
    arch, out, manifest = built
    assert (out / f"lean_tvm_{arch}.so").stat().st_size > 100_000
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["arch"] == arch and manifest["tvm_version"].startswith("0.27")
    names = {k["name"] for k in manifest["kernels"]}
    assert {"lean_attention_float16_d128_g8", "lean_attention_bfloat16_d64_g16", "stream_k_gemv_float16"} <= names
    assert "stream_read" not in names  # the benchmark's yardstick lives in the benchmark's library
    assert len(manifest["source_sha256"]) == 64
    knobs = {k["name"]: k.get("knobs", {}) for k in manifest["kernels"]}
    assert knobs["lean_attention_float16_d128_g8"]["tile_cost"] == 0
    if arch == "sm_90a":  # its record asks for a batch variant of D128 G8, the other arch has none
        assert knobs["lean_attention_float16_d128_g8_batch"]["tile_cost"] > 0
        assert {k["variant"] for k in manifest["kernels"] if k["op"] == "decode_attention"} == {"plain", "batch"}
    assert ("lean_attention_float16_d128_g8_batch" in names) == (arch == "sm_90a")
    assert "lean_attention_bfloat16_d64_g16_batch" not in names
    fp8 = {k["name"]: k for k in manifest["kernels"] if k.get("kv_dtype")}
    if arch in build.FP8_ARCHS:  # a dense and a paged fp8 kernel per spec, no spills, variants from the records
        specs = ("float16_d128_g8", "bfloat16_d64_g16")
        assert set(fp8) == {f"lean_attention_{s}_kv_e4m3{form}{variant}" for s in specs
                            for form in ("", "_paged") for variant in ("", "_batch")}  # fp8 records: batch knobs
        assert all(k["form"] == ("paged" if "_paged" in n else "dense") and k["kv_dtype"] == "float8_e4m3fn"
                   for n, k in fp8.items())
        assert not any(k["resources"].get("spill_bytes") for k in fp8.values())
    else:  # no cvt.rn.f16x2.e4m3x2 before sm_89
        assert not fp8


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
def test_loader_copies_read_no_shared_memory(built):
    """Every cp.async is an asm with a memory clobber: an operand read from shared memory (the
    tile's length) is loaded again before each copy, 16 shared round trips per step (SASS; B1
    8/1 L32k 21.2 -> 19.4 us once the row count moved to a register)."""
    arch, out, _ = built
    src = (out / f"lean_tvm_{arch}.cu").read_text()
    copies = [line for line in src.splitlines() if "cp_async_cg" in line and "(" in line and "void" not in line]
    assert len(copies) > 16 and "lens_ptr[" in src  # the names this test relies on exist
    assert not [line for line in copies if "lens_ptr[" in line or "cum_ptr[" in line]


@needs_nvcc
def test_kernels_fit_registers_and_shared_memory(built):
    arch, _, manifest = built
    for k in manifest["kernels"]:
        if k["op"] != "decode_attention":
            continue
        res = k["resources"]
        assert res["registers"] <= 255 and res["spill_bytes"] == 0, (k["name"], res)
        assert res["smem_bytes"] + k["dynamic_smem_bytes"] <= SMEM_PER_BLOCK[arch], k["name"]


PEER_VARIANTS = [tvm_peer.Variant(32, 8, 128, "float16"), tvm_peer.Variant(8, 1, 256, "bfloat16")]


@pytest.fixture(scope="module")
def bench_built(tmp_path_factory):
    """The benchmark's library beside (not inside) an operator library: the yardstick and two
    variants of TVM's decode kernel."""
    out = tmp_path_factory.mktemp("bench_lib")
    (out / "manifest.json").write_text(json.dumps({"arch": "sm_90a", "library": "lean_tvm_sm_90a.so", "kernels": []}))
    return out, libraries.build("sm_90a", str(out), with_tvm_peer=True, peer_variants=PEER_VARIANTS)


@needs_nvcc
def test_tvm_peer_compiles_for_sm_90a_through_tvms_pipeline(bench_built):
    out, manifest = bench_built
    assert json.loads((out / "manifest.json").read_text())["kernels"] == []  # the operator's manifest untouched
    assert json.loads((out / libraries.BENCH_MANIFEST).read_text()) == manifest
    entry = manifest[tvm_peer.MANIFEST_KEY]
    assert entry["library"] == "tvm_decode_sm_90a.so" and (out / entry["library"]).stat().st_size > 100_000
    assert manifest["library"] == "lean_bench_sm_90a.so" and [k["name"] for k in manifest["kernels"]] == ["stream_read"]
    assert [k["name"] for k in entry["kernels"]] == [v.name for v in PEER_VARIANTS]
    for k in entry["kernels"]:
        assert k["resources"]["registers"] <= 255 and k["resources"]["spill_bytes"] == 0, k
    src = (out / "tvm_decode_sm_90a.cu").read_text()
    for v in PEER_VARIANTS:  # TVM's ThreadSync (off in our pipeline) puts a barrier before the KV
        body = src.split(f"void __launch_bounds__(512) {v.name}_kernel(")[2]  # loop refills shared memory
        loop = body.split("for (int iterator = 0;")[1]
        assert loop.index("__syncthreads()") < loop.index("pages_ptr["), v.name


@needs_nvcc
def test_bench_kernels_load_with_tvm_ffi_alone_and_serve_the_bench(bench_built):
    out, manifest = bench_built
    names = [v.name for v in PEER_VARIANTS]
    load = ("import sys; sys.modules['tvm'] = None; import tvm_ffi; "
            f"m = tvm_ffi.load_module({str(out / manifest[tvm_peer.MANIFEST_KEY]['library'])!r}); "
            f"s = tvm_ffi.load_module({str(out / manifest['library'])!r}); "
            "print([m[n] for n in sys.argv[1:]], s['stream_read'])")
    res = subprocess.run([sys.executable, "-c", load, *names], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    peer = systems.TvmPeer(libraries.BenchLibrary(out))
    assert not peer.error and callable(peer.kernel(grid.uniform(1, 4096, 32, 8)))
    with pytest.raises(systems.Unsupported, match="no TVM kernel for 64/8"):
        peer.kernel(grid.uniform(1, 4096, 64, 8))


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
    with pytest.raises(SystemExit) as e:
        libraries.main(["--arch", "cpu", "--out", os.devnull])
    assert e.value.code == 2


def test_runtime_picks_the_batch_variant_only_for_many_tiles():
    """Fewer tiles than plan.BATCH_VARIANT_TILES: the plain kernel; more: the batch variant; a
    library without a variant serves both with its one kernel."""
    from lean_tvm import plan, runtime

    def kernel(name, group, batch=False):
        return runtime.KernelInfo(name, "float16", 128, group, 128, 1, 6 if batch else 0, batch=batch)

    lib = runtime.Library.__new__(runtime.Library)
    lib.kernels = [kernel("g8", 8), kernel("g8_batch", 8, True), kernel("g16", 16)]
    many = plan.BATCH_VARIANT_TILES
    assert lib.attention_kernel("float16", 128, 4, tiles=1).name == "g8"
    assert lib.attention_kernel("float16", 128, 8, tiles=many - 1).name == "g8"
    assert lib.attention_kernel("float16", 128, 8, tiles=many).name == "g8_batch"
    assert lib.attention_kernel("float16", 128, 16, tiles=many).name == "g16"
    assert lib.attention_kernel("bfloat16", 128, 8) is None


def test_schedule_records_batch_tile_cost():
    """A record's batch_tile_cost is read, checked, and kept when the tuner rewrites the knobs."""
    from lean_tvm import schedule_records as SR

    spec = AttentionSpec("float16", 128, 8)
    old = [{"head_dim": 128, "max_group": 8, "knobs": {}, "batch_tile_cost": 6},
           {"head_dim": 64, "max_group": 8, "knobs": {}}]
    assert SR.batch_tile_cost(old, spec) == 6
    assert SR.batch_tile_cost(old, AttentionSpec("float16", 64, 8)) == 0
    with pytest.raises(ValueError, match="batch_tile_cost"):
        SR.batch_tile_cost([{"head_dim": 128, "max_group": 8, "batch_tile_cost": -1}], spec)
    new = [{"head_dim": 128, "max_group": 8, "knobs": {"stages": 3}}, {"head_dim": 64, "max_group": 8, "knobs": {}}]
    kept = SR.merge_records(new, old)
    assert kept[0] == {"head_dim": 128, "max_group": 8, "knobs": {"stages": 3}, "batch_tile_cost": 6}
    assert "batch_tile_cost" not in kept[1]
    only_128 = SR.merge_records(new[:1], old)  # a run that tuned D128 keeps the D64 record
    assert [(r["head_dim"], r["knobs"]) for r in only_128] == [(128, {"stages": 3}), (64, {})]


@needs_nvcc
def test_a_gpu_library_serves_decode_attention_without_apache_tvm(built):
    """A serving box has torch and tvm-ffi only: with ``tvm`` unimportable, the library built here
    is found, loaded and called through ``lean_tvm.decode_attention`` (the device is faked as an
    sm_90a GPU: on this CPU machine the call gets as far as the kernel's own argument check,
    which refuses CPU tensors)."""
    arch, out, _ = built
    if arch != "sm_90a":
        pytest.skip("one arch is enough")
    code = f"""
import sys, os
sys.modules["tvm"] = None
os.environ["LEAN_TVM_LIB_DIR"] = {str(out)!r}
import torch, lean_tvm
from lean_tvm import runtime
runtime.device_arch = lambda device: "sm_90a"
runtime.num_sms = lambda device: 132
q = torch.randn(2, 32, 128).half()
k = torch.randn(2, 8, 256, 128).half()
try:
    lean_tvm.decode_attention(q, k, k, torch.tensor([256, 7], dtype=torch.int32))
except ValueError as e:
    assert "device_type" in str(e) and "cuda" in str(e), e
    print("reached the kernel")
print(runtime.library_for(q.device).path.name, [m for m in sys.modules if m.split(".")[0] == "tvm"
                                                and sys.modules[m] is not None])
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "reached the kernel" in res.stdout and "lean_tvm_sm_90a.so []" in res.stdout, res.stdout


@needs_nvcc
def test_launchers_raise_the_shared_memory_limit_once_per_device(built):
    """Every launcher raises its kernel's dynamic shared memory limit once per device
    (build.remember_smem_attribute), not before every launch, and whatever the size: under 48 KB
    of dynamic memory the static memory can still pass the 48 KB that needs no opt-in."""
    arch, out, _ = built
    src = (out / f"lean_tvm_{arch}.cu").read_text()
    sets = src.count("cudaFuncSetAttribute(::")
    assert sets >= 4 and src.count("_smem[cuda_device & 63] = ") == sets and ">= 49152" not in src


@needs_nvcc
def test_stream_k_kernels_launch_programmatically_on_hopper_only(built):
    """On sm_90a every kernel of the library waits for the previous grid before touching memory
    (``griddepcontrol.wait``, compiled in from ``__CUDA_ARCH__ >= 900``) and its launcher sets the
    programmatic-serialization attribute behind the LEAN_TVM_PDL switch; the sm_80 library's
    launchers do not (the instruction does not exist there)."""
    arch, out, manifest = built
    src = (out / f"lean_tvm_{arch}.cu").read_text()
    launches = src.count("tvm_cuda_host_launch(::")
    assert launches == len(manifest["kernels"])
    attrs = src.count("cuda_attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;")
    assert attrs == (launches if arch in build.PDL_ARCHS else 0)
    assert src.count("lean_after_previous_grid();") == launches
    assert ('getenv("LEAN_TVM_PDL")' in src) == (arch in build.PDL_ARCHS)


def test_programmatic_launch_patches_only_the_kernels_that_wait():
    """A kernel that does not wait for the previous grid must not start before it ends: its
    launcher is left alone (it would read inputs not yet written)."""
    def kernel(name, body):
        return f'extern "C" __global__ void __launch_bounds__(128) {name}(int* x) {{\n{body}\n}}\n'

    def launcher(name):
        return ("  cudaLaunchConfig_t cuda_config = {};\n  cuda_config.stream = cuda_stream;\n"
                f"  if (::tvm_cuda_host_check(tvm_cuda_host_launch(::{name}, &cuda_config, x), true) != 0) "
                "return -1;\n")

    src = (kernel("waits", "  lean_after_previous_grid();\n  x[0] = 1;") + kernel("plain", "  x[0] = 2;")
           + "static int tvm_cuda_host_check(cudaError_t error) { return 0; }\n"
           + launcher("waits") + launcher("plain"))
    out = build.programmatic_launch(src)
    waits, plain = out.split("tvm_cuda_host_launch(::waits")
    assert "cudaLaunchAttributeProgrammaticStreamSerialization" in waits.split("static int tvm_cuda_host_check")[1]
    assert "cudaLaunchAttribute" not in plain
    assert out.count("static int lean_programmatic_launch()") == 1
    assert build.programmatic_launch(src.replace("lean_after_previous_grid();", "")) == src.replace(
        "lean_after_previous_grid();", "")
