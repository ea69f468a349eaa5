"""``python -m fastattn.bench``: the same as the ``fastattn-bench`` console script."""

from fastattn.bench import main

raise SystemExit(main())
