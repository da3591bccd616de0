"""Experiments and benchmarks that use the method; the package ptunifier_min never imports them.
Each file is a script run from anywhere (`python tools/bench.py --help`); the tests import them as
`tools.<name>`."""
