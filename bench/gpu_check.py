"""The Python half of ``scripts/gpu_check``: one prepared run on a lent GPU.

Steps, each guarded so a failure is recorded and the next step still runs:

1. print the GPU name and the torch / Triton versions;
2. run ``pytest tests/kernels`` on CUDA (gpu-marked tests included), then the rest of ``tests``,
   each in a subprocess with a timeout, recording packages the GPU image lacks;
3. measure the card's ceilings: copy bandwidth, fp32 and tf32 matmul rates;
4. time the fused kernels against their torch twins at GPU sizes;
5. call ``bench/engine_bench.py:gpu_engine_results()`` in a subprocess if that file exists;
6. write ``$OUT/gpu_check.json`` after every step (partial results survive a kill) and print a
   compact table last.

Nothing is installed. Budget: about 8 minutes in all (``GPU_CHECK_BUDGET_S``, default 450 s).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "450"))
PYTEST_TIMEOUT_S = float(os.environ.get("GPU_CHECK_PYTEST_TIMEOUT_S", "210"))
# Pairwise Gram work is capped per call (D shrunk) so the check stays inside its budget: one
# fp32 Gram of N=1000, D=1.6M is 3.2e15 flop, about a minute per call. Once tiles are full the
# rate does not depend on D.
PAIRWISE_MAX_FLOP = float(os.environ.get("GPU_CHECK_PAIRWISE_MAX_FLOP", "5e13"))

T0 = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - T0


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return os.environ.get("GIT_COMMIT", "unknown")


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))


OPTIONAL_PACKAGES = ("sklearn", "opacus", "matplotlib", "yaml", "tqdm", "scipy")


def missing_packages() -> list[str]:
    """Packages the project installs in .venv that the GPU image may lack (nothing is installed there)."""
    import importlib.util

    return [m for m in OPTIONAL_PACKAGES if importlib.util.find_spec(m) is None]


def run_pytest(paths: list[str], timeout_s: float, extra: list[str] | None = None) -> dict:
    """``pytest -q PATHS`` in a subprocess; CUDA present so gpu-marked tests run."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(extra or []), *paths]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    lines = text.strip().splitlines()
    return {
        "cmd": " ".join(cmd),
        "rc": rc,
        "passed": rc == 0,
        "seconds": round(time.monotonic() - t0, 1),
        "summary": lines[-1] if lines else "",
        "tail": "\n".join(lines[-40:]),
    }


def run_kernel_benches(ceilings: dict) -> list[dict]:
    import kernel_bench as kb

    dev = "cuda"
    rows: list[dict] = []

    def guarded(name: str, fn, *args, **kw) -> None:
        if elapsed() > BUDGET_S - 90:
            rows.append({"op": name, "impl": "", "error": "skipped: out of time budget"})
            return
        try:
            rows.extend(fn(*args, **kw))
        except Exception as e:  # record and go on: one OOM must not hide the other results
            rows.append({"op": name, "impl": "", "args": repr(args), "error": f"{type(e).__name__}: {e}"})
            traceback.print_exc()
        kb.free(dev)

    for N, D in [(1000, 1_600_000), (100, 25_000_000)]:
        guarded("clip_scale_noise_reduce", kb.bench_clip_scale_noise_reduce, N, D, dev, ceilings=ceilings)
    for N, D in [(1000, 1_600_000), (100, 25_000_000)]:
        d_eff = int(min(D, PAIRWISE_MAX_FLOP / (2 * N * N)))
        guarded("pairwise_sqdist", kb.bench_pairwise_sqdist, N, d_eff, dev, ceilings=ceilings)
        if d_eff < D:
            rows[-1].setdefault("note", f"D capped from {D}")
    guarded("order_stats", kb.bench_order_stats, 100, 1_600_000, dev, ceilings=ceilings)
    guarded("order_stats", kb.bench_order_stats, 100, 1_600_000, dev, ceilings=ceilings, dtype=torch.bfloat16,
            ops=("median",))
    return rows


