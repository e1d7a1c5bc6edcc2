#!/usr/bin/env python
"""Verify a shard dataset (same as `python -m shards.verify DIR`)."""

from shards.verify import cli

if __name__ == "__main__":
    cli()
