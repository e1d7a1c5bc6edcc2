#!/usr/bin/env python
"""Entry point kept from the seed's layout: `python train/run.py fit|compare|eval|predict ...` runs the same
commands as `gq fit|compare|eval|predict` (their code is in gq.tools.training; train/ is a library)."""

from gq.tools.training import cli

if __name__ == "__main__":
    cli()
