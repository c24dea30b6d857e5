"""`python -m fosctrain` runs the `fosc` command line."""

from fosctrain.cli import main

raise SystemExit(main())
