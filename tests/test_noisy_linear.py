"""noisy_linear: ROAD's noisy linear imputation, against a sparse direct solve written here."""
import numpy as np
import pytest
from conftest import break_kernel
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
    # exact up to the stopping rule: tol=2e-6 (scaled residual) leaves up to ~5x that here (seeds 5-9 at 48²:
    # compiled solver 6.2e-6 to 1.04e-5, the Gauss-Seidel version before it 5.4e-6 to 9.4e-6, torch 7.4e-6 to 1.7e-5)
    assert (out - images).abs().max() < 2e-5


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


@pytest.mark.parametrize("solver", ["auto", "torch"])
def test_clamp_clips_removed_pixels_only(solver):
    """With large noise the removed pixels are clipped to [0, 1]; visible pixels, even outside [0, 1],
    stay as they are (both solvers: the compiled path clips with its own kernel)."""
    g = step_generator(12, 0, 0)
    images = torch.rand(3, 3, 40, 40, generator=g) * 3 - 1
    keep = _masks("blob", 3, 40, g)
    out = noisy_linear(images, keep, noise_std=1.0, generator=step_generator(2, 0, 0), solver=solver)
    removed = ~keep.bool().expand_as(images)
    assert torch.equal(out[~removed], images[~removed])
    assert out[removed].min() == 0.0 and out[removed].max() == 1.0
    assert (out[removed] > 0).any() and (out[removed] < 1).any()
    unclamped = noisy_linear(images, keep, noise_std=1.0, generator=step_generator(2, 0, 0), solver=solver,
                             clamp=False)
    assert torch.allclose(out[removed], unclamped[removed].clamp(0, 1))
    assert (unclamped[removed] < 0).any() and (unclamped[removed] > 1).any()


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


# --- the compiled CPU solver (solver="auto" on CPU) against the batched torch solver and the direct solve ---

SOLVER_KINDS = ["patches", "rectangles", "blob", "border"]


@pytest.mark.parametrize("kind", SOLVER_KINDS)
def test_compiled_and_torch_solvers_agree(kind):
    pytest.importorskip("numba")
    g = step_generator(9, 0, 0)
    images = torch.rand(3, 3, 56, 48, generator=g)  # not square: rows and columns are not mixed up
    keep = torch.nn.functional.interpolate(_masks(kind, 3, 56, g), size=(56, 48), mode="nearest")
    fast = noisy_linear(images, keep, noise_std=0.0)
    slow = noisy_linear(images, keep, noise_std=0.0, solver="torch")
    assert (fast - slow).abs().max() <= 1e-4, kind
    for i in range(3):
        ref = direct_solve(images[i].double().numpy(), keep[i, 0].numpy())
        assert np.abs(fast[i].double().numpy() - ref).max() < 1e-4, kind


