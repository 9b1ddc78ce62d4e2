"""lstmopt's native kernel: within 1e-6 of nn.LSTM, independent of threads, thread-safe, optional."""

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from conftest import NATIVE, ROOT, lstm_pair, needs_native, run_python, run_python_json
from lstmopt import PackedLSTM, native, optimize
from lstmopt.environment import cpuinfo
from lstmopt.kernels.compile import VARIANTS
from lstmopt.job.verification import verify_artifact
from lstmopt.artifacts.writing import read_metadata, write_artifact
from models import build_forecaster

TOLERANCE = dict(atol=1e-6, rtol=1e-6)


def _cpu_variant():
    """The variant liblstmopt.so must pick here, by the flags it checks (csrc/loader.cpp)."""
    flags = set((cpuinfo("flags") or "").split())
    if {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "baseline"


def test_the_installed_library_loads_the_fastest_variant_this_cpu_runs():
    assert NATIVE, native.unavailable_reason()
    assert native.library_path() == str(native.INSTALLED_LOADER)  # built by pip install, not on first use
    assert native.variant() == torch.ops.lstmopt.variant() == _cpu_variant()


def test_the_ops_library_needs_neither_python_nor_lstmopt():
    needed = {}
    for path in [native.INSTALLED_LOADER, *native.INSTALLED_LOADER.parent.glob("lstmopt_ops_*.so")]:
        dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
        needed[path.name] = re.findall(r"\(NEEDED\).*\[(.+)\]", dynamic)
    assert sorted(needed) == ["liblstmopt.so", "lstmopt_ops_avx2.so", "lstmopt_ops_avx512.so",
                              "lstmopt_ops_baseline.so"]
    assert not [lib for libs in needed.values() for lib in libs if "python" in lib]
    result = run_python_json(f"""
        import json, sys
        sys.modules["lstmopt"] = None
        import torch
        torch.ops.load_library({native.library_path()!r})
        print(json.dumps(torch.ops.lstmopt.variant()))
    """)
    assert result == _cpu_variant()


VARIANT_CHECK = """
    import json, sys, torch
    from torch import nn
    sys.path.insert(0, "tests")
    from models import rounded as rounded_weights
    from lstmopt import native, optimize
    loaded = native.load()
    torch.manual_seed(0)
    models = [nn.LSTM(9, 40, num_layers=2, bidirectional=True), nn.LSTM(9, 40, proj_size=12), nn.GRU(9, 40),
              nn.RNN(9, 70, num_layers=2, bidirectional=True), nn.RNN(9, 40, nonlinearity="relu")]
    errors = []
    x = torch.randn(6, 3, 9)
    with torch.no_grad():
        for model in models:
            fast = optimize(model.eval(), exact=False, autotune=[(x,)])
            errors.append(max((a - b).abs().max().item() for a, b in zip(fast(x)[0:1], model(x)[0:1])))
    # int8 and bf16 weights, against nn.LSTM on the weights as rounded (their tiles differ per variant)
    rounded = {}
    if loaded:
        lstm = models[0]
        for weights in ("int8", "bfloat16"):
            fast = optimize(lstm).eval()
            fast.use_kernel("native", sequence_kernel="native", native_weights=weights)
            with torch.no_grad():
                rounded[weights] = (fast(x)[0] - rounded_weights(lstm, weights)(x)[0]).abs().max().item()
    print(json.dumps({"loaded": loaded, "variant": native.variant(), "max_error": max(errors), "rounded": rounded}))
"""


@needs_native
@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_the_cpu_runs_is_exact_to_1e6_and_one_it_lacks_is_refused_in_one_line(name):
    proc = run_python(VARIANT_CHECK, env_extra={"LSTMOPT_NATIVE_VARIANT": name})
    assert proc.returncode == 0, proc.stderr[-2000:]  # never an illegal instruction
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    runs_here = list(VARIANTS).index(name) >= list(VARIANTS).index(_cpu_variant())
    if runs_here:
        assert result["loaded"] and result["variant"] == name and result["max_error"] < 1e-6
        assert result["rounded"]["int8"] < 2e-4 and result["rounded"]["bfloat16"] < 1e-5
    else:
        notices = [line for line in proc.stderr.splitlines() if line.startswith("lstmopt:")]
        assert not result["loaded"] and result["max_error"] < 1e-6  # served by the other kernels
        assert notices == [f"lstmopt: native kernel unavailable (LSTMOPT_NATIVE_VARIANT={name}: this CPU lacks "
                           "the instructions it needs); using the other kernels"]


WIDE_CHECK = """
    import json, sys, torch
    from torch import nn
    torch.ops.load_library(sys.argv[-1])  # the wide build alone: lstmopt's own library is never loaded here
    sys.path.insert(0, "tests")
    from models import rounded as rounded_weights  # torch only: nothing of lstmopt's is imported
    torch.manual_seed(0)
    x = torch.randn(6, 3, 9)
    ops = torch.ops.lstmopt
    errors = {}
    with torch.no_grad():
        for name, lstm in [("lstm", nn.LSTM(9, 40, num_layers=2, bidirectional=True)),
                           ("lstmp", nn.LSTM(9, 40, proj_size=12))]:
            dense = [w.detach() for w in lstm._flat_weights]
            out = ops.lstm_dense(x, None, None, dense, 40, lstm.num_layers, lstm.bidirectional, False, True,
                                 lstm.proj_size)[0]
            errors[name] = (out - lstm(x)[0]).abs().max().item()
        gru = nn.GRU(9, 40, num_layers=2)
        out = ops.gru_dense(x, None, [w.detach() for w in gru._flat_weights], 40, 2, False, False, True)[0]
        errors["gru"] = (out - gru(x)[0]).abs().max().item()
        for nonlinearity in ("tanh", "relu"):  # 70 units: a whole block of 64 and a partial one
            rnn = nn.RNN(9, 70, num_layers=2, bidirectional=True, nonlinearity=nonlinearity)
            out = ops.rnn_dense(x, None, [w.detach() for w in rnn._flat_weights], 70, 2, True, False, True,
                                nonlinearity)[0]
            errors["rnn_" + nonlinearity] = (out - rnn(x)[0]).abs().max().item()
        lstm = nn.LSTM(9, 40, num_layers=2, bidirectional=True)
        for weights in ("int8", "bfloat16"):  # against nn.LSTM on the weights as rounded
            packs = ops.pack([w.detach() for w in lstm._flat_weights], 40, True, 0, weights)
            out = ops.lstm(x, None, None, None, packs[0], packs[1], 40, True, False)[0]
            errors[weights] = (out - rounded_weights(lstm, weights)(x)[0]).abs().max().item()
    print(json.dumps({"variant": ops.variant(), "errors": errors}))
"""


@needs_native
@pytest.mark.skipif(_cpu_variant() == "baseline", reason="the wide test build needs AVX2")
def test_the_avx512_layout_runs_on_avx2_in_the_wide_test_build(tmp_path):
    # The avx512 build's packs and tiles are 64 bytes wide; a CPU without AVX-512 cannot run that build, but it can
    # run the same code with 64-byte vectors in halves (LSTMOPT_VECTOR_BYTES=64 on the avx2 flags, simd.h): every
    # layout, tile and cell of the wide build is tested here (only AVX-512's own intrinsics are not).
    from lstmopt.kernels import compile as native_build

    library = tmp_path / "lstmopt_ops_wide.so"
    command = native_build.ops_command(native_build.torch_build_info(), library, "avx2-wide",
                                       [*VARIANTS["avx2"], "-DLSTMOPT_VECTOR_BYTES=64", "-Wno-psabi"])
    native_build.run_all([command])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(WIDE_CHECK), str(library)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = result["errors"]
    assert result["variant"] == "avx2-wide"
    assert set(errors) == {"lstm", "lstmp", "gru", "rnn_tanh", "rnn_relu", "int8", "bfloat16"}
    assert max(errors["lstm"], errors["lstmp"], errors["gru"], errors["rnn_tanh"], errors["rnn_relu"]) < 1e-6
    assert errors["int8"] < 2e-4 and errors["bfloat16"] < 1e-5


@needs_native
@pytest.mark.parametrize("fmt", ["torchscript", "pickle"])
def test_an_artifact_packed_by_one_variant_is_packed_again_by_the_variant_that_loads_it(tmp_path, fmt):
    model = build_forecaster().eval()
    fast = optimize(model)
    fast.decoder.use_kernel("native")
    x = torch.randn(2, 5, 3)
    out = write_artifact(fast, tmp_path / "m.pt", format=fmt, metadata={})
    with torch.no_grad():
        expected = model(x)
    torch.save(x, tmp_path / "x.pt")
    load = "torch.jit.load" if fmt == "torchscript" else "lambda p: torch.load(p, weights_only=False)"
    result = run_python_json(f"""
        import json, torch
        from lstmopt import native
        native.load()
        model = ({load})({str(out)!r})
        with torch.no_grad():
            y = model(torch.load({str(tmp_path / 'x.pt')!r}))
        torch.save(y, {str(tmp_path / 'y.pt')!r})
        print(json.dumps(native.variant()))
    """, cwd=os.path.dirname(__file__), env_extra={"LSTMOPT_NATIVE_VARIANT": "baseline"})
    assert result == "baseline"
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, **TOLERANCE)


