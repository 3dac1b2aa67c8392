"""Shared test helpers. Tests take these as fixtures; no test file imports another test file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from data_helpers import realistic_scales, write_synthetic

from dist_video.clip import CLIP, CLIPConfig

# One intra-op thread unless OMP_NUM_THREADS says otherwise: the tests' models are tiny, so on a
# shared 2-core machine torch's default (a thread per core) makes the suite 2-3x slower, and
# CPU results then do not depend on the machine's core count. (The CLI subprocesses set their own.)
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def _tiny_clip(width=128, layers=4, heads=None, patch=16, image=64, embed=64, seed=0):
    """A small image-only CLIP with seeded random weights at realistic scales, in eval mode."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(embed_dim=embed, image_size=image, patch_size=patch, vision_width=width,
                     vision_layers=layers, vision_heads=heads or width // 64, text_layers=0)
    clip = CLIP(cfg)
    realistic_scales(clip)
    return clip.eval()


@pytest.fixture(scope="session")
def tiny_clip():
    """Factory: ``tiny_clip(width=128, layers=4, heads=None, patch=16, image=64, embed=64, seed=0)`` builds a
    new tiny CLIP on every call (seeded, so the same arguments give the same weights)."""
    return _tiny_clip


@pytest.fixture(scope="session")
def synthetic_videos(tmp_path_factory):
    """Factory: ``synthetic_videos(num_train, num_val, *, seed=0, size=32, num_frames=8)`` -> the
    folder of a small synthetic dataset (:func:`data_helpers.write_synthetic`), written once per
    session for each set of arguments. Tests only read it."""
    made: dict[tuple, Path] = {}

    def make(num_train: int, num_val: int, *, seed: int = 0, size: int = 32, num_frames: int = 8) -> Path:
        key = (num_train, num_val, seed, size, num_frames)
        if key not in made:
            made[key] = write_synthetic(tmp_path_factory.mktemp("synthetic"), num_train, num_val, seed=seed,
                                        size=size, num_frames=num_frames)
        return made[key]

    return make


OFFICIAL_TINY = Path(__file__).parent / "assets" / "official-tiny"


@pytest.fixture(scope="session")
def reference():
    """The authors' inputs and outputs on the official-tiny model (``tests/assets/official-tiny``)."""
    return torch.load(OFFICIAL_TINY / "reference_io.pt")


@pytest.fixture
def official_model():
    """The official-tiny checkpoint loaded with a float32 CLIP, in eval mode (a fresh copy per test)."""
    from dist_video import load_official_checkpoint

    return load_official_checkpoint(OFFICIAL_TINY / "official_checkpoint.pyth", clip_dtype="fp32").eval()


#: Branch configurations beyond the fixture's: layer subsets, alpha 1/2/4, 1-3 pooling layers,
#: odd kernels and ratios, an 8-pixel patch.
VARIANTS = {
    "subset-alpha4-3pool": dict(clip=dict(), dist=dict(num_frames=16, alpha=4, temporal_dim=24,
                                                       integration_dim=128, pooling_layers=3,
                                                       selected_layers=[1, 3])),
    "wide-3heads-patch8": dict(clip=dict(width=192, layers=3, patch=8, image=32, embed=48),
                               dist=dict(num_frames=8, alpha=2, temporal_dim=16, integration_dim=192,
                                         stem_kernel=3, temporal_kernel=5, temporal_mlp_ratio=2,
                                         integration_mlp_ratio=0.5, integration_temporal_mlp_ratio=0.5,
                                         pooling_layers=1, selected_layers=[0, 2])),
    "alpha1-single-layer": dict(clip=dict(width=64, layers=2), dist=dict(num_frames=4, alpha=1,
                                                                         temporal_dim=8, integration_dim=64,
                                                                         pooling_layers=2,
                                                                         selected_layers=[1])),
}


@pytest.fixture(scope="session")
def variants():
    return VARIANTS


@pytest.fixture(scope="session")
def variant_model():
    """Factory: ``variant_model(name, dtype=torch.float64, seed=3)`` -> (DiSTVideoModel in eval mode with
    every branch parameter random and non-zero, a matching random video of 2 clips)."""

    def make(name, dtype=torch.float64, seed=3):
        from dist_video import DiSTConfig, DiSTVideoModel

        v = VARIANTS[name]
        clip = _tiny_clip(**v["clip"]).to(dtype)
        torch.manual_seed(seed)
        model = DiSTVideoModel(clip, DiSTConfig(**v["dist"]), clip_dtype=dtype).to(dtype).eval()
        with torch.no_grad():
            for n, p in model.branch.named_parameters():  # non-zero everywhere, so every path counts
                p.normal_(mean=1.0 if n.endswith("ln.weight") else 0.0, std=0.05)
        size = clip.visual.image_size
        video = torch.randn(2, 3, model.config.num_frames, size, size, dtype=dtype)
        return model, video

    return make


def pytest_generate_tests(metafunc):
    """A test that takes ``variant_name`` runs once per entry of :data:`VARIANTS`."""
    if "variant_name" in metafunc.fixturenames:
        metafunc.parametrize("variant_name", list(VARIANTS))


def _test_device() -> torch.device:
    """The device of the model tests: ``DIST_VIDEO_TEST_DEVICE`` (cpu by default; ``cuda`` or
    ``cuda:N`` on a GPU machine, as ``scripts/gpu_check.sh --device cuda`` sets it)."""
    return torch.device(os.environ.get("DIST_VIDEO_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the model tests run on (see :func:`_test_device`). Asking for CUDA without a
    visible GPU fails the tests that take it, with a clear message, instead of running on CPU."""
    dev = _test_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"DIST_VIDEO_TEST_DEVICE={dev} but no CUDA GPU is visible to PyTorch {torch.__version__}")
    return dev


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, saying why, where PyTorch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU; PyTorch {torch.__version__} sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
