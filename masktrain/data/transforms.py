"""Joint image + mask transforms (torchvision.transforms.v2, nearest interpolation for masks)."""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


def joint_transform(split: str, image_size: int, scale: tuple[float, float] = (0.5, 1.0)) -> v2.Transform:
    """Train: RandomResizedCrop + horizontal flip; eval: Resize + CenterCrop. Applied to
    ``(tv_tensors.Image, tv_tensors.Mask)`` together, so the mask follows the image."""
    if split == "train":
        return v2.Compose([v2.RandomResizedCrop(image_size, scale=tuple(scale), antialias=True), v2.RandomHorizontalFlip()])
    return v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])


def apply_joint(transform: v2.Transform, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """image ``(3, H, W)`` float, mask ``(1, H, W)`` {0, 1} -> both transformed, mask still binary."""
    out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return out_image.as_subclass(torch.Tensor).clamp(0, 1), (out_mask.as_subclass(torch.Tensor) > 0.5).float()
