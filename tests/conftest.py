import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
# slowed the suite 20x. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread per library for the whole suite: the tests check values, not speed, their tensors
# are small, and on a shared 2-core machine two threads per library ran 5-10x slower.
torch.set_num_threads(1)
try:
    from threadpoolctl import threadpool_limits

    _LIMITS = threadpool_limits(limits=1)  # BLAS/OpenMP of numpy, scipy, scikit-learn; kept for the session
except ImportError:  # threadpoolctl comes with scikit-learn (the dev extra)
    _LIMITS = None

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
SHARED_PROMPTS = os.path.abspath(os.path.join(SHARED, "data", "datadif_prompts_voc.json"))


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


@pytest.fixture(params=_devices())
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32])
def dtype(request):
    return request.param


@pytest.fixture(scope="session")
def shared_prompts():
    """Path of the shared 44k-prompt file; skips where ../shared is absent (a user's clone)."""
    if not os.path.exists(SHARED_PROMPTS):
        pytest.skip(f"needs ../shared/data/datadif_prompts_voc.json (not found at {SHARED_PROMPTS})")
    return SHARED_PROMPTS


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny seeded Stable Diffusion pipeline (seed 0, CPU, float32), built once per session.

    Tests must leave it as they found it (the capture restores the attention processors it
    replaced); a test that needs a pipeline of its own builds one."""
    from pccfast.diffusion.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe
