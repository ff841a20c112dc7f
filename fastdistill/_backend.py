"""Backend dispatcher and JIT loader, shared by every kernel family.

The C++ extension is ONE shared library (``csrc/``) whose ops register
themselves as ``torch.ops.fastdistill.*``. It is built on first use with
``torch.utils.cpp_extension`` + ninja into a cache directory keyed by the
source hash, the torch version and the CPU capability, under a file lock so
concurrent processes never corrupt a build. A failed build falls back to the
``torch`` backend with one warning that says why.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")
ENV_BACKEND = "FASTDISTILL_BACKEND"
ENV_CACHE = "FASTDISTILL_CACHE"
EXT_NAME = "fastdistill_C"

# Sources of the one extension, relative to csrc/. CUDA sources join only
# when a CUDA toolkit and a CUDA torch are present.
CPU_SOURCES = ("ops.cpp", "common/memory.cpp", "kd/kd_cpu.cpp", "sparse/sparse_cpu.cpp",
               "softlabels/softlabels_cpu.cpp", "ot/ot_cpu.cpp", "ot/sinkhorn_cpu.cpp",
               "ot/sinkd_cpu.cpp", "dd/dd_cpu.cpp",
               "diffusion/diffusion_cpu.cpp")
CUDA_SOURCES: tuple[str, ...] = ("softlabels/softlabels_cuda.cu",)

_lock = threading.Lock()
_state: dict[str, object] = {}


def csrc_dir() -> Path:
    """Where the C++ sources are: shipped inside the wheel, or the source tree."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_csrc", here.parent / "csrc"):
        if (cand / "ops.cpp").is_file():
            return cand
    raise FileNotFoundError(
        f"fastdistill C++ sources not found (looked in {here / '_csrc'} and {here.parent / 'csrc'})"
    )


def cpu_capability() -> str:
    """'AVX2'/'AVX512' (vectorized build) or 'DEFAULT' (scalar build)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return "DEFAULT"


def compile_flags() -> list[str]:
    """Both flags that decide CPU speed are explicit here: OpenMP and AVX2."""
    flags = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG", "-fno-math-errno", "-ffp-contract=off"]
    if cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def cuda_compile_flags() -> list[str]:
    """nvcc flags of the CUDA sources (the build and the compile-only test use these)."""
    return ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DNDEBUG"]


def build_sources() -> tuple[str, ...]:
    """The sources of this machine's build: the CUDA ones only where a CUDA
    device, a CUDA build of torch and a toolkit are all present (elsewhere
    they are compile-checked by tests/test_cuda_sources.py)."""
    if not (torch.version.cuda and torch.cuda.is_available()):
        return CPU_SOURCES
    from torch.utils.cpp_extension import CUDA_HOME

    return CPU_SOURCES + (CUDA_SOURCES if CUDA_HOME is not None else ())


def _prebuilt_library() -> Path | None:
    """An extension built ahead of time by ``FASTDISTILL_BUILD_EXT=1 pip install .``."""
    here = Path(__file__).resolve().parent
    found = sorted(here.glob(f"{EXT_NAME}*.so"))
    return found[0] if found else None


@functools.lru_cache(maxsize=None)
def cache_key() -> str:
    """Hash of the sources, flags and versions (once per process: a loaded
    library cannot be replaced in it anyway)."""
    src = csrc_dir()
    h = hashlib.sha256()
    for rel in build_sources():
        h.update(rel.encode())
        h.update((src / rel).read_bytes())
    for header in sorted(src.rglob("*.h")):
        h.update(header.read_bytes())
    h.update(" ".join(compile_flags()).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """fastdistill's cache folder: ``$FASTDISTILL_CACHE``, else
    ``$XDG_CACHE_HOME/fastdistill``, else ``~/.cache/fastdistill``."""
    return Path(os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastdistill"
    ))


def cache_dir() -> Path:
    """The extension's build folder under ``cache_root()``."""
    root = cache_root()
    tv = torch.__version__.replace("+", "_")
    return root / f"torch-{tv}-{cpu_capability().lower()}-{cache_key()}"


def _build(verbose: bool = False) -> Path:
    """Build (or reuse) the extension; returns the path of the shared library."""
    from filelock import FileLock  # a dependency of torch itself

    out = cache_dir()
    lib = out / f"{EXT_NAME}.so"
    done = out / "BUILD_OK"
    if done.is_file() and lib.is_file():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / "build.lock")):
        if done.is_file() and lib.is_file():  # another process built it meanwhile
            return lib
        from torch.utils.cpp_extension import load

        src = csrc_dir()
        load(
            name=EXT_NAME,
            sources=[str(src / s) for s in build_sources()],
            extra_cflags=compile_flags(),
            extra_cuda_cflags=cuda_compile_flags(),
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(src)],
            build_directory=str(out),
            is_python_module=False,
            verbose=verbose,
        )
        done.write_text(torch.__version__)
    return lib


