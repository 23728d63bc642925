"""The commands of `lorafair COMMAND`, one module each: a plain typed function whose signature and docstring
jsonargparse turns into the command's arguments and --help (lorafair.cli holds the table of commands).

A function whose first parameter is `cfg: FitConfig` takes the settings of a run (`--config FILE_OR_NAME` and every
FitConfig key as a flag, lorafair.config_parse); its other parameters are arguments of their own: positional
without a default, `--name` flags with one, required `--name` flags when keyword-only without one. Each module
imports what its command runs only when it runs, so `lorafair configs` or `--help` stays quick.
"""
