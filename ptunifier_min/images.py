"""Images as the model reads them: any file or PIL image -> a grayscale film -> uint8 pixels.

    img = load_image("a.dcm")                        # PIL "L": DICOM, 16-bit, EXIF, alpha handled
    x = ImageTransform(288).pixels(img)              # uint8 [1, 288, 288], resize + center crop
    x = ImageTransform(288, train=True, random_resized_crop=True).pixels(img, rng)

The loaders yield uint8 one-channel pixels and the model normalises them on the device
(model.normalize): 12x less host-to-device traffic than float RGB. A file that cannot be read is
an error naming it, never a skipped sample.
"""

import os
import random

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


def _read_dicom(path):
    try:
        import pydicom  # optional: only real RSNA data is DICOM
    except ImportError:
        raise ImportError(f"{path} is a DICOM file; reading it needs pydicom: "
                          "pip install pydicom") from None
    ds = pydicom.dcmread(path)
    x = ds.pixel_array.astype(np.float32)
    x = x * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        # MONOCHROME1 stores bright as low values; flip so that bone is white as everywhere else
        x = x.max() - x
    return _to_uint8(x)


def _to_uint8(x):
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
    return Image.fromarray(x.round().astype(np.uint8))  # 2-D uint8 -> mode "L"


# the EXIF tag; 1 = upright, 2..8 = the flips and rotations a viewer undoes
_EXIF_ORIENTATION = 0x0112


def grayscale(img):
    """A PIL image in any mode -> the grayscale ("L") image the model sees, as a viewer shows it.

    Shared by load_image (files) and the Python API (PIL images, arrays), so that the same pixels
    give the same input whichever way they arrive. A viewer applies the EXIF orientation of a JPEG
    (a phone photo of a film, a rotated export): so do we, or left and right would be swapped in
    the pixels but not in the report. Odd but valid modes are converted, not refused: 16-bit and
    32-bit grayscale are rescaled from their own min-max to 0..255 (a cast would clip a 12-bit
    radiograph to white); RGB, CMYK and palette images go through PIL's luma conversion; an alpha
    channel (RGBA, LA, palette transparency) is dropped, not composited, so that an export with a
    broken alpha cannot black out the image.
    """
    # checked first: exif_transpose copies even when upright
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    # I;16, I;16B, I (32-bit), F: rescale, do not clip
    if img.mode.startswith("I") or img.mode == "F":
        return _to_uint8(np.asarray(img, dtype=np.float32))
    return img.convert("L")


def load_image(path):
    """A grayscale ("L") PIL image from a JPEG / PNG (or DICOM through the optional pydicom), as a
    viewer shows it (`grayscale`: EXIF orientation, 16-bit rescaled, alpha dropped).

    `path` is a str or an os.PathLike. DICOM MONOCHROME1 is inverted (see _read_dicom). Every
    failure is an error that names the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if path.lower().endswith(".dcm"):
        try:
            return _read_dicom(path)
        except ImportError:
            raise
        except Exception as e:
            raise ValueError(f"cannot read DICOM image {path}: {e}") from None
    try:
        with Image.open(path) as img:
            # PIL raises above 2 x MAX_IMAGE_PIXELS but only warns between 1x and 2x, and a warning
            # scrolls past unseen while a huge decode eats the memory of every data-loader worker:
            # refuse both, naming the file.
            if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f"{img.width}x{img.height} pixels exceed PIL.Image.MAX_IMAGE_PIXELS = "
                    f"{Image.MAX_IMAGE_PIXELS}")
            img.load()  # decode now, so that a truncated file fails here and names the path
            return grayscale(img)
    # the warning under -W error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"cannot read image {path}: {e} (a possible decompression bomb; if the "
                         "file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


class ImageTransform:
    """PIL image -> uint8 pixels [1, size, size] (`pixels`): what the data loaders yield and the
    model normalises on the device (model.normalize, with its config's pixel statistics).

    Default (eval, and training as in the paper): resize the shorter side to `size`, then center
    crop.
    train=True with random_resized_crop=True: a random crop of `scale` of the area and aspect ratio
    in [3/4, 4/3] (torchvision's RandomResizedCrop), drawn from `rng` so that it can be replayed. No
    flips: left and right matter in radiology (heart, situs, laterality words in the reports).
    """

    def __init__(self, size, train=False, random_resized_crop=False, scale=(0.5, 1.0)):
        self.size, self.train, self.random_resized_crop, self.scale = (
            size, train, random_resized_crop, tuple(scale))

    def _random_box(self, w, h, rng):
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = round((target * ratio) ** 0.5), round((target / ratio) ** 0.5)
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return left, top, left + cw, top + ch
        return self._center_box(w, h)  # the rare fallback of torchvision

    @staticmethod
    def _center_box(w, h):
        m = min(w, h)  # resize-shorter-side + center crop == resize of the central square
        left, top = (w - m) // 2, (h - m) // 2
        return left, top, left + m, top + m

    def pixels(self, img, rng=None):
        """uint8 [1, S, S]: one channel, not normalised (a quarter of a float's bytes, a third of
        RGB's)."""
        w, h = img.size
        if self.train and self.random_resized_crop:
            box = self._random_box(w, h, rng if rng is not None else random)
        else:
            box = self._center_box(w, h)
        img = img.convert("L").resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        # a copy: PIL's buffer is read-only
        return torch.from_numpy(np.array(img, dtype=np.uint8))[None]
