"""`python -m service`: the same as the `runcomfy-gateway` console script."""

from service.cli import main

raise SystemExit(main())
