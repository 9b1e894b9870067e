"""Test setup: Triton kernels run through the interpreter where no GPU is visible, and `cuda` tests
are skipped (reported as skipped, never passed) without a GPU and the CUDA build."""
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of a Triton kernel: triton.jit reads it at definition time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ldmfast.ops import _native  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and _native.cuda_module() is not None:
        return
    reason = ("no CUDA GPU visible to torch" if not torch.cuda.is_available()
              else f"ldmfast built without CUDA: {_native.import_error('_cuda')}")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """Three small phantom cases, all with a lesion: the training-loop tests' data set."""
    from ldmfast.data import make_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(root, n_cases=3, shape=(32, 32, 4), seed=5, lesion_fraction=1.0, progress=False)
    return root