def _call(ref, packed, x, hx):
    with torch.no_grad():
        return ref(x, hx), packed(x, hx)


def _assert_close(expected, actual):
    (out_e, (h_e, c_e)), (out_a, (h_a, c_a)) = expected, actual
    for e, a in ((out_e, out_a), (h_e, h_a), (c_e, c_a)):
        assert e.shape == a.shape and e.dtype == a.dtype
        torch.testing.assert_close(a, e, **TOLERANCE)


@st.composite
def tensor_cases(draw):
    config = dict(input_size=draw(st.sampled_from([1, 8, 33])), hidden_size=draw(st.sampled_from([1, 16, 31, 64])),
                  num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()), bias=draw(st.booleans()),
                  batch_first=draw(st.booleans()))
    batch, steps = draw(st.integers(1, 9)), draw(st.integers(1, 12))
    return config, batch, steps, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 999))


@needs_native
@settings(max_examples=80, deadline=None)
@given(tensor_cases())
def test_native_kernel_is_within_1e6_of_nn_lstm(case):
    config, batch, steps, unbatched, with_state, seed = case
    ref, packed = lstm_pair(seed=seed, **config)
    packed.use_kernel("native")
    g = torch.Generator().manual_seed(seed)
    states = config["num_layers"] * (2 if config["bidirectional"] else 1)
    if unbatched:
        x, state_shape = torch.randn(steps, config["input_size"], generator=g), (states, config["hidden_size"])
    else:
        shape = (batch, steps) if config["batch_first"] else (steps, batch)
        x, state_shape = torch.randn(*shape, config["input_size"], generator=g), (states, batch, config["hidden_size"])
    hx = tuple(torch.randn(state_shape, generator=g) for _ in range(2)) if with_state else None
    _assert_close(*_call(ref, packed, x, hx))
    with torch.no_grad():  # and it was the kernel that served the call, not nn.LSTM's path
        assert packed._state.native.try_forward(x, hx, config["batch_first"], packed._parameters) is not None


