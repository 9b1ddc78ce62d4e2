"""Files a user hands in are untrusted: nothing they hold runs without --trust, nothing from the working
directory runs in lstmopt's child processes, and an artifact's metadata decides no code."""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SCRIPT, invoke
from lstmopt.errors import UsageError
from lstmopt.artifacts.loading import detect_format
from lstmopt.artifacts.metadata import MAX_METADATA_BYTES, read_metadata
from models import build_tagger




PLANTED = """
import json, sys
from typing import Tuple
import torch


class Planted(torch.nn.Module):
    # Its __setstate__, run by torch.jit.load, creates a file: code from the archive runs.
    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.data = torch.zeros(4)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.data = torch.from_file(state[0], shared=True, size=4)


path, marker, metadata = sys.argv[1:4]
torch.jit.save(torch.jit.script(Planted(marker)), path, _extra_files={"lstmopt.json": metadata})
"""


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(build_tagger().state_dict(), "tagger.pt")
    return tmp_path


def _forged_torchscript(path, marker, metadata):
    """A TorchScript archive that creates ``marker`` when loaded (scripted in a fresh interpreter: a class
    compiled in this one stays compiled)."""
    script = path.parent / "planted_source.py"
    script.write_text(PLANTED)
    subprocess.run([sys.executable, str(script), str(path), str(marker), json.dumps(metadata)], check=True)
    script.unlink()


def test_verify_refuses_a_torchscript_artifact_without_trust_and_runs_none_of_its_code(work):
    marker = work / "planted"
    _forged_torchscript(work / "forged.pt", marker, {"modules": [], "native_kernel": ["lstm"]})
    result = invoke("verify", "tagger.pt", "forged.pt", "--factory", "models:build_tagger", "--input-shape", "2,5,3")
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line == ("error: forged.pt is a TorchScript archive: loading it runs the code it holds. "
                    "Pass --trust (trust=True) only if you trust its source")
    assert not marker.exists()


def test_an_archive_torch_load_would_hand_to_torch_jit_load_counts_as_torchscript(work):
    # torch.load(weights_only=False) runs torch.jit.load on any zip holding a constants.pkl record.
    _forged_torchscript(work / "planted.pt", work / "planted", {})
    with zipfile.ZipFile("planted.pt") as src, zipfile.ZipFile("renamed.pt", "w") as dst:
        for item in src.infolist():
            dst.writestr(item.filename.replace("/code/", "/kode/"), src.read(item))
    assert detect_format(work / "renamed.pt") == "torchscript"
    result = invoke("optimize", "renamed.pt", "-o", "out.pt", "--trust")
    assert result.exit_code == 2 and "is a TorchScript archive" in result.stderr
    assert not (work / "planted").exists()


def test_the_metadata_does_not_decide_that_verify_loads_the_native_library(work, monkeypatch):
    from lstmopt import native

    from lstmopt import optimize
    from lstmopt.artifacts.writing import write_artifact

    write_artifact(optimize(build_tagger()), work / "out.pt", format="torchscript",
                   metadata={"source": {}, "modules": [{"name": "lstm", "packed": True}], "native_kernel": ["lstm"]})
    monkeypatch.setattr(native, "load", lambda **_: pytest.fail("verify loaded the native library"))
    result = invoke("verify", "tagger.pt", "out.pt", "--factory", "models:build_tagger", "--trust")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("record, message", [
    (b"[1, 2]", "lstmopt metadata lstmopt did not write"),
    (b'"text"', "lstmopt metadata lstmopt did not write"),
    (b'{"modules": [{"packed": true}]}', "modules.0.name: Field required"),
    (b'{"modules": "all"}', "modules: Input should be a valid list"),
    (b'{"dtype": "int4"}', "unknown dtype"),
    (b"{" * 100_000, "corrupt lstmopt metadata"),
    (b" " * (MAX_METADATA_BYTES + 1), "not a record lstmopt wrote"),
])
def test_forged_metadata_is_a_one_line_usage_error(tmp_path, record, message):
    path = tmp_path / "forged.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("forged/data.pkl", b"")
        archive.writestr("forged/extra/lstmopt.json", record)
    with pytest.raises(UsageError, match=message) as caught:
        read_metadata(path)
    assert "\n" not in str(caught.value)


