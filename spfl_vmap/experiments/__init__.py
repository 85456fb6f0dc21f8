"""Experiments built from whole runs: the attack x defense matrix, privacy-utility curves and the
engine benchmarks. The command line (``spfl matrix | privacy-curve | bench``) is a thin layer over
these functions; they import no command-line code."""