# Calls big enough to split between threads, to project their inputs with a GEMM, or both; the last holds
# more hidden state than the buffer a thread keeps between calls.
LARGE = [(16, 1, 256, 2), (1, 16, 256, 2), (8, 40, 64, 1), (4, 100, 128, 2), (300, 2, 256, 2)]


@needs_native
@pytest.mark.parametrize("batch,steps,hidden,layers", LARGE)
def test_native_kernel_is_within_1e6_on_large_calls_at_every_thread_count(batch, steps, hidden, layers):
    ref, packed = lstm_pair(input_size=80, hidden_size=hidden, num_layers=layers, bidirectional=steps > 1)
    packed.use_kernel("native")
    x = torch.randn(steps, batch, 80)
    hx = tuple(torch.randn(layers * (2 if steps > 1 else 1), batch, hidden) for _ in range(2))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            expected, actual = _call(ref, packed, x, hx)
            _assert_close(expected, actual)
            results.append(actual)
    finally:
        torch.set_num_threads(threads)
    if batch * steps <= 256:  # without a GEMM every sum runs in one order: the same bits on any thread count
        for a, b in zip(torch.utils._pytree.tree_leaves(results[0]), torch.utils._pytree.tree_leaves(results[1])):
            assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("batch,steps", [(1, 1), (16, 1), (3, 5)])
