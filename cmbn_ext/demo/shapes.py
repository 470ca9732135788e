"""The demo's main task: semantic segmentation of generated shapes with a small U-Net.

Dense prediction is where small batches hurt in practice: a detector or a segmentation model holds one
or two images per GPU. The images are drawn on the fly by ``skimage.draw.random_shapes`` (scikit-image),
so nothing is downloaded, and the same seed always draws the same images.
"""
import dataclasses
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# random_shapes' categories, minus "ellipse": a circle is an ellipse too, so a pixel's label would be
# ambiguous. Class 0 is the background.
SHAPES = ("rectangle", "circle", "triangle")
CLASS_NAMES = ("background",) + SHAPES


@dataclasses.dataclass(frozen=True)
class ShapesSegmentation:
    """Images of 1 to 3 non-overlapping shapes, a label per pixel; the model is a U-Net."""
    name: str = "segmentation"
    metric: str = "mIoU"
    models: tuple = ("unet",)
    optimizer_batch: int = 16
    micro_batches: tuple = (1, 2, 4)
    ablation_micro_batches: tuple = (2,)   # grad="exact": one column keeps the sweep in budget
    seeds: tuple = (0, 1, 2)
    learning_rates: tuple = (5e-4, 1.5e-3, 5e-3)
    steps: int = 100
    weight_decay: float = 1e-4
    image_size: int = 32
    shape_sizes: tuple = (8, 20)     # random_shapes' min_size, max_size
    split_sizes: tuple = (1024, 256, 512)   # train, validation, test
    width: int = 16                  # channels at full resolution; x2 per level down

    def describe(self):
        train, val, test = self.split_sizes
        lrs = ", ".join(f"{lr:g}" for lr in self.learning_rates)
        return (f"{self.image_size}x{self.image_size} grey images of 1 to 3 non-overlapping shapes "
                f"({', '.join(SHAPES)}; {self.shape_sizes[0]} to {self.shape_sizes[1]} pixels) from "
                f"skimage.draw.random_shapes, each shape and the background at its own random "
                f"intensity; {train} training, {val} validation and {test} test images, each split "
                f"drawn from its own fixed seed. Segmentation into {len(CLASS_NAMES)} classes (background "
                f"and the 3 shapes) by a U-Net with {self.width}, {2 * self.width} and "
                f"{4 * self.width} channels at 3 resolutions ({UNet.NORM_LAYERS} norm layers). AdamW "
                f"(weight decay {self.weight_decay}), cosine decay over {self.steps} steps, learning "
                f"rates {lrs}. Score: mean intersection-over-union over the {len(CLASS_NAMES)} classes, "
                f"from the confusion matrix of the whole split.")

    def load_data(self):
        """``{"train", "val", "test"}``: ``(images (N, 1, H, W) float, labels (N, H, W) int64)``."""
        return {split: draw_shapes(size, self.image_size, self.shape_sizes, seed=index)
                for index, (split, size) in enumerate(zip(("train", "val", "test"), self.split_sizes))}

    def build_network(self, model_name, norm_layer):
        return UNet(norm_layer, width=self.width, classes=len(CLASS_NAMES))

    def make_optimizer(self, parameters, lr):
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=self.weight_decay)

    def loss(self, logits, labels):
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def score(self, model, images, labels, batch=256):
        """The mean IoU over the classes, in eval mode (running statistics)."""
        model.eval()
        classes = len(CLASS_NAMES)
        confusion = torch.zeros(classes * classes, dtype=torch.int64)
        for x, y in zip(images.split(batch), labels.split(batch)):
            predicted = model(x).argmax(1)
            confusion += torch.bincount((y * classes + predicted).flatten().cpu(), minlength=classes ** 2)
        return mean_iou(confusion.view(classes, classes))


def mean_iou(confusion):
    """Mean over classes of ``TP / (TP + FP + FN)`` from a ``(true, predicted)`` confusion matrix; a
    class absent from both the labels and the predictions is left out."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    return (true_positive[present] / union[present]).mean().item()


def draw_shapes(count, size, shape_sizes, seed):
    """``count`` images with their per-pixel labels, the same for the same arguments.

    Each shape comes from its own ``random_shapes`` call (one shape on a white canvas: its pixels are the
    non-white ones), which gives its exact mask; shapes that would overlap an earlier one are redrawn.
    """
    import skimage.draw  # the demo extra, needed only to draw: importing the demo works without it

    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size), np.float32)
    labels = np.zeros((count, size, size), np.int64)
    min_size, max_size = shape_sizes
    for image, label in zip(images, labels):
        background = rng.uniform()
        image[:] = background
        for _ in range(rng.integers(1, 4)):
            category = rng.integers(len(SHAPES))
            for _attempt in range(20):
                with warnings.catch_warnings():  # "could not fit": redrawn below
                    warnings.simplefilter("ignore")
                    canvas, _ = skimage.draw.random_shapes(
                        (size, size), max_shapes=1, min_shapes=1, shape=SHAPES[category],
                        min_size=min_size, max_size=max_size, channel_axis=None, rng=rng)
                mask = canvas != 255
                if mask.any() and not label[mask].any():
                    break
            else:
                continue  # no free room for this shape: the image keeps fewer
            intensity = background
            while abs(intensity - background) < 0.4:  # every shape stands out from the background
                intensity = rng.uniform()
            image[mask] = intensity
            label[mask] = category + 1
    images = (images - 0.5) / 0.3  # about zero mean, unit variance
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


class UNet(nn.Module):
    """Two levels down and two up with skip connections; 3x3 conv + norm + ReLU, one at each level and two
    at the bottom, where the receptive field (23 pixels) then spans the largest shapes.

    Every norm layer comes from ``norm_layer(channels)``. The transposed convs upsample (their backward
    is deterministic on CUDA, unlike interpolation's).
    """
    NORM_LAYERS = 6

    def __init__(self, norm_layer, width=16, classes=4):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width

        def stage(c_in, c_out, convs=1):
            layers = []
            for index in range(convs):
                layers += [nn.Conv2d(c_in if index == 0 else c_out, c_out, 3, padding=1, bias=False),
                           norm_layer(c_out), nn.ReLU()]
            return nn.Sequential(*layers)

        self.down1, self.down2, self.bottom = stage(1, w1), stage(w1, w2), stage(w2, w3, convs=2)
        self.up2, self.up1 = nn.ConvTranspose2d(w3, w2, 2, stride=2), nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.decode2, self.decode1 = stage(2 * w2, w2), stage(2 * w1, w1)
        self.head = nn.Conv2d(w1, classes, 1)

    def forward(self, x):
        full = self.down1(x)
        half = self.down2(F.max_pool2d(full, 2))
        quarter = self.bottom(F.max_pool2d(half, 2))
        half = self.decode2(torch.cat([self.up2(quarter), half], 1))
        full = self.decode1(torch.cat([self.up1(half), full], 1))
        return self.head(full)
