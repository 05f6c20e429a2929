"""`python -m pillion` runs the CLI."""

from pillion.cli.main import main

raise SystemExit(main())
