import numpy as np
from PIL import Image

from device.engine.preprocess import image_to_tensor
from models.manifest import Preprocessing
from models.zoo.surface_data import make_dataset, to_input


def test_matches_the_training_normalisation() -> None:
    images, _ = make_dataset(4, seed=3)
    spec = Preprocessing(resize=(64, 64), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    tensors = np.concatenate([image_to_tensor(Image.fromarray(img), spec) for img in images])
    np.testing.assert_allclose(tensors, to_input(images), atol=1e-6)


def test_resizes_and_converts_to_nhwc() -> None:
    spec = Preprocessing(resize=(32, 16), layout="NHWC", color="RGB")
    tensor = image_to_tensor(Image.new("L", (100, 50), color=255), spec)
    assert tensor.shape == (1, 32, 16, 3) and tensor.dtype == np.float32
    assert np.allclose(tensor, 1.0)
