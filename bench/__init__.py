"""kvmlet's benchmarks, measured side by side with QEMU on the same host in the same run.

``python -m bench`` (or ``kvmlet bench``) runs every benchmark or the ones named, prints a table of medians,
minima, maxima and the median of the pairwise ratios, and writes the results to a JSON file. See
docs/performance.md for the method and the figures.
"""
