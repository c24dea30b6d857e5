"""`python -m fosctrain` runs the `fosc` command line; torchrun starts each rank this way."""

from fosctrain.cli import entry

entry()
