"""Training: one run from a validated config to its files.

`step` (the train state and the pure `train_step`) <- `train` (epochs scanned on device,
evaluation, the compiled programs) <- `loop` (chunks, evaluations, checkpoints, signals) <- `run`
(one run, resumable) and `batched` (trials of one structure vmapped in one program), which write
through `records` and `writers` and save through `checkpoint`; `restore` reads a run back;
`parallel` maps over devices and processes; `progress` draws the bar; `compile_cache` holds
compiled programs across commands.

May import: the base modules, `bnlab.ops`, `bnlab.data`, `bnlab.nn`, `bnlab.diagnostics`,
`bnlab.optim`, `bnlab.config`. Never a study: one run does not know about sweeps.
"""
