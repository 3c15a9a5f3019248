"""The TensorRT backend: cache keys, real plan builds with TensorRT-RTX (no GPU needed), fallbacks, and,
where a CUDA GPU with TensorRT and pycuda answers, running plans against ONNX Runtime's output.

A tiny conv net (input ``image`` (N, 3, H, W) with dynamic N, H, W; output ``logits`` (N, 3, H, W)) is
written with onnx.helper and wrapped in a real model package (manifest.toml with its SHA-256):
``appliance_dev.model_factory.tiny_onnx`` and ``write_tiny_package``, shared with scripts/gpu_tensorrt_timing.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import BackendUnavailable, EngineBuildError, InferenceError, ModelPackageError
from appliance.infer.backends import open_backend
from appliance.infer.backends import tensorrt as trtb
from appliance.models.package import ModelPackage
from appliance_dev.model_factory import TINY_MAX_BATCH as MAX_BATCH
from appliance_dev.model_factory import TINY_MAX_HW as MAX_HW
from appliance_dev.model_factory import tiny_onnx
from appliance_dev.model_factory import write_tiny_package as write_package

onnx = pytest.importorskip("onnx")
from onnx import TensorProto  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    return write_package(tmp_path_factory.mktemp("models"))


def _has_gpu() -> str | None:
    """None where a CUDA device answers, else why not."""
    try:
        trtb.gpu_info()
    except BackendUnavailable as exc:
        return str(exc)
    return None


NO_GPU = _has_gpu()


def _rtx():
    return pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")


# ---------------------------------------------------------------------------------------------------
# Without TensorRT or a GPU


def test_module_imports_without_tensorrt_pycuda_or_onnx() -> None:
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorrt", "tensorrt_rtx", "pycuda", "onnx", "onnxconverter_common"):
                    raise ImportError("blocked for the test: " + name)
        sys.meta_path.insert(0, Block())
        import appliance.infer.backends.tensorrt as t
        from appliance.errors import BackendUnavailable
        try:
            t.trt_flavour()
        except BackendUnavailable as exc:
            print("UNAVAILABLE", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "UNAVAILABLE TensorRT is not installed" in out.stdout
    assert "pip install tensorrt-rtx" in out.stdout


def test_flavour_prefers_tensorrt_then_rtx(monkeypatch: pytest.MonkeyPatch) -> None:
    _rtx()
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    fl = trtb.trt_flavour()
    assert fl.name == "tensorrt_rtx" and fl.is_rtx and fl.version.count(".") >= 2
    assert not fl.fp16_by_flag  # TensorRT-RTX's builder has no FP16 flag


def test_gpu_info_here() -> None:
    if NO_GPU:
        with pytest.raises(BackendUnavailable, match="no CUDA GPU/driver"):
            trtb.gpu_info()
    else:
        g = trtb.gpu_info()
        assert g.name and g.compute_capability[0] >= 5 and g.total_memory > 0
        assert g.device.startswith("cuda:0 ")


def test_cache_key_changes_with_every_input_and_is_stable(pkg: ModelPackage, tmp_path: Path) -> None:
    base = dict(precision="fp16", gpu_id="portable", flavour="tensorrt_rtx", trt_version="1.7.1.116")
    k = trtb.engine_cache_key(pkg, **base)
    assert k == trtb.engine_cache_key(pkg, **base)
    assert k.startswith(f"tinyseg-{pkg.onnx_sha256[:12]}-tensorrt_rtx-1.7.1.116-portable-fp16-")
    variants = {
        "model hash": trtb.engine_cache_key(dataclasses.replace(pkg, onnx_sha256="0" * 64), **base),
        "precision": trtb.engine_cache_key(pkg, **{**base, "precision": "fp32"}),
        "gpu": trtb.engine_cache_key(pkg, **{**base, "gpu_id": "sm90-nvidia-h100-80gb-hbm3"}),
        "flavour": trtb.engine_cache_key(pkg, **{**base, "flavour": "tensorrt"}),
        "version": trtb.engine_cache_key(pkg, **{**base, "trt_version": "1.7.2.1"}),
        "profile": trtb.engine_cache_key(write_package(tmp_path, max_batch=8), **base),
    }
    assert len({k, *variants.values()}) == len(variants) + 1, variants
    with pytest.raises(ValueError, match="precision"):
        trtb.engine_cache_key(pkg, **{**base, "precision": "int8"})
    plan, side = trtb.engine_paths(tmp_path, k)
    assert plan.name == f"{k}.plan" and side.name == f"{k}.json"


def test_gpu_id_per_flavour() -> None:
    fake_rtx = trtb.Flavour(module=sys, name="tensorrt_rtx", version="1.7.1.116")
    fake_trt = trtb.Flavour(module=sys, name="tensorrt", version="10.13.3.9")
    h100 = trtb.GpuInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30, 13000)
    t4 = trtb.GpuInfo(0, "Tesla T4", (7, 5), 16 << 30, 12080)
    orin = trtb.GpuInfo(0, "Orin (nvgpu)", (8, 7), 8 << 30, 12060)
    assert trtb.default_gpu_id(fake_rtx, None) == "portable"  # builds with no GPU at all
    assert trtb.default_gpu_id(fake_rtx, h100) == "portable"
    assert trtb.default_gpu_id(fake_rtx, t4) == "sm75"  # Turing is not in RTX's default targets
    assert trtb.default_gpu_id(fake_trt, h100) == "sm90-nvidia-h100-80gb-hbm3"
    assert trtb.default_gpu_id(fake_trt, orin) == "sm87-orin-nvgpu"


def test_open_backend_auto_falls_back_and_says_why(pkg: ModelPackage, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    if not NO_GPU:
        pytest.skip("a CUDA GPU answers here: auto may pick TensorRT (covered by the GPU tests)")
    with caplog.at_level(logging.INFO, logger="appliance.infer"):
        b = open_backend(pkg, "auto", engines_dir=tmp_path / "engines")
    try:
        assert b.name == "onnxruntime" and b.device == "cpu"
        out = b.run(np.zeros((1, 3, 32, 32), np.float32))
        assert out.shape == (1, 3, 32, 32)
    finally:
        b.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert any("TensorRT not used for tinyseg" in m and "no CUDA GPU/driver" in m for m in msgs), msgs
    assert not (tmp_path / "engines").exists()  # nothing was built for a backend that cannot run


def test_open_backend_tensorrt_raises_clearly(pkg: ModelPackage, tmp_path: Path) -> None:
    if not NO_GPU:
        pytest.skip("a CUDA GPU answers here")
    with pytest.raises(BackendUnavailable, match=r"no CUDA GPU/driver: "):
        open_backend(pkg, "tensorrt", engines_dir=tmp_path)


def test_backend_unavailable_without_tensorrt(pkg: ModelPackage, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fake = trtb.GpuInfo(0, "NVIDIA Fake", (8, 9), 24 << 30, 13000)
    monkeypatch.setattr(trtb, "gpu_info", lambda index=0: fake)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        trtb.TensorRTBackend(pkg, "fp16", engines_dir=tmp_path)


def test_fp16_conversion_keeps_float32_io(pkg: ModelPackage, tmp_path: Path) -> None:
    pytest.importorskip("onnxconverter_common")
    dst = tmp_path / "m16.onnx"
    trtb.convert_onnx_fp16(pkg.onnx_path, dst)
    m = onnx.load(str(dst))
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [TensorProto.FLOAT]
    assert [i.name for i in m.graph.input] == ["image"] and [o.name for o in m.graph.output] == ["logits"]
    assert {t.data_type for t in m.graph.initializer} == {TensorProto.FLOAT16}
    assert any(n.op_type == "Cast" for n in m.graph.node)
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(pkg.onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    try:
        got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    except Exception as exc:  # an ONNX Runtime build without FP16 Conv on the CPU
        pytest.skip(f"ONNX Runtime cannot run the FP16 model on the CPU: {exc}")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-2 * float(np.abs(ref).max()))


# ---------------------------------------------------------------------------------------------------
# Real plan builds with TensorRT-RTX (no GPU needed)


def test_build_plan_then_cache_hit(pkg: ModelPackage, tmp_path: Path) -> None:
    _rtx()
    for precision in ("fp16", "fp32"):
        plan, built = trtb.build_engine(pkg, precision, tmp_path, gpu_id="portable")
        assert built and plan.is_file() and plan.suffix == ".plan" and plan.parent == tmp_path
        assert plan.stat().st_size > 1000
        meta = json.loads(plan.with_suffix(".json").read_text())
        assert meta["plan_bytes"] == plan.stat().st_size
        assert meta["onnx_sha256"] == pkg.onnx_sha256 and meta["precision"] == precision
        assert meta["gpu"] == "portable" and meta["profile"] == [[1, 3, 16, 16], [2, 3, 64, 64], [4, 3, 128, 128]]
        fl = trtb.trt_flavour()
        assert meta["flavour"] == fl.name and meta["trt_version"] == fl.version
        if precision == "fp16" and fl.is_rtx:
            assert meta["fp16_method"].startswith("ONNX converted to FP16")
        mtime = plan.stat().st_mtime_ns
        again, built2 = trtb.build_engine(pkg, precision, tmp_path, gpu_id="portable")
        assert (again, built2) == (plan, False) and plan.stat().st_mtime_ns == mtime
    plans = sorted(p.name for p in tmp_path.glob("*.plan"))
    assert len(plans) == 2 and {"fp16", "fp32"} == {n.split("-")[-2] for n in plans}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_changed_model_changes_the_plan(pkg: ModelPackage, tmp_path: Path) -> None:
    _rtx()
    other = write_package(tmp_path / "models", onnx_bytes=tiny_onnx(seed=1))
    assert other.name == pkg.name and other.onnx_sha256 != pkg.onnx_sha256
    a, _ = trtb.build_engine(pkg, "fp32", tmp_path / "engines")
    b, built = trtb.build_engine(other, "fp32", tmp_path / "engines")
    assert built and a != b and a.is_file() and b.is_file()
    assert other.onnx_sha256[:12] in b.name and pkg.onnx_sha256[:12] in a.name


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_broken_onnx_gives_a_clear_error(tmp_path: Path, precision: str) -> None:
    _rtx()
    bad = write_package(tmp_path / "models", "broken", onnx_bytes=b"this is not an ONNX model\x00\x01" * 10)
    with pytest.raises(EngineBuildError) as ei:
        trtb.build_engine(bad, precision, tmp_path / "engines")
    msg = str(ei.value)
    assert "broken" in msg and "model.onnx" in msg
    assert "ONNX" in msg
    assert not list((tmp_path / "engines").glob("*.plan"))


def test_truncated_onnx_gives_a_clear_error(pkg: ModelPackage, tmp_path: Path) -> None:
    _rtx()
    data = pkg.onnx_path.read_bytes()
    bad = write_package(tmp_path / "models", "truncated", onnx_bytes=data[: len(data) // 2])
    with pytest.raises(EngineBuildError, match="truncated.*ONNX"):
        trtb.build_engine(bad, "fp32", tmp_path / "engines")


def test_broken_onnx_without_the_onnx_package(pkg: ModelPackage, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On a JetPack install without ``onnx`` only TensorRT's parser checks the file: still a clear error."""
    _rtx()
    monkeypatch.setitem(sys.modules, "onnx", None)
    garbage = write_package(tmp_path / "m1", "garbage", onnx_bytes=b"this is not an ONNX model\x00\x01" * 10)
    with pytest.raises(EngineBuildError, match="garbage.*found no graph inputs or outputs"):
        trtb.build_engine(garbage, "fp32", tmp_path / "engines")
    data = pkg.onnx_path.read_bytes()
    cut = write_package(tmp_path / "m2", "cut", onnx_bytes=data[:300])
    with pytest.raises(EngineBuildError, match="cut.*ONNX parser cannot read.*model.onnx"):
        trtb.build_engine(cut, "fp32", tmp_path / "engines")


