"""``python -m fastattn.bench``: the same as the ``fastattn-bench`` console script."""

from fastattn.bench.cli import main

raise SystemExit(main())
