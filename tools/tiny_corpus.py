"""Deterministic English corpus for ``dsr1-tiny``, built only from text that ships with CPython.

Documents, in this order:

1. every entry of ``pydoc_data.topics.topics`` (the language reference shown by ``help("if")``), sorted by key;
2. one document per module of :data:`DOCSTRING_MODULES` (a fixed, sorted allowlist of side-effect-free standard-library
   modules): the module docstring, then the docstrings of its public classes, functions and
   methods defined in that module, sorted by name.

Split: document ``i`` (0-based, in the order above) is held out when ``i % 10 == 9``; the rest is train. Documents
are joined with ``\\n\\n``. The text depends only on the CPython version and the OS family (its docs and docstrings), not
on the environment or import order; :func:`corpus_info` records the hashes so a rebuild can be checked.

Run ``python tools/tiny_corpus.py`` to print sizes and hashes, ``--write-asset`` to refresh the copy dsr1 ships
(``core/dsr1/assets/tiny-corpus.json.gz``; do it with the Python that trains ``dsr1-tiny``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import platform
import subprocess
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

HELDOUT_EVERY = 10  # document i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY - 1

# Standard-library modules (pure Python or built in) whose import has no side effects: no GUI, browser, terminal,
# printing or network, and no DeprecationWarning on 3.11. A module missing from a stripped-down build is skipped.
# Never add `this`, `antigravity`, `tkinter`, `turtle`, `idlelib`, `webbrowser` or anything that starts work on import.
DOCSTRING_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.protocols", "asyncio.queues", "asyncio.runners", "asyncio.staggered", "asyncio.streams",
    "asyncio.subprocess", "asyncio.tasks", "asyncio.timeouts", "asyncio.transports", "asyncio.unix_events", "base64",
    "bdb", "binascii", "bisect", "builtins", "bz2", "cProfile", "calendar", "cmath", "cmd", "code", "codecs",
    "codeop", "collections", "collections.abc", "colorsys", "compileall", "concurrent.futures",
    "concurrent.futures._base", "concurrent.futures.process", "concurrent.futures.thread", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime", "dbm", "decimal",
    "difflib", "dis", "doctest", "email.base64mime", "email.charset", "email.errors", "email.feedparser",
    "email.generator", "email.header", "email.headerregistry", "email.message", "email.mime.text", "email.parser",
    "email.policy", "email.quoprimime", "email.utils", "enum", "errno", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "gc", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib",
    "importlib", "importlib.abc", "importlib.metadata", "importlib.resources", "importlib.resources.abc",
    "importlib.util", "inspect", "io", "ipaddress", "itertools", "json", "json.decoder", "json.encoder", "keyword",
    "linecache", "locale", "logging", "logging.handlers", "lzma", "mailbox", "math", "mimetypes", "modulefinder",
    "multiprocessing.connection", "multiprocessing.context", "multiprocessing.managers", "multiprocessing.pool",
    "multiprocessing.process", "multiprocessing.queues", "multiprocessing.reduction", "multiprocessing.shared_memory",
    "multiprocessing.synchronize", "netrc", "ntpath", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats",
    "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib", "runpy", "sched", "secrets",
    "select", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "stat", "statistics",
    "string", "struct", "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "tty", "types",
    "typing", "unicodedata", "unittest.case", "unittest.loader", "unittest.mock", "unittest.result", "urllib.error",
    "urllib.parse", "urllib.request", "urllib.robotparser", "uuid", "warnings", "wave", "weakref", "wsgiref.handlers",
    "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate", "xml.dom.expatbuilder", "xml.dom.minidom",
    "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader",
    "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)


def _clean(doc: object) -> str:
    """Return a docstring with its indentation removed, or ``""`` when there is none."""
    return inspect.cleandoc(doc).strip() if isinstance(doc, str) else ""


def _module_document(module: ModuleType) -> str:
    """Concatenate the docstrings of one module and of the public objects it defines, in sorted name order."""
    parts: list[str] = []
    seen: set[str] = set()

    def add(title: str, doc: str) -> None:
        if len(doc) >= 40 and doc not in seen:  # skip one-liners such as "Return self." and repeats
            seen.add(doc)
            parts.append(f"{title}\n\n{doc}")

    add(module.__name__, _clean(module.__doc__))
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        add(f"{module.__name__}.{name}", _clean(obj.__doc__))
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if (attr.startswith("_") and attr != "__init__") or not inspect.isroutine(member):
                    continue
                add(f"{module.__name__}.{name}.{attr}", _clean(member.__doc__))
    return "\n\n".join(parts)


@lru_cache(maxsize=1)
def documents() -> tuple[str, ...]:
    """All documents in corpus order: pydoc topics sorted by key, then one per allowlisted module.

    Built in a fresh isolated interpreter (``python -I -S``): whatever the caller has imported or monkeypatched
    (torch replaces ``inspect.getfile``, transformers adds methods to ``logging.Logger``) cannot change the text.
    """
    cmd = [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--documents-json"]
    return tuple(json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout))


def _collect_documents() -> list[str]:
    """Gather the documents in the current interpreter (see :func:`documents`)."""
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    for name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stripped-down CPython build; corpus_info() records the hash so it shows
            continue
        with warnings.catch_warnings():  # typing.io / typing.re warn on attribute access (gone in 3.12)
            warnings.simplefilter("ignore", DeprecationWarning)
            text = _module_document(module)
        if text:
            docs.append(text)
    return docs


def split_documents() -> tuple[list[str], list[str]]:
    """Return ``(train_docs, heldout_docs)``, split as the shipped corpus is (:func:`dsr1.corpus.split`)."""
    from dsr1.corpus import split

    return split(documents())


def train_text() -> str:
    """The training split as one string (documents joined by a blank line)."""
    return "\n\n".join(split_documents()[0])


def heldout_text() -> str:
    """The held-out split as one string (documents joined by a blank line)."""
    return "\n\n".join(split_documents()[1])


def corpus_info() -> dict[str, object]:
    """Sizes and SHA-256 hashes of both splits, for the model card and reproducibility checks."""
    train_docs, heldout_docs = split_documents()
    train, heldout = train_text(), heldout_text()
    return {
        "source": "pydoc_data.topics + docstrings of tools/tiny_corpus.py:DOCSTRING_MODULES",
        "python_version": platform.python_version(),
        "heldout_rule": f"document i held out when i % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}",
        "train_documents": len(train_docs),
        "heldout_documents": len(heldout_docs),
        "train_chars": len(train),
        "heldout_chars": len(heldout),
        "train_sha256": hashlib.sha256(train.encode()).hexdigest(),
        "heldout_sha256": hashlib.sha256(heldout.encode()).hexdigest(),
    }


#: The copy dsr1 ships as package data (read by :mod:`dsr1.corpus`), so the default text of ``dsr1 prune`` and
#: ``dsr1 quantize`` needs no checkout and does not change with the Python version running dsr1.
ASSET = Path(__file__).resolve().parents[1] / "core" / "dsr1" / "assets" / "tiny-corpus.json.gz"


def write_asset(path: Path = ASSET) -> dict[str, object]:
    """Write the documents with :func:`corpus_info` to ``path`` (gzip without a timestamp: same bytes each run)."""
    import gzip

    info = corpus_info()
    payload = json.dumps({"corpus": info, "documents": list(documents())}, ensure_ascii=True).encode()
    path.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))
    return info


if __name__ == "__main__":
    if sys.argv[1:] == ["--documents-json"]:
        print(json.dumps(_collect_documents()))  # ASCII-only JSON, whatever the stdout encoding
    elif sys.argv[1:] == ["--write-asset"]:
        print(json.dumps(write_asset(), indent=2))
    else:
        print(json.dumps(corpus_info(), indent=2))
