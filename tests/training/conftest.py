"""A REES46 nightly run shared by the nightly and drift tests (trained once per session)."""

from __future__ import annotations

import pytest

from devstack.local_services import free_port
from railtower.settings import Settings, load_settings

# Small but real: two tower epochs, the full ranking pipeline, fewer resamples and cases.
NIGHTLY_OVERRIDES = {
    "evaluation": {"bootstrap_samples": 100, "max_sessions_per_task": 300},
    "training": {"max_epochs": 2},
    "ranking": {"mmr_lambda_grid": [0.85, 1.0]},
    "promotion": {"bootstrap_samples": 200},
    "log_level": "WARNING",
}

# A port nothing listens on, one for the whole test session (it is part of the settings'
# fingerprint, which a resumed run checks): the catalogue fold finds no Redis, so a
# developer's devstack Redis on the default port cannot leak its catalogue into these runs.
NO_REDIS = f"redis://127.0.0.1:{free_port()}/0"


def nightly_settings(root, **changes) -> Settings:  # type: ignore[no-untyped-def]
    """Settings for nightly runs under `root`; `changes` replace whole sections."""
    overrides = {
        **NIGHTLY_OVERRIDES,
        "artifacts_dir": root / "artifacts",
        "reports_dir": root / "reports",
        "serving": {"triton_repository": root / "triton_models", "redis_url": NO_REDIS},
        **changes,
    }
    return load_settings(**overrides)


@pytest.fixture(scope="session")
def nightly_rees46(tmp_path_factory):
    """(settings, result) of the first nightly run on REES46: no production yet."""
    from training.nightly import run_nightly

    root = tmp_path_factory.mktemp("nightly")
    settings = nightly_settings(root)
    result = run_nightly(settings, ["rees46"])
    return settings, result
