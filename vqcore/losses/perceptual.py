"""LPIPS (Zhang et al., arXiv:1801.03924) through the `lpips` package, with weights offline."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vqcore.losses.recon import check_pair, frames, warn_once

# torchvision's file names in the torch hub cache (what `lpips` would download)
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


@dataclass
class PerceptualConfig:
    """LPIPS (Zhang et al., arXiv:1801.03924) through the `lpips` package, weights offline.

    The linear heads ship with `lpips`; the backbone (torchvision AlexNet/VGG16 ImageNet
    weights) comes from `backbone_path`, else `$TORCH_HOME/hub/checkpoints/<BACKBONE_FILES>`.
    Without it the term is off (one warning): a random backbone is never scored as LPIPS.
    """

    net: str = "alex"  # "alex" | "vgg"
    backbone_path: str | None = None
    linear_path: str | None = None  # LPIPS linear heads; None: the v0.1 ones in `lpips`
    max_frames: int | None = None  # video: LPIPS on a random subset of valid frames per clip

    def validate(self) -> None:
        if self.net not in BACKBONE_FILES:
            raise ValueError(f"perceptual.net must be one of {sorted(BACKBONE_FILES)}, got {self.net!r}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError("perceptual.max_frames must be >= 1 or None")


def find_backbone(config: PerceptualConfig) -> Path | None:
    """The backbone weight file to use, or None when there is none on this machine."""
    if config.backbone_path:
        path = Path(config.backbone_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"perceptual.backbone_path {path} does not exist")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[config.net]
    return path if path.is_file() else None


class Perceptual(nn.Module):
    """Frozen LPIPS; `available` is False (and forward returns 0) without backbone weights."""

    def __init__(self, config: PerceptualConfig | None = None):
        super().__init__()
        config = config or PerceptualConfig()
        config.validate()
        self.config = config
        self.lpips: nn.Module | None = None
        path = find_backbone(config)
        if path is None:
            warn_once(
                f"lpips-{config.net}",
                f"LPIPS is OFF: no {config.net} backbone weights (set perceptual.backbone_path or "
                f"put {BACKBONE_FILES[config.net]} in {Path(torch.hub.get_dir()) / 'checkpoints'}). "
                "The perceptual loss term is dropped and LPIPS is reported unavailable.",
            )
            return
        import lpips  # imported here: it pulls in torchvision

        with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation, from lpips
            warnings.simplefilter("ignore")
            # pnet_rand builds the trunk without a download; its weights are replaced below
            model = lpips.LPIPS(
                pretrained=True, net=config.net, pnet_rand=True, verbose=False,
                model_path=config.linear_path,
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        # lpips keeps torchvision's `features.<i>` modules as `slice<k>.<i>`: rename and load
        # strictly, so a wrong or partial file fails loudly instead of leaving random layers
        trunk = {}
        for key in model.net.state_dict():
            src = "features." + key.split(".", 1)[1]
            if src not in state:
                raise ValueError(f"{path}: no {src!r}; not a torchvision {config.net} state dict")
            trunk[key] = state[src]
        model.net.load_state_dict(trunk, strict=True)
        self.backbone_file = str(path)
        self.lpips = model.eval().requires_grad_(False)

    @property
    def available(self) -> bool:
        return self.lpips is not None

    def train(self, mode: bool = True) -> Perceptual:
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()  # frozen metric network: dropout off always
        return self

    def select_frames(
        self, x_hat: torch.Tensor, x: torch.Tensor, frame_mask: torch.Tensor | None = None,
        max_frames: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames (N, C, H, W) to score: all valid frames, or a random ≤ max_frames per clip."""
        if x.dim() == 4:
            return x_hat, x
        b, t = x.shape[0], x.shape[2]
        mask = frame_mask if frame_mask is not None else torch.ones(b, t, dtype=torch.bool)
        idx = []
        for i in range(b):
            valid = mask[i].nonzero().flatten().cpu()
            if max_frames is not None and valid.numel() > max_frames:
                valid = valid[torch.randperm(valid.numel())[:max_frames]]
            idx.append(valid + i * t)
        sel = torch.cat(idx).to(x.device)
        return frames(x_hat)[sel], frames(x)[sel]

    def per_frame(self, x_hat: torch.Tensor, x: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """LPIPS of each image/frame pair (N,) in fp32; inputs (N, 3, H, W) in [-1, 1]."""
        if self.lpips is None:
            raise RuntimeError("LPIPS unavailable: no backbone weights (see the warning)")
        out = [
            self.lpips(a.float(), b.float()).flatten()
            for a, b in zip(x_hat.split(chunk), x.split(chunk))
        ]
        return torch.cat(out)

    def forward(
        self, x_hat: torch.Tensor, x: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean LPIPS over frames (per frame for video, optionally a random subset)."""
        check_pair(x_hat, x)
        if self.lpips is None:
            return x_hat.new_zeros((), dtype=torch.float32)
        a, b = self.select_frames(x_hat, x, frame_mask, self.config.max_frames)
        return self.lpips(a.float(), b.float()).mean()