def test_the_states_passed_in_are_read_never_written(batch, steps):
    ref, packed = lstm_pair(input_size=40, hidden_size=128, num_layers=2)
    packed.use_kernel("native")
    x = torch.randn(steps, batch, 40)
    hx = tuple(torch.randn(2, batch, 128) for _ in range(2))
    kept = tuple(h.clone() for h in hx)
    expected, (out, (h, c)) = _call(ref, packed, x, hx)
    _assert_close(expected, (out, (h, c)))
    assert torch.equal(hx[0], kept[0]) and torch.equal(hx[1], kept[1])
    assert h.data_ptr() != hx[0].data_ptr() and c.data_ptr() != hx[1].data_ptr()
    _assert_close(*_call(ref, packed, x, (h, c)))  # a stream's next step starts from them


@needs_native
def test_concurrent_calls_of_different_shapes_each_get_their_own_result():
    ref, packed = lstm_pair(input_size=40, hidden_size=128, num_layers=2)
    packed.use_kernel("native", sequence_kernel="native")
    inputs = [torch.randn(1, 16, 40), torch.randn(16, 1, 40), torch.randn(7, 3, 40),
              pack_sequence([torch.randn(9, 40), torch.randn(4, 40)])]
    with torch.no_grad():
        expected = [packed(x) for x in inputs]
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(30):
                    out, (h, c) = packed(inputs[i])
                    out_e, (h_e, c_e) = expected[i]
                    assert torch.equal(getattr(out, "data", out), getattr(out_e, "data", out_e))
                    assert torch.equal(h, h_e) and torch.equal(c, c_e)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@needs_native
def test_weight_edits_repack_and_copies_pickle_and_script():
    ref, packed = lstm_pair(num_layers=2, bidirectional=True)
    packed.use_kernel("native")
    x = torch.randn(4, 3, 12)
    with torch.no_grad():
        ref.weight_hh_l1.mul_(0.5)
        packed.weight_hh_l1.mul_(0.5)  # noticed by the next call
        _assert_close(ref(x), packed(x))
    for copy in (pickle.loads(pickle.dumps(packed)), torch.jit.script(packed)):
        assert copy.kernel == "native"
        with torch.no_grad():
            _assert_close(ref(x), copy.forward__0(x) if hasattr(copy, "forward__0") else copy(x))


@needs_native
def test_torch_compile_runs_the_native_kernel_and_sees_its_shapes():
    # The op has a fake implementation, so torch.compile and torch.export can reason about it.
    lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True).eval()
    packs = native.NativePacks(list(lstm._flat_weights), 16, 2, True, True)
    sequence = pack_sequence([torch.randn(5, 8), torch.randn(3, 8)])
    for args in [(torch.randn(4, 3, 8), None, None, None, False), (torch.randn(3, 4, 8), None, None, None, True),
                 (torch.randn(4, 8), None, None, None, False),
                 (sequence.data, sequence.batch_sizes, torch.randn(4, 2, 16), torch.randn(4, 2, 16), False)]:
        x, batch_sizes, h, c, batch_first = args
        torch.library.opcheck(torch.ops.lstmopt.lstm.default,
                              (x, batch_sizes, h, c, packs.weights, packs.biases, 16, True, batch_first))
    model = build_forecaster().eval()
    fast = optimize(model)
    fast.decoder.use_kernel("native")
    compiled = torch.compile(fast)
    with torch.no_grad():
        for steps in (5, 9):
            x = torch.randn(2, steps, 3)
            torch.testing.assert_close(compiled(x), model(x), **TOLERANCE)


