"""Find, load and launch the built operator library: the run half, which needs no TVM.

On the GPU path it imports only tvm-ffi, torch and numpy, so it works on a serving box (or the GPU
machine) that has no apache-tvm; the CPU form's library allocates its scratch through TVM's
runtime, which it loads. Where libraries are looked up is ``library.py``'s; a missing one is an
error saying how to build it (``lean_tvm.build.ensure_library`` builds on first use).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .library import ATTENTION_OP, DENSE, GEMV_OP, MANIFEST, PAGED, find_library_dir, search_dirs
from .plan import BATCH_VARIANT_TILES, STREAM_K, stream_k_workers
from .spec import GEMV_ROWS


class LibraryNotFound(RuntimeError):
    pass


DENSE_PAGE_LOG2 = 30  # a dense cache read through the paged kernel: one page of 2^30 rows per sequence


def device_arch(device: torch.device) -> str:
    """``sm_90a`` for Hopper (the wgmma/setmaxnreg target), ``sm_XY`` otherwise; ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def _missing(arch: str) -> LibraryNotFound:
    where = [str(d) for d in search_dirs(arch)]
    return LibraryNotFound(
        f"no lean_tvm library for {arch} in {where}. Build one where apache-tvm"
        f"{' and nvcc are' if arch != 'cpu' else ' is'} installed: `python -m lean_tvm.build --arch {arch} --out DIR` "
        f"(then set LEAN_TVM_LIB_DIR=DIR), or once into the cache: `lean_tvm.build.ensure_library({arch!r})`")


def _load_tvm_backend() -> None:
    """The LLVM form allocates its scratch through TVM's backend API (TVMBackendAllocWorkspace),
    which apache-tvm's runtime provides to modules loaded after it: import it first."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        raise LibraryNotFound("the CPU form of lean_tvm runs on apache-tvm's runtime: pip install apache-tvm "
                              "(the GPU libraries need only apache-tvm-ffi)") from None


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    name: str
    dtype: str
    head_dim: int
    max_group: int
    block_size: int
    ctas_per_sm: int
    tile_cost: int = 0  # stream-K shares equal in cost (plan.stream_k_edges)
    form: str = DENSE  # DENSE: [B, Hkv, L, D] caches, one token; PAGED: block tables, Sq tokens, leftpad
    batch: bool = False  # the batch variant (schedule_records.py): for launches of many tiles
    kv_dtype: str | None = None  # an fp8 cache's dtype (spec.KV_DTYPES); None: K/V in ``dtype``


class Library:
    """One loaded ``.so`` and its manifest."""

    def __init__(self, directory: Path):
        with open(directory / MANIFEST) as f:
            self.manifest = json.load(f)
        if self.manifest["arch"] == "cpu":
            _load_tvm_backend()
        import tvm_ffi

        self.path = (directory / self.manifest["library"]).resolve()
        self.module = tvm_ffi.load_module(str(self.path))
        self.kernels = [
            KernelInfo(k["name"], k["dtype"], k["head_dim"], k["max_group"], k["block_size"],
                       k.get("knobs", {}).get("ctas_per_sm", 1), k.get("knobs", {}).get("tile_cost", 0),
                       k.get("form", DENSE), k.get("variant") == "batch", k.get("kv_dtype"))
            for k in self.manifest["kernels"] if k["op"] == ATTENTION_OP
        ]
        self.gemv = {k["dtype"]: k["name"] for k in self.manifest["kernels"] if k["op"] == GEMV_OP}
        self._functions = {}

    def attention_kernel(self, dtype: str, head_dim: int, group: int, tiles: int = 1,
                         form: str = DENSE, kv_dtype: str | None = None) -> KernelInfo | None:
        """The smallest group that serves ``group`` query rows per tile; for a launch of ``tiles``
        >= ``plan.BATCH_VARIANT_TILES`` tiles its batch variant when the library has one, else the
        plain kernel. ``form``: DENSE or PAGED; ``kv_dtype``: an fp8 cache's dtype (paged form)."""
        fits = [k for k in self.kernels if k.dtype == dtype and k.head_dim == head_dim and k.max_group >= group
                and k.form == form and k.kv_dtype == kv_dtype]
        if not fits:
            return None
        smallest = min(k.max_group for k in fits)
        fits = [k for k in fits if k.max_group == smallest]
        return min(fits, key=lambda k: k.batch != (tiles >= BATCH_VARIANT_TILES))

    def function(self, name: str):
        if name not in self._functions:
            self._functions[name] = self.module[name]
        return self._functions[name]

    def supported(self) -> str:
        return ", ".join(sorted({f"{k.dtype}/D{k.head_dim}/G<={k.max_group}/{k.form}"
                                 + (f"/{k.kv_dtype} cache" if k.kv_dtype else "") for k in self.kernels}))


