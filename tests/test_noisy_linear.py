"""noisy_linear: ROAD's noisy linear imputation, against a sparse direct solve written here."""
import numpy as np
import pytest
import torch

from masktrain.fills import fill
from masktrain.masks import make_keep_masks
from masktrain.noisy_linear import noisy_linear
from masktrain.rng import step_generator

scipy_sparse = pytest.importorskip("scipy.sparse")
from scipy.sparse.linalg import spsolve  # noqa: E402

OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def direct_solve(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The defining equations, one sparse direct solve: each removed pixel equals the weighted
    mean (1/6 direct, 1/12 diagonal) of its in-image neighbours; image (C, H, W), keep (H, W)."""
    C, H, W = image.shape
    removed = np.argwhere(keep < 0.5)
    index = -np.ones((H, W), dtype=np.int64)
    index[removed[:, 0], removed[:, 1]] = np.arange(len(removed))
    rows, cols, vals = [], [], []
    rhs = np.zeros((len(removed), C))
    for i, (y, x) in enumerate(removed):
        total = 0.0
        for dy, dx in OFFSETS:
            ny, nx = y + dy, x + dx
            if not (0 <= ny < H and 0 <= nx < W):
                continue
            w = 1 / 6 if dy == 0 or dx == 0 else 1 / 12
            total += w
            if index[ny, nx] >= 0:
                rows.append(i), cols.append(index[ny, nx]), vals.append(-w)
            else:
                rhs[i] += w * image[:, ny, nx]
        rows.append(i), cols.append(i), vals.append(total)
    A = scipy_sparse.csc_matrix((vals, (rows, cols)), shape=(len(removed),) * 2)
    sol = spsolve(A, rhs).reshape(len(removed), C)
    out = image.copy()
    out[:, removed[:, 0], removed[:, 1]] = sol.T
    return out


def _blob_keep(n, size, g):
    """Smooth random blobs: thresholded low-pass noise, ~40% removed."""
    low = torch.rand(n, 1, size // 8, size // 8, generator=g)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    thr = up.flatten(1).quantile(0.4, dim=1).view(n, 1, 1, 1)
    return (up > thr).float()


def _masks(kind, n, size, g):
    if kind == "patches":  # ROAD-like: random 4x4 patches, 50% removed
        coarse = (torch.rand(n, 1, size // 4, size // 4, generator=g) > 0.5).float()
        return torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")
    if kind == "rectangles":
        return make_keep_masks("rectangles", n, (size, size), g, count=2, area=(0.15, 0.35))
    if kind == "blob":
        return _blob_keep(n, size, g)
    if kind == "border":  # a hole touching the image border on all sides
        keep = torch.zeros(n, 1, size, size)
        keep[..., size // 3: size // 2, size // 3: size // 2] = 1
        return keep
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["patches", "rectangles", "blob", "border"])
def test_matches_a_sparse_direct_solve(kind):
    g = step_generator(3, 0, 0)
    images = torch.rand(3, 3, 40, 40, generator=g)
    keep = _masks(kind, 3, 40, g)
    out = fill(images, keep, "noisy_linear", noise_std=0.0)
    for i in range(3):
        ref = direct_solve(images[i].double().numpy(), keep[i, 0].numpy())
        assert np.abs(out[i].double().numpy() - ref).max() < 1e-4, kind


def test_sigma_zero_keeps_visible_pixels_and_is_deterministic():
    g = step_generator(4, 0, 0)
    images = torch.rand(4, 3, 32, 32, generator=g)
    keep = _masks("blob", 4, 32, g)
    a = fill(images, keep, "noisy_linear", noise_std=0.0)
    vis = keep.bool().expand_as(images)
    assert torch.equal(a[vis], images[vis])
    assert torch.equal(a, fill(images, keep, "noisy_linear", noise_std=0.0))
    assert a.min() >= 0 and a.max() <= 1  # a convex combination of visible pixels


def test_exact_on_a_constant_image():
    g = step_generator(5, 0, 0)
    colour = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1)
    images = colour.expand(3, 3, 48, 48).clone()
    keep = _masks("rectangles", 3, 48, g)
    out = fill(torch.where(keep.bool(), images, torch.rand(images.shape, generator=g)), keep, "noisy_linear", noise_std=0.0)
    assert (out - images).abs().max() < 1e-5


def test_noise_is_added_to_removed_pixels_only_with_the_given_std():
    g = step_generator(6, 0, 0)
    images = torch.full((2, 3, 64, 64), 0.5)
    keep = torch.ones(2, 1, 64, 64)
    keep[..., 8:56, 8:56] = 0
    out = fill(images, keep, "noisy_linear", step_generator(1, 0, 0), noise_std=0.05)
    removed = ~keep.bool().expand_as(images)
    assert torch.equal(out[~removed], images[~removed])
    assert abs((out - images)[removed].std().item() - 0.05) < 0.003
    again = fill(images, keep, "noisy_linear", step_generator(1, 0, 0), noise_std=0.05)
    assert torch.equal(out, again)  # the generator decides the noise


def test_nothing_visible_falls_back_to_the_mean_colour():
    images = torch.rand(2, 3, 16, 16)
    keep = torch.ones(2, 1, 16, 16)
    keep[1] = 0
    out = fill(images, keep, "noisy_linear", mean=(0.1, 0.2, 0.3), noise_std=0.0)
    assert torch.equal(out[0], images[0])
    assert torch.allclose(out[1], torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1).expand(3, 16, 16))


def test_unknown_option_is_a_user_error():
    from masktrain.errors import UserError

    images, keep = torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8)
    with pytest.raises(UserError, match="option"):
        fill(images, keep, "grey", noise_std=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["patches", "rectangles", "blob"])
def test_matches_a_direct_solve_at_224(kind):
    g = step_generator(7, 0, 0)
    images = torch.rand(2, 3, 224, 224, generator=g)
    keep = _masks(kind, 2, 224, g)
    out = noisy_linear(images, keep, noise_std=0.0)
    for i in range(2):
        ref = direct_solve(images[i].double().numpy(), keep[i, 0].numpy())
        assert np.abs(out[i].double().numpy() - ref).max() < 1e-3, kind


@pytest.mark.parametrize("kind", ["rectangles", "blob"])
def test_both_preconditioners_agree_with_a_direct_solve(kind):
    g = step_generator(8, 0, 0)
    images = torch.rand(2, 3, 64, 64, generator=g)
    keep = _masks(kind, 2, 64, g)
    for pc in ("multigrid", "jacobi"):
        out = noisy_linear(images, keep, noise_std=0.0, preconditioner=pc)
        for i in range(2):
            ref = direct_solve(images[i].double().numpy(), keep[i, 0].numpy())
            assert np.abs(out[i].double().numpy() - ref).max() < 1e-4, (kind, pc)