@needs_native
@pytest.mark.parametrize("fmt", ["torchscript", "pickle"])
def test_an_artifact_on_the_native_kernel_says_so_and_loads_with_the_load_line(tmp_path, fmt):
    model = build_forecaster().eval()
    fast = optimize(model)
    fast.decoder.use_kernel("native")
    out = write_artifact(fast, tmp_path / "m.pt", format=fmt, metadata={})
    assert read_metadata(out)["native_kernel"] == ["decoder"]
    verification = verify_artifact(model, out, format=fmt, samples=[(torch.randn(2, 7, 3),)],
                                   lstm_names=["encoder", "decoder"], atol=1e-6, rtol=1e-6, native_kernel=True)
    assert verification.ok, verification.failure_summary()
    if fmt != "torchscript":
        return
    load = f"import torch; m = torch.jit.load({str(out)!r}); print(m(torch.randn(2, 5, 3)).shape)"
    without = run_python("import sys; sys.modules['lstmopt'] = None; " + load)
    assert without.returncode != 0 and "Unknown builtin op: lstmopt::" in without.stderr
    with_line = run_python(native.LOAD_LINE + "; " + load)
    assert with_line.returncode == 0, with_line.stderr
    # The exact default stays loadable with torch alone.
    plain = write_artifact(optimize(model), tmp_path / "plain.pt", format=fmt, metadata={})
    assert run_python("import sys; sys.modules['lstmopt'] = None; import torch; "
                      f"torch.jit.load({str(plain)!r})").returncode == 0


@needs_native
def test_run_from_source_without_a_compiler_lstmopt_says_so_once_and_uses_its_other_kernels(tmp_path):
    torch.manual_seed(0)
    packed = PackedLSTM(12, 20, num_layers=2).eval()
    packed.use_kernel("native", sequence_kernel="native")
    (tmp_path / "native.pkl").write_bytes(pickle.dumps(packed))
    result = run_python_json(f"""
        import json, pickle, torch
        from lstmopt import optimize
        from models import build_forecaster
        fast = optimize(build_forecaster().eval(), autotune=[(torch.randn(2, 9, 3),)], exact=False)
        moved = pickle.loads(open({str(tmp_path / 'native.pkl')!r}, 'rb').read())  # made where it could be built
        print(json.dumps({{"timed": sorted(fast.decoder.autotune_ms), "moved": [moved.kernel, moved.sequence_kernel]}}))
    """, cwd=os.path.join(os.path.dirname(__file__)), env_extra={
        "LSTMOPT_CACHE": str(tmp_path / "empty-cache"), "CXX": str(tmp_path / "no-such-compiler"),
        "LSTMOPT_NATIVE_FROM_SOURCE": "1"})
    assert result == {"timed": ["cell", "onednn", "stock"], "moved": ["onednn", "onednn"]}
    proc = run_python("""
        import torch
        from lstmopt import optimize
        from models import build_forecaster
        optimize(build_forecaster().eval(), autotune=[(torch.randn(2, 9, 3),)], exact=False)
        optimize(build_forecaster().eval(), autotune=[(torch.randn(2, 9, 3),)], exact=False)
    """, cwd=os.path.dirname(__file__), env_extra={"LSTMOPT_CACHE": str(tmp_path / "empty-cache"),
                                                   "CXX": str(tmp_path / "no-such-compiler"),
                                                   "LSTMOPT_NATIVE_FROM_SOURCE": "1"})
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if line.startswith("lstmopt:")]
    assert len(notices) == 1 and "native kernel unavailable (no C++ compiler" in notices[0]