def _hard_keep(kind, n, h, w, g):
    """Keep masks ``(n, 1, h, w)`` of kinds the benchmark's three do not cover."""
    keep = torch.ones(n, 1, h, w)
    if kind == "square":  # one big hole: the slowest to converge (the far interior is deep)
        keep[..., h // 8: h - h // 8, w // 8: w - w // 8] = 0
    elif kind == "lines":  # 1-px lines, rows and columns
        keep[..., ::5, :] = 0
        keep[..., :, 2::7] = 0
    elif kind == "almost_all":  # 98% removed: a few scattered visible pixels
        keep = (torch.rand(n, 1, h, w, generator=g) > 0.98).float()
        keep[..., 0, 0] = 1
    elif kind == "tiny":  # isolated single-pixel holes
        keep = (torch.rand(n, 1, h, w, generator=g) > 0.2).float()
    else:
        raise ValueError(kind)
    return keep


HARD_KINDS = ["square", "lines", "almost_all", "tiny"]


@pytest.mark.parametrize("shape", [(32, 32), (64, 64), (40, 72)])
@pytest.mark.parametrize("kind", HARD_KINDS)
def test_other_masks_and_sizes_match_a_direct_solve_with_margin(kind, shape):
    """The 1e-3 goal with a 5x margin (2e-4) on masks and sizes outside the benchmark's three."""
    g = step_generator(14, 0, 0)
    images = torch.rand(2, 3, *shape, generator=g)
    keep = _hard_keep(kind, 2, *shape, g)
    out = noisy_linear(images, keep, noise_std=0.0)
    for i in range(2):
        ref = direct_solve(images[i].double().numpy(), keep[i, 0].numpy())
        assert np.abs(out[i].double().numpy() - ref).max() <= 2e-4, (kind, shape)


@pytest.mark.slow
@pytest.mark.parametrize("kind", HARD_KINDS)
def test_other_masks_at_224_match_a_direct_solve_with_margin(kind):
    g = step_generator(15, 0, 0)
    images = torch.rand(1, 3, 224, 224, generator=g)
    keep = _hard_keep(kind, 1, 224, 224, g)
    out = noisy_linear(images, keep, noise_std=0.0)
    ref = direct_solve(images[0].double().numpy(), keep[0, 0].numpy())
    assert np.abs(out[0].double().numpy() - ref).max() <= 2e-4, kind


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_the_compiled_solver_handles_any_channel_count(channels):
    """Its loops are written for 3 channels; other counts are padded to groups of 3."""
    pytest.importorskip("numba")
    g = step_generator(16, 0, 0)
    images = torch.rand(2, channels, 24, 20, generator=g)
    keep = _masks("rectangles", 2, 24, g)[..., :20]
    out = noisy_linear(images, keep, noise_std=0.0)
    assert out.shape == images.shape
    for i in range(2):
        ref = direct_solve(images[i].double().numpy(), keep[i, 0].numpy())
        assert np.abs(out[i].double().numpy() - ref).max() < 1e-4, channels


@pytest.mark.parametrize("solver", ["auto", "torch"])
@pytest.mark.parametrize("shape", [(1, 9), (7, 1), (2, 2), (3, 5), (17, 33)])
def test_small_and_thin_images_match_a_direct_solve(solver, shape):
    g = step_generator(10, 0, 0)
    images = torch.rand(2, 3, *shape, generator=g, dtype=torch.float64)
    keep = (torch.rand(2, 1, *shape, generator=g) > 0.6).double()
    keep[:, :, 0, 0] = 1  # at least one visible pixel
    out = noisy_linear(images, keep, noise_std=0.0, solver=solver)
    assert out.dtype == torch.float64
    for i in range(2):
        ref = direct_solve(images[i].numpy(), keep[i, 0].numpy())
        assert np.abs(out[i].numpy() - ref).max() < 1e-5, (solver, shape)


@pytest.mark.parametrize("solver", ["auto", "torch"])
def test_no_hole_returns_the_images_and_a_single_pixel_hole_is_its_neighbours_mean(solver):
    g = step_generator(11, 0, 0)
    images = torch.rand(2, 3, 12, 12, generator=g)
    keep = torch.ones(2, 1, 12, 12)
    keep[1, 0, 5, 7] = 0
    out = noisy_linear(images, keep, noise_std=0.0, solver=solver)
    assert torch.equal(out[0], images[0])
    patch = images[1, :, 4:7, 6:9]
    weights = torch.tensor([[1, 2, 1], [2, 0, 2], [1, 2, 1]], dtype=images.dtype) / 12
    assert torch.allclose(out[1, :, 5, 7], (patch * weights).sum((1, 2)), atol=1e-6)
    assert torch.equal(out[1][keep[1].bool().expand(3, 12, 12)], images[1][keep[1].bool().expand(3, 12, 12)])


@pytest.mark.parametrize("solver", ["auto", "torch"])
def test_a_fully_removed_image_among_others_falls_back_and_the_rest_is_solved(solver):
    g = step_generator(12, 0, 0)
    images = torch.rand(3, 3, 24, 24, generator=g)
    keep = _masks("rectangles", 3, 24, g)
    keep[1] = 0
    out = noisy_linear(images, keep, noise_std=0.0, fallback=(0.1, 0.2, 0.3), solver=solver)
    assert torch.allclose(out[1], torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1).expand(3, 24, 24))
    for i in (0, 2):
        ref = direct_solve(images[i].double().numpy(), keep[i, 0].numpy())
        assert np.abs(out[i].double().numpy() - ref).max() < 1e-4


def test_a_hole_along_the_whole_border_matches_a_direct_solve():
    g = step_generator(13, 0, 0)
    images = torch.rand(2, 3, 30, 30, generator=g)
    keep = torch.zeros(2, 1, 30, 30)
    keep[0, :, 12, 12] = 1  # one visible pixel in the middle: the whole image is one hole
    keep[1, :, 1:-1, 1:-1] = 1  # a one-pixel frame, corners included
    out = noisy_linear(images, keep, noise_std=0.0)
    for i in range(2):
        ref = direct_solve(images[i].double().numpy(), keep[i, 0].numpy())
        assert np.abs(out[i].double().numpy() - ref).max() < 1e-4


def test_inputs_that_need_grad_use_the_torch_solver():
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    keep = torch.ones(1, 1, 16, 16)
    keep[..., 4:10, 4:10] = 0
    out = noisy_linear(images, keep, noise_std=0.0)
    assert torch.allclose(out.detach(), noisy_linear(images.detach(), keep, noise_std=0.0), atol=1e-4)


def test_unknown_solver_is_a_user_error():
    from masktrain.errors import UserError

    with pytest.raises(UserError, match="solver"):
        noisy_linear(torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8), solver="spsolve")


def test_a_compiled_solver_that_cannot_compile_falls_back_to_the_torch_solver(monkeypatch):
    kernels = pytest.importorskip("masktrain.noisy_linear_kernels")
    import masktrain.noisy_linear as nl

    break_kernel(monkeypatch, nl.KERNELS, kernels, "solve_batch")
    g = step_generator(11, 0, 0)
    images = torch.rand(2, 3, 24, 24, generator=g)
    keep = _masks("blob", 2, 24, g)
    with pytest.warns(RuntimeWarning, match="cannot lower"):
        out = noisy_linear(images, keep, noise_std=0.0)
    assert torch.equal(out, noisy_linear(images, keep, noise_std=0.0, solver="torch"))
    assert nl.KERNELS.get() is None  # from now on the torch solver, without another warning
