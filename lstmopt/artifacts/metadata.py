"""The ``lstmopt.json`` record of an artifact: read without loading the model, validated before use.

Anyone can write this record (it is a file in a zip archive), so it is read with a size cap, checked
against the shape lstmopt writes, and used only for what it may decide: which LSTMs to compare, the
default tolerance, whether a batch output is up to date. It never decides what code lstmopt loads: an
archive's need for lstmopt's native library is read from the archive's own code (``calls_lstmopt_ops``).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, ValidationError

from lstmopt.choices import DTYPES
from lstmopt.errors import UsageError

__all__ = ["METADATA_NAME", "MAX_METADATA_BYTES", "calls_lstmopt_ops", "read_metadata"]

METADATA_NAME = "lstmopt.json"
MAX_METADATA_BYTES = 1 << 20  # lstmopt's own records are a few kB, even for hundreds of LSTMs
_MAX_CODE_BYTES = 64 << 20  # a TorchScript archive's code records, read in full to find lstmopt's ops


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Source(_Open):
    sha256: Optional[StrictStr] = None
    format: Optional[StrictStr] = None


class _Module(_Open):
    name: StrictStr
    packed: StrictBool
    exact: StrictBool = True


class _Made(_Open):
    lstms_traced_as_ops: list[StrictStr] = []


class _Metadata(_Open):
    source: _Source = _Source()
    modules: list[_Module] = []
    dtype: StrictStr = "float32"
    format: Optional[StrictStr] = None
    module_prefix: StrictStr = ""
    options_sha256: Optional[StrictStr] = None
    torchscript: Optional[_Made] = None
    native_kernel: list[StrictStr] = []
    user_code: dict[StrictStr, StrictStr] = {}


def read_metadata(path: os.PathLike | str) -> dict:
    """The metadata lstmopt stored in an artifact, read without loading the model; a UsageError when the
    file has none or it is not what lstmopt writes."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if i.filename.endswith(f"/extra/{METADATA_NAME}")]
            if not infos:
                raise UsageError(f"{path} has no lstmopt metadata; it was not written by lstmopt")
            if infos[0].file_size > MAX_METADATA_BYTES:
                raise UsageError(f"{path} has lstmopt metadata of {infos[0].file_size / 1e6:.0f} MB, not a record "
                                 "lstmopt wrote (at most a few kB); the file is forged or corrupt")
            with archive.open(infos[0]) as record:  # the declared size can lie: read no more than the cap
                raw = record.read(MAX_METADATA_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UsageError(f"cannot read {path} as an lstmopt artifact ({exc})") from exc
    if len(raw) > MAX_METADATA_BYTES:
        raise UsageError(f"{path} has lstmopt metadata over {MAX_METADATA_BYTES >> 20} MB; the file is forged or corrupt")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"{path} has corrupt lstmopt metadata ({exc})") from exc
    try:
        checked = _Metadata.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the record"
        raise UsageError(f"{path} has lstmopt metadata lstmopt did not write ({where}: {first['msg']})") from None
    if checked.dtype not in DTYPES:
        raise UsageError(f"{path} has lstmopt metadata with an unknown dtype {checked.dtype!r}")
    return data


def calls_lstmopt_ops(path: os.PathLike | str) -> bool:
    """Whether a TorchScript archive's code, a torch.export program's graph or an AOTInductor package's
    wrapper calls ``torch.ops.lstmopt.*`` (so loading it needs lstmopt's native library registered first),
    read from those records themselves."""
    try:
        with zipfile.ZipFile(path) as archive:
            budget = _MAX_CODE_BYTES
            for info in archive.infolist():
                code = "/code/" in info.filename and info.filename.endswith(".py")
                # a program's graph; an AOTInductor package's calls of ops it has no C++ for
                graph = ("/models/" in info.filename or "/aotinductor/" in info.filename) and \
                    info.filename.endswith(".json")
                if not (code or graph):
                    continue
                with archive.open(info) as record:
                    text = record.read(budget)
                budget -= len(text)
                if b"ops.lstmopt." in text or b'"target": "lstmopt::' in text:
                    return True
                if budget <= 0:
                    raise UsageError(f"{path} holds over {_MAX_CODE_BYTES >> 20} MB of TorchScript code; "
                                     "not an artifact lstmopt wrote")
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UsageError(f"cannot read {path} as a TorchScript archive ({exc})") from exc
    return False
