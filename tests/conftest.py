"""Strict test setup: 8 CPU devices, the offline MNIST folder, one TFDS preparation and one
compilation cache per session."""

import os
from pathlib import Path

# Several CPU devices for the multi-device tests; must precede the first jax import.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

# One persistent compilation cache per test session, shared with the subprocesses the tests
# start: the many runs of the same small configs compile each program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bnlab-jax-cache-")
    # Removed when the process that made it (the controller under xdist) exits.
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BNLAB_MNIST_DIR", str(ROOT.parent / "shared" / "data" / "mnist"))
# Absolute: the docs and notebook tests run their code from other folders.
os.environ["BNLAB_MNIST_DIR"] = str(Path(os.environ["BNLAB_MNIST_DIR"]).resolve())

import pytest  # noqa: E402

MNIST_DIR = Path(os.environ["BNLAB_MNIST_DIR"])


# The fast tier (`pytest -m "not slow"`) is what needs no trained MNIST run: tests that use
# real MNIST (these fixtures) train on it, and are `slow` with the subprocess, multi-process,
# notebook and docs tests marked in their files.
REAL_MNIST = frozenset({"mnist_dir", "tfds_dir", "make_config"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_MNIST & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _registries_as_found():
    """The registries are global and shape the config schema: a test that registers a
    normalization or a diagnostic (often through an experiment file it imports) must not leave
    it to the tests after it, whose recorded configs would carry its fields."""
    from bnlab import diagnostics, norms

    found = [(registry, dict(registry)) for registry in (norms.NORMS, diagnostics.DIAGNOSTICS)]
    yield
    for registry, entries in found:
        for name in set(registry) - set(entries):
            registry.pop(name)
        for name, spec in entries.items():
            if registry.get_spec(name) is not spec:
                registry[name] = spec


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder with the four standard MNIST IDX files (required: the tests use real MNIST)."""
    if not MNIST_DIR.is_dir():
        pytest.fail(
            f"MNIST IDX files not found at {MNIST_DIR}; set BNLAB_MNIST_DIR to their folder."
        )
    return MNIST_DIR


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory, mnist_dir) -> str:
    """A TFDS data dir prepared once per session from the IDX files."""
    from bnlab import config, data

    path = str(tmp_path_factory.mktemp("tfds"))
    cfg = config.validate(config.apply_overrides(config.default_config(), {"data.tfds_dir": path}))
    data.load(cfg.data, "test")  # prepares both splits
    return path


@pytest.fixture
def make_config(tfds_dir):
    """`make_config(path_or_None, **{"opt.lr": "0.1"})` -> validated Config on real MNIST."""
    from bnlab import config

    def make(path=None, **overrides):
        base = config.load_config(ROOT / path) if path else config.default_config()
        overrides = {"data.tfds_dir": tfds_dir, **{k: str(v) for k, v in overrides.items()}}
        return config.validate(config.apply_overrides(base, overrides))

    return make