_LIBRARIES: dict[str, Library] = {}
_LOCK = threading.Lock()


def library_for(device: torch.device) -> Library:
    arch = device_arch(device)
    with _LOCK:
        if arch not in _LIBRARIES:
            d = find_library_dir(arch)
            if d is None:
                raise _missing(arch)
            _LIBRARIES[arch] = Library(d)
        return _LIBRARIES[arch]


class Workspace:
    """Partials and flags of the cross-block reduction, from torch's allocator, reused per
    (device, stream, shape of a partial). Flags start at zero and every launch leaves them at
    zero (each reducer resets what it consumed), so replaying a captured CUDA graph needs no
    memset."""

    def __init__(self):
        self._buffers: dict[tuple, tuple[int, tuple[torch.Tensor, ...]]] = {}  # (capacity, buffers)
        self._scratch: dict[tuple, torch.Tensor] = {}

    def get(self, device: torch.device, workers: int, *partial_shapes: tuple[int, ...]):
        """One fp32 tensor [workers, *shape] per partial shape, then the int32 flags [workers]."""
        key = (device, _current_stream(device), partial_shapes)
        n, bufs = self._buffers.get(key, (0, None))
        if bufs is None or n < workers:
            n = max(workers, 1)
            bufs = new_workspace(device, n, *partial_shapes)
            self._buffers[key] = n, bufs
        return bufs

    def scratch(self, device: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
        """An fp32 tensor reused per (device, stream, shape) for an output nobody reads (the lse
        when the caller does not ask for it): one allocation less per call."""
        key = (device, _current_stream(device), shape)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(shape, device=device, dtype=torch.float32)
        return buf


def new_workspace(device: torch.device, workers: int, *partial_shapes: tuple[int, ...]):
    """Fresh partials (fp32 [workers, *shape] per shape) and flags (int32 [workers], zero). The
    torch ops' own (``fresh_workspace``): under CUDA graphs made by torch.compile (cudagraph trees)
    every live tensor of the graphs' memory pool must be one the trees track, and a cached workspace
    first allocated while they warm up or record a graph would live in the pool untracked."""
    return (*(torch.empty(max(workers, 1), *shape, device=device, dtype=torch.float32) for shape in partial_shapes),
            torch.zeros(max(workers, 1), device=device, dtype=torch.int32))


def _current_stream(device: torch.device) -> int:
    """torch's current stream on the device (0 on CPU), as a raw handle: cheap, no Stream object."""
    if device.type != "cuda":
        return 0
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device() if device.index is None else device.index)


WORKSPACE = Workspace()


def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1



def _workers_and_grid(device, tiles: int, num_splits: int, num_ctas: int | None, ctas_per_sm: int):
    resident = num_sms(device) * ctas_per_sm
    if num_splits == STREAM_K:
        workers = grid = num_ctas or resident
    else:
        workers = tiles * num_splits
        grid = min(workers, num_ctas or resident)
    if device.type == "cuda" and grid > resident:
        raise ValueError(f"num_ctas: at most {resident} CTAs can be resident on this GPU "
                         f"(the reducers wait on each other), got {grid}")
    return workers, max(grid, 1)