needs_installed = pytest.mark.skipif(not __import__("lstmopt.kernels.native", fromlist=["x"]).INSTALLED_LOADER.exists(),
                                     reason="lstmopt runs from a source tree that was never installed")


def _installation_copy(tmp_path):
    """A copy of the installed library's files (lib/ and the _packs module beside it) and its manifest."""
    import shutil

    from lstmopt.kernels.native import INSTALLED_LOADER

    lib = tmp_path / "kernels" / "lib"
    shutil.copytree(INSTALLED_LOADER.parent, lib)
    for packs in INSTALLED_LOADER.parent.parent.glob("_packs*.so"):
        shutil.copy(packs, lib.parent / packs.name)
    return lib, json.loads((lib / "manifest.json").read_text())


@needs_installed
def test_a_library_built_for_another_torch_is_refused_in_one_line_that_says_how_to_rebuild(tmp_path):
    from lstmopt.kernels.native import check_installation

    lib, manifest = _installation_copy(tmp_path)
    check_installation(lib)  # the copy as installed: accepted
    (lib / "manifest.json").write_text(json.dumps({**manifest, "torch": "2.12.0"}))
    with pytest.raises(RuntimeError) as info:
        check_installation(lib)
    message = str(info.value)
    assert f"built for torch 2.12.0 and this is torch {torch.__version__}" in message and "\n" not in message
    assert "pip install --no-deps --no-build-isolation --force-reinstall" in message


@needs_installed
@pytest.mark.parametrize("damage", ["truncated", "corrupted", "missing", "no manifest"])
def test_a_damaged_installed_library_is_refused_before_it_is_loaded(tmp_path, damage):
    from lstmopt.kernels.native import check_installation

    lib, manifest = _installation_copy(tmp_path)
    victim = lib / "lstmopt_ops_avx2.so"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:4096])  # a full disk during pip install
    elif damage == "corrupted":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "missing":
        victim.unlink()
    else:
        (lib / "manifest.json").unlink()
    with pytest.raises(RuntimeError, match="damaged or missing|no readable manifest.json"):
        check_installation(lib)


@needs_installed
def test_under_a_damaged_library_lstmopt_says_why_and_runs_its_other_kernels(tmp_path):
    """An installed lstmopt copied badly into an image: the variant library's code zeroed half-way. Loaded, it
    would crash the process (or compute garbage); it is refused, and a GRU with --approx stays nn.GRU's."""
    import shutil

    from lstmopt.kernels.native import INSTALLED_LOADER

    package = tmp_path / "image" / "lstmopt"
    shutil.copytree(ROOT / "lstmopt", package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("lstmopt_ops_avx512.so", "lstmopt_ops_avx2.so", "lstmopt_ops_baseline.so"):
        victim = package / "kernels" / "lib" / name
        data = bytearray(victim.read_bytes())
        data[len(data) // 4: 3 * len(data) // 4] = bytes(len(data) // 2)
        victim.write_bytes(bytes(data))
    assert INSTALLED_LOADER.exists()
    proc = run_python(f"""
        import json, sys
        sys.path.insert(0, {str(package.parent)!r})
        import torch, lstmopt
        from lstmopt import plan, optimize
        from lstmopt.kernels import native
        assert native.__file__.startswith({str(package)!r})
        gru = torch.nn.GRU(3, 4).eval()
        (decision,) = plan(gru, exact=False)
        with torch.no_grad():
            optimize(gru, exact=False)(torch.randn(5, 2, 3))
        print(json.dumps([native.load(quiet=True), native.unavailable_reason(), decision.packed, decision.reason]))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded, reason, packed, why = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded is False and "damaged or missing" in reason and "rebuild it" in reason
    assert packed is False and "native kernel" in why
