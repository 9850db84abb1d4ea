"""Training data that ships inside installed packages: nothing is downloaded.

- `digits`: scikit-learn's 8x8 handwritten digits, bilinearly upsampled to 16x16, 10 classes.
- `textures`: 32x32 RGB crops of scikit-image's bundled natural photographs (short side scaled to 128), with random flips;
  the right-most fifth (at least 40 px) of every photograph is held out for evaluation.

Images are float32 in [-1, 1], shape (N, C, H, W); labels int64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sejd.core.errors import SejdError

DATASETS = ("digits", "textures")
DATASET_PACKAGES = {"digits": "sklearn", "textures": "skimage"}  # from the `train` extra, imported when used
# RGB photographs stored inside scikit-image's wheel (no pooch download)
TEXTURE_IMAGES = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
                  "retina", "rocket", "stereo_motorcycle")
TEXTURE_SHORT_SIDE = 128  # photographs are downsampled to this short side so a 32x32 crop holds structure
HOLDOUT_FRACTION = 0.2


class Dataset:
    """A sampler of training batches and a fixed evaluation set."""

    def __init__(self, name: str, in_channels: int, img_size: int, num_classes: int):
        self.name, self.in_channels, self.img_size, self.num_classes = name, in_channels, img_size, num_classes

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class Digits(Dataset):
    def __init__(self):
        super().__init__("digits", 1, 16, 10)
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
        y = torch.from_numpy(d.target.astype(np.int64))
        self.train_x, self.train_y = x[:1500], y[:1500]
        self.test_x, self.test_y = x[1500:], y[1500:]

    def batch(self, n, generator):
        idx = torch.randint(len(self.train_x), (n,), generator=generator)
        return self.train_x[idx], self.train_y[idx]

    def heldout(self):
        return self.test_x, self.test_y


def _texture_photos() -> list[np.ndarray]:
    """The bundled photographs as float32 (H, W, 3) in [0, 1], short side TEXTURE_SHORT_SIDE."""
    import skimage.data
    from skimage.transform import rescale

    photos = []
    for name in TEXTURE_IMAGES:
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle returns (left, right, disparity)
            img = img[0]
        img = np.asarray(img)[..., :3].astype(np.float32) / 255.0
        photos.append(rescale(img, TEXTURE_SHORT_SIDE / min(img.shape[:2]), channel_axis=-1, anti_aliasing=True).astype(np.float32))
    return photos


class Textures(Dataset):
    def __init__(self, heldout_crops: int = 512):
        super().__init__("textures", 3, 32, 0)
        self.train, self.test = [], []
        for p in _texture_photos():
            cut = min(int(p.shape[1] * (1 - HOLDOUT_FRACTION)), p.shape[1] - 40)  # >= 40 px held out
            self.train.append(torch.from_numpy(p[:, :cut]).permute(2, 0, 1) * 2 - 1)  # (3, H, W)
            self.test.append(torch.from_numpy(p[:, cut:]).permute(2, 0, 1) * 2 - 1)
        g = torch.Generator().manual_seed(1234)
        self.test_x = torch.stack([self._crop(self.test, g, flip=False) for _ in range(heldout_crops)])

    def _crop(self, photos, g, flip=True):
        i = int(torch.randint(len(photos), (1,), generator=g))
        p = photos[i]
        s = self.img_size
        top = int(torch.randint(p.shape[1] - s + 1, (1,), generator=g))
        left = int(torch.randint(p.shape[2] - s + 1, (1,), generator=g))
        c = p[:, top:top + s, left:left + s]
        if flip and bool(torch.randint(2, (1,), generator=g)):
            c = c.flip(-1)
        return c

    def batch(self, n, generator):
        x = torch.stack([self._crop(self.train, generator) for _ in range(n)])
        return x, torch.zeros(n, dtype=torch.long)

    def heldout(self):
        return self.test_x, torch.zeros(len(self.test_x), dtype=torch.long)


def load_dataset(name: str) -> Dataset:
    if name == "digits":
        return Digits()
    if name == "textures":
        return Textures()
    raise SejdError(f"unknown dataset {name!r}; expected one of {DATASETS}")
