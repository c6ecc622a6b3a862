"""Studies: many runs and what they show.

`sweep` (an experiment's grid to trials with stable ids, shards, resumable) runs them through
`bnlab.training`; `results` reads a sweep folder back (trials, groups over seeds, statistics);
`report` writes `report.md` with the figures of `plots` and `diag_plots` (their shared parts in
`figure_kit`).

May import: every layer below (`bnlab.training` and what it may import); only the CLI and
`bnlab.export` sit above it.
"""
