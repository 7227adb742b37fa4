"""Open one version folder in a process of its own, as a worker would: `python -m models.probe
FOLDER NAME THREADS PROVIDERS`. Exit 0 when it opens, 1 with the refusal on stderr when it is
refused; a crash of ONNX Runtime kills only this process (service/crashguard.py reads the signal).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import ArtifactError
from .servable import open_version


def main(argv: list[str]) -> int:
    folder, name, threads, providers = argv
    try:
        open_version(Path(folder), name=name, threads=int(threads), providers=tuple(providers.split(",")))
    except ArtifactError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