def launch_gemv(w, x, y, num_splits: int = STREAM_K, num_ctas: int | None = None) -> None:
    """y = W x (w [N, K], x [K], y [N], fp16/bf16, K a multiple of 8) on the stream-K primitive."""
    _check_gemv(w, x, y)
    lib = library_for(w.device)
    key = (str(w.device), w.shape[1])
    if key not in _K_LENGTHS:
        _K_LENGTHS[key] = torch.tensor([w.shape[1]], dtype=torch.int32, device=w.device)
    workers, grid = _workers_and_grid(w.device, -(-w.shape[0] // GEMV_ROWS), num_splits, num_ctas, 1)
    ws, flags = WORKSPACE.get(w.device, workers, (GEMV_ROWS,))
    lib.function(lib.gemv[str(w.dtype).removeprefix("torch.")])(w, x, _K_LENGTHS[key], y, ws, flags, workers,
                                                                 num_splits, grid)


_K_LENGTHS: dict[tuple, torch.Tensor] = {}


def _check_gemv(w, x, y) -> None:
    """Argument errors before any launch (the kernel copies 16-byte chunks of W's rows)."""
    if w.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"w.dtype: expected float16 or bfloat16, got {w.dtype}")
    for t, name in ((x, "x"), (y, "y")):
        if t.dtype != w.dtype:
            raise TypeError(f"{name}.dtype: expected {w.dtype} like w, got {t.dtype}")
        if t.device != w.device:
            raise ValueError(f"{name}.device: expected {w.device} like w, got {t.device}")
    if w.dim() != 2 or not w.is_contiguous() or w.shape[1] % 8:
        raise ValueError(f"w: expected a contiguous [N, K] matrix with K a multiple of 8, got {tuple(w.shape)}")
    if x.shape != (w.shape[1],) or y.shape != (w.shape[0],):
        raise ValueError(f"x, y: expected shapes ({w.shape[1]},) and ({w.shape[0]},), got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")


_LAUNCHES: dict[tuple, Callable] = {}
_MAX_LAUNCHES = 4096  # shapes kept (a cache that grows per step, transformers' dynamic one, makes one per length)


def _launcher(key: tuple, make: Callable[[], Callable]) -> Callable:
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) >= _MAX_LAUNCHES:
            _LAUNCHES.clear()
        launch = _LAUNCHES[key] = make()
    return launch


def launch_attention(q, k_cache, v_cache, seq_lens, out, lse, softmax_scale: float,
                     num_splits: int = STREAM_K, num_ctas: int | None = None,
                     kernel: KernelInfo | None = None, fresh_workspace: bool = False) -> None:
    """Run the kernel on already-validated tensors (q [B, Hq, D], caches [B, Hkv, L, D] views).

    ``num_splits == 0``: stream-K over ``num_ctas`` (default: every SM x CTAs per SM);
    ``num_splits = S``: fixed split into S chunks per tile (1 = no split). ``fresh_workspace``:
    see :func:`new_workspace`.
    """
    launch = attention_launcher(q, k_cache.shape[1], num_splits, num_ctas, kernel, k_cache.shape[2])
    launch(q, k_cache, v_cache, seq_lens, out, lse, softmax_scale, fresh_workspace)


def attention_launcher(q, hkv: int, num_splits: int = STREAM_K, num_ctas: int | None = None,
                       kernel: KernelInfo | None = None, max_len: int | None = None) -> Callable:
    """``launch(q, k, v, seq_lens, out, lse, scale)`` for q's device, dtype and shape, ``hkv`` KV
    heads and a cache of ``max_len`` rows. What depends only on those (kernel, workers, grid) is
    resolved once per shape, so a launch is the workspace lookup and the tvm-ffi call; callers
    that keep the launcher (``torch_ops``) skip even this lookup."""
    return _launcher((q.device, q.dtype, q.shape, hkv, num_splits, num_ctas, kernel, max_len),
                     lambda: _make_launcher(q, hkv, num_splits, num_ctas, kernel, max_len))


