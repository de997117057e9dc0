import pytest
import torch


@pytest.fixture
def hf_offline(monkeypatch):
    """No network for datasets/transformers: both libraries read the switch at import, so set
    their copies too."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def require_tool(name: str) -> str:
    """The path of an external program a test needs (shellcheck, chromium, hadolint): the test
    skips without it on a developer's machine, and fails in CI, whose .ci/run installs it and
    sets XPAR_REQUIRE_TOOLS=1."""
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("XPAR_REQUIRE_TOOLS"):
            pytest.fail(f"{name} is not installed, and XPAR_REQUIRE_TOOLS=1 (CI) requires it")
        pytest.skip(f"needs {name} (Debian package; .ci/run installs it)")
    return path
