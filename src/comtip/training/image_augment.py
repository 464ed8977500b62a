"""Image augmentation on a whole uint8 batch, on the device the batch lives on.

H&E patches have no canonical orientation, so flips and 90° rotations are free label-preserving
views (as in BLEEP and mclSTExp); a light brightness/contrast/saturation jitter covers stain and
scanner variation. Every draw comes from an explicit generator, so a step's augmentation is a
function of the step's seed only.
"""

from __future__ import annotations

import torch

# ITU-R BT.601 luma, as torchvision's rgb_to_grayscale
LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, strength: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Factors in [1 - strength, 1 + strength], one per image, shaped to broadcast over BHWC."""
    u = torch.rand(n, generator=generator, device=device)
    return (1.0 + strength * (2.0 * u - 1.0)).view(n, 1, 1, 1)


def flip_and_rotate(images: torch.Tensor, *, flip: bool, rot90: bool, generator: torch.Generator) -> torch.Tensor:
    """Per image: a random horizontal and vertical flip and a random multiple of 90° (BHWC)."""
    n, device = images.shape[0], images.device
    if flip:
        for dim in (2, 1):  # horizontal (W), vertical (H)
            chosen = torch.rand(n, generator=generator, device=device) < 0.5
            images = torch.where(chosen.view(n, 1, 1, 1), images.flip(dim), images)
    if rot90:
        # every image turned by k quarter turns, then each image's own k picked with torch.where:
        # boolean-mask indexing (images[chosen]) would wait for the GPU to count the chosen images
        # (a host-device sync per k in every training step). Square patches (checked by SpotData).
        turns = torch.randint(0, 4, (n,), generator=generator, device=device).view(n, 1, 1, 1)
        rotated = images
        for k in (1, 2, 3):
            rotated = torch.where(turns == k, torch.rot90(images, k, dims=(1, 2)), rotated)
        images = rotated
    return images


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s] (BHWC uint8
    in, uint8 out, so the model's own preprocessing is applied unchanged afterwards)."""
    n, device = images.shape[0], images.device
    x = images.float()
    luma = torch.tensor(LUMA, device=device)
    x = x * _uniform(n, strength, generator, device)
    mean = (x @ luma).mean(dim=(1, 2)).view(n, 1, 1, 1)
    x = (x - mean) * _uniform(n, strength, generator, device) + mean
    gray = (x @ luma).unsqueeze(-1)
    x = (x - gray) * _uniform(n, strength, generator, device) + gray
    return x.clamp_(0, 255).round_().to(torch.uint8)


def augment_images(
    images: torch.Tensor, *, flip: bool, rot90: bool, jitter: float, generator: torch.Generator
) -> torch.Tensor:
    """All training-time image augmentations of one uint8 (B, H, W, 3) batch."""
    images = flip_and_rotate(images, flip=flip, rot90=rot90, generator=generator)
    if jitter > 0:
        images = color_jitter(images, jitter, generator)
    return images