def load_if_built() -> None:
    """Load the extension now if it is already built (ahead of time or in the
    cache): a quick dlopen at import, so that torch.compile(fullgraph=True) can
    trace a step whose first call would otherwise load it (a lock and a build
    cannot be traced). A missing build is left to the first call."""
    if "cpp" in _state or os.environ.get("FASTDISTILL_NO_BUILD") == "1":
        return
    try:
        out = cache_dir()
        built = _prebuilt_library() is not None or (
            (out / "BUILD_OK").is_file() and (out / f"{EXT_NAME}.so").is_file())
    except OSError:  # sources not found or unreadable: the first call reports it
        return
    if built:
        load_extension()


def load_extension(verbose: bool = False) -> bool:
    """Load the extension once per process; False (and one warning) if it cannot be."""
    if "cpp" in _state:  # lock-free fast path (also what torch.compile traces)
        return bool(_state["cpp"])
    with _lock:
        if "cpp" in _state:
            return bool(_state["cpp"])
        if os.environ.get("FASTDISTILL_NO_BUILD") == "1":
            _state["cpp"], _state["cpp_reason"] = False, "FASTDISTILL_NO_BUILD=1"
            return False
        try:
            if hasattr(torch.ops.fastdistill, "kd_forward"):
                lib = "already loaded"
            else:
                pre = _prebuilt_library()
                lib = pre if pre is not None else _build(verbose)
                torch.ops.load_library(str(lib))
            _state["cpp"], _state["cpp_reason"] = True, f"loaded {lib}"
            _register_fakes()
        except Exception as exc:  # noqa: BLE001 - any build failure means: fall back
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            _state["cpp"], _state["cpp_reason"] = False, reason
            warnings.warn(
                f"fastdistill: the C++ extension could not be built ({reason}); "
                "falling back to the pure-torch backend. Run `fastdistill doctor` for details.",
                RuntimeWarning,
                stacklevel=3,
            )
        return bool(_state["cpp"])


def _register_fakes() -> None:
    """Shape-only implementations so the ops trace under torch.compile."""
    from torch.library import register_fake

    @register_fake("fastdistill::kd_forward")
    def _(student, teacher, labels, ignore_index, divergence, param, temperature, hard_weight,
          soft_scale, mean_scale, need_grad):
        loss = student.new_empty((student.shape[0],), dtype=torch.float32)
        if not need_grad:
            return loss, student.new_empty((0,))
        return loss, torch.empty_like(student, memory_format=torch.contiguous_format)

    @register_fake("fastdistill::kd_forward_inplace")
    def _(student, teacher, labels, ignore_index, divergence, param, temperature, hard_weight,
          soft_scale, mean_scale):
        return student.new_empty((student.shape[0],), dtype=torch.float32)


def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "TRITON_INTERPRET=1: kernels run on CPU tensors through the interpreter"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return True, f"CUDA device {torch.cuda.get_device_name(0)}"


def _cuda_status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if not set(CUDA_SOURCES) <= set(build_sources()):
        return False, "no CUDA toolkit to build the CUDA sources with"
    return True, ("CUDA device present; hand-written CUDA kernels: softlabel_decode "
                  "(the losses on CUDA tensors use triton)")


def backend_status(build: bool = True) -> dict[str, tuple[bool, str]]:
    """{name: (available, why)} for every backend."""
    status = {"torch": (True, f"pure PyTorch {torch.__version__}")}
    if build:
        load_extension()
    if "cpp" in _state:
        status["cpp"] = (bool(_state["cpp"]), str(_state["cpp_reason"]))
    else:
        status["cpp"] = (False, "not loaded yet")
    status["triton"] = _triton_status()
    status["cuda"] = _cuda_status()
    return status


def backends() -> dict[str, bool]:
    """Which backends can run here; ``fastdistill doctor`` prints why not."""
    return {k: v[0] for k, v in backend_status().items()}


def resolve(backend: str, device: torch.device, dtype: torch.dtype, *, has_triton_kernel: bool = True) -> str:
    """The backend one call runs on.

    ``auto``: triton for CUDA tensors, cpp for CPU tensors, torch for float64
    or when the chosen one is unavailable. ``FASTDISTILL_BACKEND`` overrides
    ``auto`` (an explicit ``backend=`` argument wins over both).
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"{ENV_BACKEND} must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"
        if device.type == "cuda":
            return "triton" if has_triton_kernel and _triton_status()[0] else "torch"
        if device.type == "cpu":
            return "cpp" if load_extension() else "torch"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got a {device.type} tensor")
        if not load_extension():
            raise RuntimeError(f"backend='cpp' is unavailable: {_state.get('cpp_reason')}")
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            raise RuntimeError(f"backend='triton' is unavailable: {why}")
    if backend == "cuda":
        ok, why = _cuda_status()
        if not ok:
            raise RuntimeError(f"backend='cuda' is unavailable: {why}")
    return backend