def run_engine() -> dict:
    """``bench/engine_bench.py:gpu_engine_results()`` in a subprocess with the time left."""
    path = ROOT / "bench" / "engine_bench.py"
    if not path.exists():
        return {"skipped": "bench/engine_bench.py not present"}
    left = BUDGET_S - elapsed() - 15
    if left < 20:
        return {"error": "skipped: out of time budget"}
    code = (
        "import json, sys; sys.path[:0] = ['.', 'bench']\n"
        "import engine_bench\n"
        "r = engine_bench.gpu_engine_results()\n"
        "print('\\nENGINE_JSON ' + json.dumps(r, default=str))\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {left:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("ENGINE_JSON "):
            return json.loads(line[len("ENGINE_JSON ") :])
    return {"error": f"rc={p.returncode}: " + (p.stderr.strip().splitlines() or [""])[-1][-500:]}


def main() -> int:
    out_dir = Path(os.environ.get("OUT") or "./gpu_check_out")
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to check")
        return 0
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # pragma: no cover
        triton_version = f"unavailable ({e})"
    # 1. Versions.
    result: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"GPU {result['gpu']} | torch {result['torch']} (CUDA {result['cuda']}) | triton {triton_version}", flush=True)
    write(result, out_dir)

    # 2. Test suite on CUDA.
    # The kernels' tests need only torch, triton, numpy and pytest, which the GPU image has: run
    # them first. The rest of the suite follows without -x; packages the image lacks are recorded.
    result["missing_packages"] = missing_packages()
    print(f"[{elapsed():5.0f}s] pytest tests/kernels (timeout {0.4 * PYTEST_TIMEOUT_S:.0f} s) ...", flush=True)
    result["pytest_kernels"] = run_pytest(["tests/kernels"], 0.4 * PYTEST_TIMEOUT_S)
    print(result["pytest_kernels"]["tail"], flush=True)
    print(f"[{elapsed():5.0f}s] pytest rest of tests (missing here: {result['missing_packages'] or 'none'}) ...", flush=True)
    result["pytest"] = run_pytest(["tests"], 0.6 * PYTEST_TIMEOUT_S, ["--ignore=tests/kernels"])
    print(result["pytest"]["tail"], flush=True)
    write(result, out_dir)

    # 3. Ceilings.
    print(f"[{elapsed():5.0f}s] measuring ceilings ...", flush=True)
    try:
        import kernel_bench as kb

        result["ceilings"] = kb.measure_ceilings("cuda")
    except Exception as e:
        result["ceilings"] = {"error": f"{type(e).__name__}: {e}"}
    print(result["ceilings"], flush=True)
    write(result, out_dir)
    ceilings = result["ceilings"] if "error" not in result["ceilings"] else {}

    # 4. Kernel benches.
    print(f"[{elapsed():5.0f}s] kernel benches ...", flush=True)
    try:
        result["kernels"] = run_kernel_benches(ceilings)
    except Exception as e:
        result["kernels"] = [{"op": "all", "impl": "", "error": f"{type(e).__name__}: {e}"}]
    write(result, out_dir)

    # 5. Engine benches (written by another issue; may be absent).
    print(f"[{elapsed():5.0f}s] engine benches ...", flush=True)
    try:
        result["engine"] = run_engine()
    except Exception as e:
        result["engine"] = {"error": f"{type(e).__name__}: {e}"}
    result["seconds"] = round(elapsed(), 1)
    write(result, out_dir)

    # 6. Table last.
    import kernel_bench as kb

    print()
    print(f"GPU {result['gpu']} | torch {result['torch']} | triton {result['triton']} | commit {result['git_commit']}")
    c = result["ceilings"]
    if "error" in c:
        print(f"ceilings: {c['error']}")
    else:
        print(f"ceilings: copy {c['copy_gbps']:.0f} GB/s | fp32 {c['fp32_tflops']:.1f} TFLOP/s | tf32 {c['tf32_tflops']:.1f} TFLOP/s")
    for key in ("pytest_kernels", "pytest"):
        py = result[key]
        print(f"{key}: {'PASS' if py['passed'] else 'FAIL'} rc={py['rc']} in {py['seconds']} s: {py['summary']}")
    if result.get("missing_packages"):
        print(f"packages missing on this image (their tests fail here, not in CI): {', '.join(result['missing_packages'])}")
    print(kb.format_table(result["kernels"]))
    eng = result["engine"]
    print("engine:", json.dumps(eng, default=str)[:800])
    print(f"wrote {out_dir / 'gpu_check.json'} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
