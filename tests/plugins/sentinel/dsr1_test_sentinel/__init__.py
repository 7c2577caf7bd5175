"""Proves whether dsr1 ran this distribution's code: every module of it appends its name to
the file named by ``DSR1_TEST_SENTINEL`` when imported. Its entry points are an unlisted
attention plugin (``sentinel``), one that claims the name of another distribution's plugin
(``attention:sdpa``) and one that claims the name of a core builtin (``graph:eager``)."""
import os


def mark(name: str) -> None:
    path = os.environ.get("DSR1_TEST_SENTINEL")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(name + "\n")


mark(__name__)
