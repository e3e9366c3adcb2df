"""Turn an image into the model's input tensor, as the manifest's preprocessing says."""

from pathlib import Path

import numpy as np
from PIL import Image

from models.manifest import Preprocessing


def image_to_tensor(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """One image as a batch of one, float32, in the manifest's layout and normalisation."""
    height, width = spec.resize
    image = image.convert(spec.color if spec.color != "BGR" else "RGB").resize((width, height))
    pixels: np.ndarray = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if spec.color == "BGR":
        pixels = pixels[:, :, ::-1]
    pixels = np.multiply(pixels, spec.scale, dtype=np.float32)
    pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels[None], dtype=np.float32)


def load_image(path: Path, spec: Preprocessing) -> np.ndarray:
    with Image.open(path) as image:
        return image_to_tensor(image, spec)