def _make_launcher(q, hkv: int, num_splits: int, num_ctas: int | None, kernel: KernelInfo | None,
                   max_len: int | None) -> Callable:
    fn, workers, grid, shapes = _prepare_attention(q, hkv, num_splits, num_ctas, kernel, max_len)
    device = q.device

    def launch(q, k_cache, v_cache, seq_lens, out, lse, softmax_scale: float, fresh_workspace: bool = False) -> None:
        ws_o, ws_ml, flags = (new_workspace if fresh_workspace else WORKSPACE.get)(device, workers, *shapes)
        fn(q, k_cache, v_cache, seq_lens, out, lse, ws_o, ws_ml, flags, softmax_scale, workers, num_splits, grid)

    return launch


def _prepare_attention(q, hkv: int, num_splits: int, num_ctas: int | None, kernel: KernelInfo | None,
                       max_len: int | None):
    lib = library_for(q.device)
    batch, hq, head_dim = q.shape
    info = kernel or lib.attention_kernel(str(q.dtype).removeprefix("torch."), head_dim, hq // hkv, batch * hkv)
    if info is None:
        raise ValueError(f"no kernel in {lib.path} for {q.dtype}, head dim {head_dim}, {hq // hkv} query heads "
                         f"per KV head (it has: {lib.supported()})")
    if num_splits == STREAM_K and num_ctas is None and max_len is not None:
        resident = num_sms(q.device) * info.ctas_per_sm
        num_ctas = stream_k_workers(batch * hkv, -(-max_len // info.block_size), resident)
    workers, grid = _workers_and_grid(q.device, batch * hkv, num_splits, num_ctas, info.ctas_per_sm)
    return lib.function(info.name), workers, grid, ((info.max_group, head_dim), (2, info.max_group))


def cache_launcher(q4, hkv: int, cache_len: int, kv_dtype: str | None, dense_one_token: bool) -> Callable:
    """:func:`paged_launcher`'s launch; for an fp8 cache read densely with one token and no start
    rows (``dense_one_token``), the dense fp8 kernel behind the same signature where the library
    has one (it skips the paged form's tile layout and start rows: its small shapes are faster)."""
    if kv_dtype and dense_one_token and q4.shape[0]:
        return _launcher((q4.device, q4.dtype, q4.shape, hkv, cache_len, DENSE, kv_dtype),
                         lambda: _make_dense_fp8_launcher(q4, hkv, cache_len, kv_dtype)
                         or paged_launcher(q4, hkv, cache_len, kv_dtype=kv_dtype))
    return paged_launcher(q4, hkv, cache_len, kv_dtype=kv_dtype)


def _make_dense_fp8_launcher(q4, hkv: int, cache_len: int, kv_dtype: str) -> Callable | None:
    lib = library_for(q4.device)
    batch, _, hq, head_dim = q4.shape
    info = lib.attention_kernel(str(q4.dtype).removeprefix("torch."), head_dim, hq // hkv, batch * hkv, DENSE,
                                kv_dtype)
    if info is None:
        return None
    fn, workers, grid, shapes = _prepare_attention(q4[:, 0], hkv, STREAM_K, None, info, cache_len)
    device = q4.device

    def launch(q, k, v, block_table, seq_lens, leftpad, out, lse, softmax_scale: float, page_size_log2: int,
               k_scale, v_scale, fresh_workspace: bool = False) -> None:
        ws_o, ws_ml, flags = (new_workspace if fresh_workspace else WORKSPACE.get)(device, workers, *shapes)
        fn(q.squeeze(1), k, v, seq_lens, k_scale, v_scale, out.squeeze(1), lse.squeeze(1), ws_o, ws_ml, flags,
           softmax_scale, workers, STREAM_K, grid)

    return launch


def paged_launcher(q4, hkv: int, cache_len: int, num_ctas: int | None = None, kv_dtype: str | None = None,
                   kernel: KernelInfo | None = None) -> Callable:
    """``launch(q, k, v, block_table, seq_lens, leftpad, out, lse, scale, page_size_log2)`` of the
    paged kernel for q4 [B, Sq, Hq, D]'s device, dtype and shape, ``hkv`` KV heads and a cache of
    ``cache_len`` rows per sequence (pages x page size; a dense cache's length): resolved once per
    shape like :func:`attention_launcher`. The pools are [P, Hkv, page, D] views. With ``kv_dtype``
    (an fp8 cache) they are passed as bytes (``torch.uint8`` views) and the launch takes two more
    arguments after page_size_log2, k_scale and v_scale: fp32 [Hkv] tensors (any stride).
    ``kernel``: this kernel of the library instead of the one the shape selects (the tuner's)."""
    return _launcher((q4.device, q4.dtype, q4.shape, hkv, cache_len, num_ctas, PAGED, kv_dtype, kernel),
                     lambda: _make_paged_launcher(q4, hkv, cache_len, num_ctas, kv_dtype, kernel))


def tile_rows(sq: int, group: int, max_group: int) -> tuple[int, int]:
    """(rows per tile, tiles per KV head) of the paged form: the Sq x G query rows of a KV head in
    chunks of at most ``max_group`` (``attention_cpu.TileLayout``)."""
    rows = min(max_group, sq * group)
    return rows, -(-sq * group // rows)


def _make_paged_launcher(q4, hkv: int, cache_len: int, num_ctas: int | None, kv_dtype: str | None,
                         kernel: KernelInfo | None) -> Callable:
    lib = library_for(q4.device)
    batch, sq, hq, head_dim = q4.shape
    dtype = str(q4.dtype).removeprefix("torch.")
    groups = [k.max_group for k in lib.kernels
              if (k.dtype, k.head_dim, k.form, k.kv_dtype) == (dtype, head_dim, PAGED, kv_dtype)]
    group = min(sq * (hq // hkv), max(groups, default=0))
    tiles = batch * hkv * tile_rows(sq, hq // hkv, max(groups, default=1))[1]
    info = kernel or lib.attention_kernel(dtype, head_dim, group, tiles, PAGED, kv_dtype)
    if info is None:
        cache = f", a {kv_dtype} cache (fp8 kernels need sm_89 or newer)" if kv_dtype else ""
        raise ValueError(f"no paged kernel in {lib.path} for {q4.dtype}, head dim {head_dim}{cache} (it has: "
                         f"{lib.supported()})")
    tiles = batch * hkv * tile_rows(sq, hq // hkv, info.max_group)[1]
    if num_ctas is None:
        num_ctas = stream_k_workers(tiles, -(-cache_len // info.block_size), num_sms(q4.device) * info.ctas_per_sm)
    workers, grid = _workers_and_grid(q4.device, tiles, STREAM_K, num_ctas, info.ctas_per_sm)
    fn, shapes, device = lib.function(info.name), ((info.max_group, head_dim), (2, info.max_group)), q4.device

    def launch(q, k, v, block_table, seq_lens, leftpad, out, lse, softmax_scale: float, page_size_log2: int,
               fresh_workspace: bool = False) -> None:
        ws_o, ws_ml, flags = (new_workspace if fresh_workspace else WORKSPACE.get)(device, workers, *shapes)
        fn(q, k, v, block_table, seq_lens, leftpad, out, lse, ws_o, ws_ml, flags, softmax_scale, cache_len,
           page_size_log2, workers, STREAM_K, grid)

    def launch_fp8(q, k, v, block_table, seq_lens, leftpad, out, lse, softmax_scale: float, page_size_log2: int,
                   k_scale, v_scale, fresh_workspace: bool = False) -> None:
        ws_o, ws_ml, flags = (new_workspace if fresh_workspace else WORKSPACE.get)(device, workers, *shapes)
        fn(q, k, v, block_table, seq_lens, leftpad, k_scale, v_scale, out, lse, ws_o, ws_ml, flags, softmax_scale,
           cache_len, page_size_log2, workers, STREAM_K, grid)

    return launch_fp8 if kv_dtype else launch
