"""Offline evaluation on prompt sheets: sheets, metrics, nearest neighbours, the HTML report.

`bld_t2i.cli.evaluate` (the CLI) runs `run.evaluate`; the pieces are usable alone.
"""
