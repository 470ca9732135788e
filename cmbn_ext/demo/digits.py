"""The demo's second task: classification of scikit-learn's 8x8 handwritten digits with a small CNN.

The digits ship inside the scikit-learn wheel, so nothing is downloaded. The model ``conv+bn1d`` puts a
BatchNorm1d on the pooled ``(N, C)`` features: it sees only as many values per channel as the micro-batch
has samples, 2 at micro-batch 2, the case where ``grad="exact"`` and ``grad="renorm"`` differ most
(SPEC section 4).
"""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_DIGITS = 1797  # images in scikit-learn's digits


@dataclasses.dataclass(frozen=True)
class DigitsClassification:
    """A fixed train / validation / test split of the digits; model ``conv+bn1d`` (or ``conv``)."""
    name: str = "classification"
    metric: str = "accuracy"
    models: tuple = ("conv+bn1d",)
    optimizer_batch: int = 32
    micro_batches: tuple = (2, 4, 8)
    ablation_micro_batches: tuple = (2, 4, 8)
    seeds: tuple = (0, 1, 2)
    learning_rates: tuple = (0.003, 0.01, 0.03, 0.1, 0.3)
    steps: int = 64
    sgd_momentum: float = 0.9
    weight_decay: float = 5e-4
    split_sizes: tuple = (1000, 297, 500)   # train, validation, test
    width: int = 16

    def describe(self):
        train, val, test = self.split_sizes
        lrs = ", ".join(f"{lr:g}" for lr in self.learning_rates)
        return (f"scikit-learn's 8x8 digits, {train} training, {val} validation and {test} test images "
                f"(one fixed split). Model `conv+bn1d`: three 3x3 conv layers ({self.width}, "
                f"{2 * self.width}, {2 * self.width} channels) each followed by a norm layer, global average "
                f"pooling, a hidden linear layer whose norm layer sees the pooled (N, C) features, i.e. "
                f"only micro-batch-size values per channel, and a linear classifier (model `conv` leaves "
                f"out the hidden layer). GroupNorm: 4 channels a group, one group on (N, C). SGD (momentum "
                f"{self.sgd_momentum}, weight decay {self.weight_decay}), cosine decay over {self.steps} "
                f"steps, learning rates {lrs}. Score: test accuracy.")

    def load_data(self):
        """``{"train", "val", "test"}``: ``(images (N, 1, 8, 8) float, labels (N,) int64)``, standardized
        with the training split's statistics."""
        from sklearn.datasets import load_digits  # the demo extra; the CSV ships in the wheel

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        train_size, val_size, test_size = self.split_sizes
        splits = {"train": order[:train_size], "val": order[train_size:train_size + val_size],
                  "test": order[train_size + val_size:train_size + val_size + test_size]}
        mean, std = images[splits["train"]].mean(), images[splits["train"]].std()
        images = (images - mean) / std
        return {split: (images[index], labels[index]) for split, index in splits.items()}

    def build_network(self, model_name, norm_layer):
        return DigitsNet(norm_layer, pooled_norm=(model_name == "conv+bn1d"), width=self.width)

    def make_optimizer(self, parameters, lr):
        return torch.optim.SGD(parameters, lr=lr, momentum=self.sgd_momentum,
                               weight_decay=self.weight_decay)

    def loss(self, logits, labels):
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def score(self, model, images, labels, batch=512):
        """Accuracy in eval mode (running statistics)."""
        model.eval()
        correct = sum((model(x).argmax(1) == y).sum().item()
                      for x, y in zip(images.split(batch), labels.split(batch)))
        return correct / len(labels)


class DigitsNet(nn.Module):
    """Three 3x3 conv layers with a norm layer each, global average pooling, a linear classifier.

    With ``pooled_norm`` a hidden linear layer and a norm layer on the pooled ``(N, C)`` features sit
    before the classifier: as BatchNorm1d it sees only N values per channel.
    """

    def __init__(self, norm_layer, pooled_norm=False, width=16):
        super().__init__()
        w1, w2 = width, 2 * width

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm_layer(c_out), nn.ReLU()]

        layers = block(1, w1) + block(w1, w2) + [nn.MaxPool2d(2)] + block(w2, w2)
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if pooled_norm:
            layers += [nn.Linear(w2, w2, bias=False), norm_layer(w2, dims=1), nn.ReLU()]
        layers += [nn.Linear(w2, 10)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)
