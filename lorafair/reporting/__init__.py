"""Comparisons of runs: `lorafair compare` (many runs of one config), `lorafair report` (its tables and plots) and the
paired intervals between methods."""