def test_a_metadata_record_that_lies_about_its_size_is_read_no_further_than_the_cap(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/extra/lstmopt.json", b" " * (8 * MAX_METADATA_BYTES))
    raw = bytearray(path.read_bytes())
    size = (8 * MAX_METADATA_BYTES).to_bytes(4, "little")
    for _ in range(2):  # the local header's and the central directory's uncompressed sizes: claim 10 bytes
        at = raw.index(size)
        raw[at:at + 4] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(UsageError):
        read_metadata(path)


PLANTS = {
    "sitecustomize.py": "open({marker!r}, 'a').write('sitecustomize ')\n",
    "torch/__init__.py": "open({marker!r}, 'a').write('torch ')\nraise ImportError('a planted torch')\n",
    "typing_extensions.py": "open({marker!r}, 'a').write('typing_extensions ')\nraise ImportError('planted')\n",
}


@pytest.mark.parametrize("fmt", ["torchscript", "pickle"])
def test_nothing_in_the_working_directory_runs_in_the_verification_child(tmp_path, fmt):
    from models import build_speech_encoder

    torch.save(build_speech_encoder().state_dict(), tmp_path / "encoder.pt")
    shutil.copy(ROOT / "tests" / "models.py", tmp_path / "models.py")  # the factory's module lies here too
    marker = tmp_path / "ran"
    for name, code in PLANTS.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(code.format(marker=str(marker)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([SCRIPT, "optimize", "encoder.pt", "-o", "out.pt", "--factory", "models:build_speech_encoder",
                           "--input-shape", "2,5,40", "--format", fmt, "--trust"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), marker.read_text()


def test_the_verification_child_dies_with_its_parent(tmp_path):
    code = textwrap.dedent("""
        import subprocess, sys
        from lstmopt.job.children import die_with_parent
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=die_with_parent)
        print(child.pid, flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return  # killed, not yet reaped by init
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail("the child outlived its parent")


# --- the native library: loaded only if it is the file lstmopt compiled ---------------------------------

from conftest import needs_compiler, run_python  # noqa: E402
from lstmopt.kernels import build_cache as native_build, native  # noqa: E402

LOAD = """
    import json
    from lstmopt import native
    print(json.dumps({"loaded": native.load(quiet=True), "reason": native.unavailable_reason()}))
"""


@pytest.fixture(scope="session")
def first_use_build(tmp_path_factory):
    """A cache holding the first-use build (lstmopt run from a source tree never installed), made once."""
    root = tmp_path_factory.mktemp("first-use") / "cache"
    assert _load_with(root) == {"loaded": True, "reason": None}
    return root


def _cache_copy(tmp_path, built):
    """A copy of a verified first-use build (so tests need not compile it again); the ops library's path."""
    root = tmp_path / "cache"
    shutil.copytree(built, root, ignore=shutil.ignore_patterns(".*"))
    ops = native.cache_dir().name
    return root, root / ops / f"{ops}.so"


def _load_with(root, *, compiler=True):
    env = {"LSTMOPT_CACHE": str(root), "LSTMOPT_NATIVE_FROM_SOURCE": "1"}
    if not compiler:
        env["CXX"] = "/nonexistent/c++"
    proc = run_python(LOAD, env_extra=env)
    assert proc.returncode == 0, f"loading died with {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _planted_library(path, marker):
    source = path.with_suffix(".c")
    source.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void planted(void) '
                      f'{{ fclose(fopen("{marker}", "w")); }}\n')
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(path)], check=True)
    source.unlink()


@needs_compiler
def test_a_verified_cached_library_loads_without_a_compiler(tmp_path, first_use_build):
    root, _ = _cache_copy(tmp_path, first_use_build)
    assert _load_with(root, compiler=False) == {"loaded": True, "reason": None}


@needs_compiler
def test_a_planted_library_in_the_cache_is_never_loaded(tmp_path, first_use_build):
    root, library = _cache_copy(tmp_path, first_use_build)
    marker = tmp_path / "planted-ran"
    _planted_library(library, marker)
    result = _load_with(root, compiler=False)  # it would be rebuilt; without a compiler it cannot be
    assert result["loaded"] is False and "no C++ compiler" in result["reason"]
    assert not marker.exists()


@needs_compiler
def test_a_truncated_cached_library_is_rebuilt_and_loads(tmp_path, first_use_build):
    root, library = _cache_copy(tmp_path, first_use_build)
    library.write_bytes(library.read_bytes()[:4096])  # a build killed mid-write, a full disk: SIGBUS before
    assert _load_with(root) == {"loaded": True, "reason": None}
    assert native_build._verified(library)


@needs_compiler
@pytest.mark.parametrize("attack", ["group-writable cache", "world-writable library dir", "symlinked entry",
                                    "symlinked cache"])
def test_a_cache_other_users_could_write_is_refused_in_one_line(tmp_path, attack, first_use_build):
    root, library = _cache_copy(tmp_path, first_use_build)
    marker = tmp_path / "planted-ran"
    _planted_library(library, marker)
    (library.parent / "manifest.json").write_text(json.dumps({"sha256": native_build.sha256_file(library)}))
    given = root
    if attack == "group-writable cache":
        root.chmod(0o770)
    elif attack == "world-writable library dir":
        library.parent.chmod(0o777)
    elif attack == "symlinked entry":
        elsewhere = tmp_path / "elsewhere"
        library.parent.rename(elsewhere)
        library.parent.symlink_to(elsewhere)
    else:
        given = tmp_path / "link"
        given.symlink_to(root)
        (tmp_path).chmod(0o777)  # the link's directory: anyone could point it elsewhere
    result = _load_with(given)
    assert result["loaded"] is False and "\n" not in result["reason"]
    assert any(word in result["reason"] for word in ("writable by other users", "symbolic link", "other users can"))
    assert not marker.exists()


@needs_compiler
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a file to another user")
def test_a_library_of_another_user_is_not_loaded_even_by_root(tmp_path, first_use_build):
    root, library = _cache_copy(tmp_path, first_use_build)
    marker = tmp_path / "planted-ran"
    _planted_library(library, marker)
    (library.parent / "manifest.json").write_text(json.dumps({"sha256": native_build.sha256_file(library)}))
    for path in (library, library.parent / "manifest.json"):
        os.chown(path, 65534, 65534)
    result = _load_with(root, compiler=False)
    assert result["loaded"] is False and not marker.exists()


def test_a_build_lock_held_by_a_killed_process_does_not_block_the_next_build(tmp_path):
    from lstmopt.kernels.build_cache import trusted_library

    lock = tmp_path / ".lib.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(lock)!r}, os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(TimeoutError, match="for over 1 s"):  # held by a live process: waited for, then told
        trusted_library(tmp_path, "lib", lambda path: path.write_bytes(b"built"), lock_timeout=1)
    holder.kill()
    holder.wait()
    built = trusted_library(tmp_path, "lib", lambda path: path.write_bytes(b"built"), lock_timeout=5)
    assert built.read_bytes() == b"built"


# --- temporary files: a killed run's are removed, a live run's never ------------------------------------

def _aged(path, seconds=60):
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_optimize_removes_what_a_killed_run_left_beside_the_output_but_not_a_live_runs_file(work):
    import fcntl

    dead = work / ".out.pt.lstmopt-tmp-dead"
    live = work / ".out.pt.lstmopt-tmp-live"
    fresh = work / ".out.pt.lstmopt-tmp-fresh"  # just created by a run that has not locked it yet
    for path in (dead, live, fresh):
        path.write_bytes(b"partial")
    _aged(dead)
    _aged(live)
    holder = open(live, "rb")
    fcntl.flock(holder, fcntl.LOCK_EX)
    result = invoke("optimize", "tagger.pt", "-o", "out.pt", "--factory", "models:build_tagger", "--quiet")
    assert result.exit_code == 0, result.output
    assert not dead.exists() and live.exists() and fresh.exists()
    holder.close()


def test_verification_directories_left_in_tmpdir_by_killed_runs_are_removed(tmp_path, monkeypatch):
    import fcntl
    import tempfile

    from lstmopt.artifacts.files import private_temp_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead, live = tmp_path / "lstmopt-verify-dead", tmp_path / "lstmopt-verify-live"
    for path in (dead, live):
        path.mkdir()
        (path / ".lock").touch()
        _aged(path)
    holder = open(live / ".lock", "rb")
    fcntl.flock(holder, fcntl.LOCK_EX)
    with private_temp_dir("lstmopt-verify-") as mine:
        assert mine.is_dir() and not dead.exists() and live.exists()
    assert not mine.exists()
    holder.close()


def test_a_temporary_directory_removed_during_verification_is_said_so_not_blamed_on_the_artifact(tmp_path, monkeypatch):
    from lstmopt import optimize
    from lstmopt.job import fresh_process, verification
    from lstmopt.artifacts.writing import write_artifact

    model = build_tagger()
    write_artifact(optimize(model), tmp_path / "a.pt", format="torchscript", metadata={})
    real_run = subprocess.run

    def run_after_a_cleaner(command, **kwargs):  # a tmp cleaner strikes while the child starts
        shutil.rmtree(Path(command[-1]).parent)
        return real_run([sys.executable, "-c", "raise SystemExit(1)"], **kwargs)

    monkeypatch.setattr(fresh_process.subprocess, "run", run_after_a_cleaner)
    with pytest.raises(UsageError, match="was removed while the artifact was being verified"):
        verification.verify_artifact(model, tmp_path / "a.pt", format="torchscript", samples=[], lstm_names=["lstm"])


def test_a_cache_whose_parents_do_not_exist_yet_is_made_private_and_used(tmp_path):
    # A fresh machine may have no ~/.cache at all.
    root = tmp_path / "home" / ".cache" / "lstmopt"
    library = native_build.trusted_library(root, "lib", lambda path: path.write_bytes(b"\x7fELF built"))
    assert library.read_bytes() == b"\x7fELF built" and native_build._verified(library)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
