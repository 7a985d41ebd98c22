"""Write the seed corpora of the codec and container fuzz targets anew.

Each target's ``seed_inputs()`` makes its seeds; they go to
``fuzz/corpus/<target>/<name>``.  (The seeds of fuzz_wire.py were written by
hand and are not made here.)  Run it after changing a target's input format::

    python fuzz/make_corpus.py
"""

from __future__ import annotations

from pathlib import Path

import fuzz_codecs
import fuzz_container

CORPUS = Path(__file__).parent / "corpus"


def main() -> None:
    for name, target in (("codecs", fuzz_codecs), ("container", fuzz_container)):
        directory = CORPUS / name
        directory.mkdir(parents=True, exist_ok=True)
        for seed_name, seed in target.seed_inputs().items():
            (directory / seed_name).write_bytes(seed)
        print(f"{directory}: {len(target.seed_inputs())} seeds")


if __name__ == "__main__":
    main()
