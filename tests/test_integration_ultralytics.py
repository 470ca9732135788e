"""ultralytics, the real trainer on the CPU, offline: a YOLOv8n built from its yaml trains on a tiny
synthetic dataset with ``add_cmbn_callbacks``. The windows end exactly at the trainer's optimizer steps
(which cross epoch boundaries), the running statistics match BatchNorm over each window concatenated, and
the EMA model (what ultralytics saves) keeps plain BatchNorm layers.

Each training runs in a process of its own: ultralytics changes global state (torch's thread count,
deterministic algorithms) that the other tests must not inherit.
"""
import concurrent.futures
import importlib.util
import multiprocessing
import os
import types
import warnings

import pytest
import torch

from accumulation import assert_committed

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None,
                                reason="ultralytics is not installed")

IMAGES, BATCH, NBS, EPOCHS = 10, 2, 8, 2  # 5 micro-batches an epoch, accumulate = NBS / BATCH = 4


def write_dataset(root):
    """IMAGES random 64x64 images with one box each, in ultralytics' layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        (root / "labels" / f"{i}.txt").write_text("0 0.5 0.5 0.4 0.4\n")  # class, box centre and size
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images\nval: images\nnames:\n  0: box\n")
    return root / "data.yaml"


def train(root, convert_before_ema):
    """Train in this (fresh) process; return what the layers and the EMA went through."""
    os.environ.update(YOLO_CONFIG_DIR=str(root / "config"), YOLO_OFFLINE="1")
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionTrainer

    import cmbn_ext
    from accumulation import InputRecorder
    from cmbn_ext.integrations.ultralytics import add_cmbn_callbacks

    warnings.simplefilter("error", cmbn_ext.OpenWindowWarning)  # a window open across a step fails

    class ConvertingTrainer(DetectionTrainer):
        """A trainer whose model has CmBN layers before the EMA copies it."""

        def get_model(self, *args, **kwargs):
            return cmbn_ext.convert_batchnorm(super().get_model(*args, **kwargs), window=None)

    record = {"after_batch": []}
    recorders = []

    def watch(trainer):  # runs after add_cmbn_callbacks' callback
        layers = [m for m in trainer.model.modules() if isinstance(m, cmbn_ext.CrossMiniBatchNorm2d)]
        recorders.extend(InputRecorder(layer) for layer in layers)
        record["layers"] = layers

    def after_batch(trainer):
        record["after_batch"].append(sorted({(int(layer.window_step), int(layer.num_batches_tracked))
                                             for layer in record["layers"]}))

    def before_conversion(trainer):
        record["ema_had_cmbn"] = any(isinstance(m, cmbn_ext.CrossMiniBatchNorm2d)
                                     for m in trainer.ema.ema.modules())

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_pretrain_routine_end", before_conversion)
    add_cmbn_callbacks(model)
    model.add_callback("on_pretrain_routine_end", watch)
    model.add_callback("on_train_batch_end", after_batch)
    model.train(data=str(write_dataset(root / "data")), epochs=EPOCHS, imgsz=64, batch=BATCH, nbs=NBS,
                workers=0, device="cpu", amp=False, plots=False, val=False, warmup_epochs=0, mosaic=0.0,
                project=str(root / "runs"), name="train", exist_ok=True, verbose=False,
                trainer=ConvertingTrainer if convert_before_ema else None)
    trainer = model.trainer
    ema_modules = list(trainer.ema.ema.modules())
    saved = torch.load(trainer.last, map_location="cpu", weights_only=False)["model"]  # the EMA, stripped
    return {
        "after_batch": record["after_batch"],
        "ema_had_cmbn": record["ema_had_cmbn"],
        "layers": [{"inputs": r.inputs, "running_mean": l.running_mean, "running_var": l.running_var,
                    "num_batches_tracked": l.num_batches_tracked, "momentum": l.momentum}
                   for r, l in zip(recorders, record["layers"])],
        "ema_types": sorted({type(m).__name__ for m in ema_modules if "Norm" in type(m).__name__}),
        "saved_types": sorted({type(m).__name__ for m in saved.modules() if "Norm" in type(m).__name__}),
        "scaler_patched": "step" in vars(trainer.scaler),
    }


def train_in_own_process(tmp_path, convert_before_ema):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(train, tmp_path, convert_before_ema).result(timeout=300)


@pytest.mark.parametrize("convert_before_ema", [False, True], ids=["recipe", "model-converted-before-ema"])
def test_yolo_trains_with_windows_closed_at_each_optimizer_step(tmp_path, convert_before_ema):
    result = train_in_own_process(tmp_path, convert_before_ema)
    # The trainer steps when 4 micro-batches have run since the last step: after global batches 3 and 7
    # (the second window spans the two epochs). The last 2 micro-batches are never stepped, and their
    # window stays open, as their gradients do.
    expected, in_window, steps = [], 0, 0
    for _ in range(IMAGES // BATCH * EPOCHS):
        in_window += 1
        if in_window == NBS // BATCH:
            in_window, steps = 0, steps + 1
        expected.append([(in_window, steps)])  # every CmBN layer in the same state
    assert result["after_batch"] == expected
    assert len(result["layers"]) > 50  # every BatchNorm of YOLOv8n was converted
    for layer in result["layers"]:
        assert len(layer["inputs"]) == IMAGES // BATCH * EPOCHS
        assert_committed(types.SimpleNamespace(**layer), layer["inputs"][:8], [4, 4])
    assert result["ema_had_cmbn"] == convert_before_ema
    # ModelEMA would average the window state of CmBN layers: the EMA, and what is saved, stay BatchNorm.
    assert result["ema_types"] == ["BatchNorm2d"] and result["saved_types"] == ["BatchNorm2d"]
    assert not result["scaler_patched"], "the hook was not removed at the end of training"
