"""Write the artifacts tests/test_compat.py loads under every supported torch release.

    python tools/compat_artifacts.py tests/data      # once per torch release, in an environment with that torch

Writes ``forecaster-torch<X.Y>.{torchscript,pickle,pt2}.pt``, ``forecaster-torch<X.Y>.aoti.pt2`` and ``forecaster-torch<X.Y>.expected.pt`` (the input
and what the optimized model computed for it here): a forecaster (tests/models.py) with its LSTMs on lstmopt's
default kernel, in each format. The AOTInductor package holds code compiled for this machine's instruction set:
write it on an AVX2 machine, so that every machine that runs the suite can run it. Run in the other release's environment, the test checks that each still loads
and computes the same.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"torchscript": ".torchscript.pt", "pickle": ".pickle.pt", "pt2": ".pt2.pt", "aoti": ".aoti.pt2"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))  # the pickle names models.Forecaster, as tests import it
    from lstmopt import optimize
    from lstmopt.artifacts.writing import write_artifact
    from models import build_forecaster

    release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    stem = args.directory / f"forecaster-torch{release}"
    torch.manual_seed(0)
    fast = optimize(build_forecaster().eval())
    x = torch.randn(3, 9, 3, generator=torch.Generator().manual_seed(1))
    for fmt in args.formats:
        write_artifact(fast, f"{stem}{FORMATS[fmt]}", format=fmt, metadata={"written_by_torch": str(torch.__version__)},
                       force=True, samples=[(x,)])
    with torch.no_grad():
        torch.save({"input": x, "output": fast(x), "torch": str(torch.__version__)}, f"{stem}.expected.pt")
    print(f"wrote {stem}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
