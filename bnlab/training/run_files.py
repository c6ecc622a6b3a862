"""The names of a run's files (no imports: a sweep or the CLI reads them before JAX loads)."""

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"  # a finished run; never overwritten
# The experiment file a run came from: `bnlab evaluate`/`export` import it again, so that the
# normalizations and diagnostics it registers exist when the run's config is read back.
EXPERIMENT_FILE = "experiment.json"
FAILURE_FILE = "failure.json"  # the last failed attempt of a sweep trial that is being retried
EVALUATE_FILE = "evaluate.json"  # `bnlab evaluate --recalibrate N`: both accuracies
