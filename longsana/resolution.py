"""Resolution binning for the 480p models: generate at the trained size nearest in aspect ratio, then resize and
center-crop the decoded video back to the size the user asked for.

SANA-Video was trained on a fixed set of 480p shapes (one per aspect ratio, sides multiples of 16 so that the
latent grid divides into 2x2 patches). Asking for another size would put the network off its training
distribution, so the pipeline generates at the table entry whose height/width ratio is closest and fixes the
size in pixel space afterwards. Both steps reproduce diffusers' SanaVideoPipeline (`use_resolution_binning=True`):
the same table, the same first-wins tie rule, bilinear resize (align_corners=False) by the larger of the two
scale factors with sizes truncated to ints, and a center crop with the extra pixel on the far side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# height/width ratio (as written in the released table) -> (height, width)
ASPECT_RATIO_480_BIN: dict[str, tuple[int, int]] = {
    "0.5": (448, 896),
    "0.57": (480, 832),
    "0.68": (528, 768),
    "0.78": (560, 720),
    "1.0": (624, 624),
    "1.13": (672, 592),
    "1.29": (720, 560),
    "1.46": (768, 528),
    "1.67": (816, 496),
    "1.75": (832, 480),
    "2.0": (896, 448),
}


def classify_height_width_bin(height: int, width: int,
                              ratios: dict[str, tuple[int, int]] = ASPECT_RATIO_480_BIN) -> tuple[int, int]:
    """The (height, width) of the table entry whose ratio is nearest height / width (first entry wins ties)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    ar = height / width
    key = min(ratios, key=lambda r: abs(float(r) - ar))
    return ratios[key]


def resize_and_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale `video` (..., H, W), float, so that it covers height x width, then cut out the centered window.

    Works on any leading layout ((B, C, T, H, W) decoded video, (T, C, H, W) frames): bilinear interpolation
    treats every plane on its own, so the planes are folded into one batch."""
    *lead, H, W = video.shape
    if (H, W) == (height, width):
        return video
    if not video.is_floating_point():
        raise TypeError(f"resize_and_crop needs a float tensor, got {video.dtype}")
    ratio = max(height / H, width / W)
    # int() truncates like diffusers; max() only guards against a float product landing a hair below the target
    h, w = max(height, int(H * ratio)), max(width, int(W * ratio))
    planes = F.interpolate(video.reshape(-1, 1, H, W), size=(h, w), mode="bilinear", align_corners=False)
    top, left = (h - height) // 2, (w - width) // 2
    return planes[:, :, top:top + height, left:left + width].reshape(*lead, height, width)