def test_manifest_tensor_names_must_match_onnx(tmp_path: Path) -> None:
    _rtx()
    p = write_package(tmp_path / "models", onnx_bytes=tiny_onnx(input_name="input"))  # manifest says "image"
    with pytest.raises(ModelPackageError, match=r"inputs \['input'\].*'image'"):
        trtb.build_engine(p, "fp32", tmp_path / "engines")


def test_half_written_plan_is_rebuilt(pkg: ModelPackage, tmp_path: Path) -> None:
    _rtx()
    plan, _ = trtb.build_engine(pkg, "fp32", tmp_path)
    good = plan.read_bytes()
    # A crash after the sidecar but before the rename leaves a temp file; a plan of the wrong size never counts.
    (tmp_path / f".{plan.name}.12345.tmp").write_bytes(good[:100])
    plan.write_bytes(good[: len(good) // 2])
    again, built = trtb.build_engine(pkg, "fp32", tmp_path)
    assert built and again == plan and plan.read_bytes() != good[: len(good) // 2]
    assert plan.stat().st_size == json.loads(plan.with_suffix(".json").read_text())["plan_bytes"]
    assert not list(tmp_path.glob(".*.tmp"))
    plan.with_suffix(".json").unlink()  # a plan without its sidecar is not trusted either
    assert trtb.build_engine(pkg, "fp32", tmp_path)[1]


def test_two_processes_build_once(pkg: ModelPackage, tmp_path: Path) -> None:
    _rtx()
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from appliance.models.package import load_package
        from appliance.infer.backends.tensorrt import build_engine
        sys.stdin.readline()  # start together
        plan, built = build_engine(load_package(Path({str(pkg.path)!r})), "fp32", Path({str(tmp_path)!r}))
        print(plan.name, built)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    lines = sorted(out.split() for out, _ in results)
    assert lines[0][0] == lines[1][0]
    assert sorted(line[1] for line in lines) == ["False", "True"], lines
    assert len(list(tmp_path.glob("*.plan"))) == 1


def test_rtx_turing_target(pkg: ModelPackage, tmp_path: Path) -> None:
    _rtx()
    if not trtb.trt_flavour().is_rtx:
        pytest.skip("the preferred TensorRT here is not TensorRT-RTX")
    plan, built = trtb.build_engine(pkg, "fp16", tmp_path, gpu_id="sm75")
    assert built and "-sm75-fp16-" in plan.name
    with pytest.raises(EngineBuildError, match="cannot target"):
        trtb.build_engine(pkg, "fp16", tmp_path, gpu_id="sm42")


# ---------------------------------------------------------------------------------------------------
# On a GPU: running plans


def _gpu_backend(pkg: ModelPackage, precision: str, engines: Path) -> trtb.TensorRTBackend:
    if NO_GPU:
        pytest.skip(f"needs a CUDA GPU: {NO_GPU}")
    try:
        trtb.trt_flavour()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed (pip install pycuda)")
    try:
        return trtb.TensorRTBackend(pkg, precision, engines_dir=engines)
    except BackendUnavailable as exc:
        if "cannot load the plan on" in str(exc):  # e.g. a TensorRT-RTX plan on a GPU it does not support
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def ort_ref(pkg: ModelPackage):
    from appliance.infer.backends.onnxruntime import OnnxRuntimeBackend

    b = OnnxRuntimeBackend(pkg)
    yield b
    b.close()


@pytest.mark.parametrize("precision,rtol", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_gpu_run_matches_onnxruntime(pkg: ModelPackage, ort_ref, tmp_path: Path, precision: str, rtol: float) -> None:
    b = _gpu_backend(pkg, precision, tmp_path)
    try:
        assert b.name == "tensorrt" and b.precision == precision and b.device.startswith("cuda:0 ")
        rng = np.random.default_rng(2)
        for shape in [(1, 3, 64, 64), (4, 3, 128, 128), (3, 3, 16, 48), (2, 3, 80, 112)]:
            x = rng.standard_normal(shape).astype(np.float32)
            got, ref = b.run(x), ort_ref.run(x)
            assert got.dtype == np.float32 and got.shape == ref.shape == (shape[0], 3, *shape[2:])
            scale = float(np.abs(ref).max())
            np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale, err_msg=f"{precision} {shape}")
    finally:
        b.close()
        b.close()  # twice is harmless


def test_gpu_splits_large_batches_and_checks_shapes(pkg: ModelPackage, ort_ref, tmp_path: Path) -> None:
    b = _gpu_backend(pkg, "fp32", tmp_path)
    try:
        assert b.max_batch == MAX_BATCH
        x = np.random.default_rng(3).standard_normal((2 * MAX_BATCH + 1, 3, 32, 32)).astype(np.float32)
        got = b.run(x)
        assert got.shape == (9, 3, 32, 32)
        np.testing.assert_allclose(got, ort_ref.run(x), rtol=1e-3, atol=1e-3 * float(np.abs(got).max()))
        assert b.run(x[:0]).shape == (0, 3, 32, 32)
        for bad in [(1, 3, MAX_HW + 16, 64), (1, 3, 8, 64), (1, 1, 64, 64), (3, 64, 64)]:
            with pytest.raises(InferenceError, match="does not fit the engine's profile"):
                b.run(np.zeros(bad, np.float32))
    finally:
        b.close()
    with pytest.raises(InferenceError, match="closed"):
        b.run(x)


def test_gpu_second_open_uses_cached_plan_and_auto_picks_tensorrt(pkg: ModelPackage, tmp_path: Path) -> None:
    b = _gpu_backend(pkg, "fp16", tmp_path)
    first = b.plan_path
    b.close()
    b2 = open_backend(pkg, "auto", "fp16", engines_dir=tmp_path)
    try:
        assert b2.name == "tensorrt" and b2.plan_path == first and not b2.built_now
    finally:
        b2.close()


def test_env_for_gpu_runs_is_reported() -> None:
    """Not a check: prints what the GPU tests ran on (see with -s), so a log says which flavour/GPU/pycuda."""
    parts = [f"gpu: {NO_GPU or trtb.gpu_info().device}"]
    try:
        fl = trtb.trt_flavour()
        parts.append(f"{fl.name} {fl.version}")
    except BackendUnavailable as exc:
        parts.append(str(exc))
    parts.append(f"pycuda: {'yes' if _importable('pycuda') else 'no'}; pid {os.getpid()}")
    print("; ".join(parts))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
