"""mmengine and mmcv, the real packages: ``norm_cfg=dict(type="CmBN2d", ...)`` builds our layer through
mmcv's ``build_norm_layer`` under BatchNorm's names, and ``CmBNHook`` ends the windows when a Runner's
optimizer wrapper updates, across epoch boundaries as mmengine accumulates."""
import pytest
import torch

pytest.importorskip("mmengine")
from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import cmbn_ext  # noqa: E402
from accumulation import (InputRecorder, assert_committed, cmbn_layer, micro_batch_loader,  # noqa: E402
                          tiny_model, window_sizes)
from cmbn_ext.integrations.mmengine import CmBNHook  # noqa: E402

# A window left open across an optimizer step (or at eval()) is an error.
pytestmark = pytest.mark.filterwarnings("error::cmbn_ext.OpenWindowWarning")


@pytest.fixture
def mmcv_cnn():
    return pytest.importorskip("mmcv.cnn")


@pytest.mark.parametrize("name, cls", [("CmBN", cmbn_ext.CrossMiniBatchNorm2d),
                                       ("CmBN1d", cmbn_ext.CrossMiniBatchNorm1d),
                                       ("CmBN2d", cmbn_ext.CrossMiniBatchNorm2d),
                                       ("CmBN3d", cmbn_ext.CrossMiniBatchNorm3d),
                                       ("SyncCmBN", cmbn_ext.SyncCrossMiniBatchNorm)])
def test_build_norm_layer(mmcv_cnn, name, cls):
    abbreviation, layer = mmcv_cnn.build_norm_layer(dict(type=name, window=4, mode="cumulative"), 8,
                                                    postfix=1)
    assert abbreviation == "bn1" and type(layer) is cls
    assert (layer.num_features, layer.window, layer.eps) == (8, 4, 1e-5)
    _, frozen = mmcv_cnn.build_norm_layer(dict(type=name, requires_grad=False), 8)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_a_batchnorm_checkpoint_loads_into_a_cmbn_conv_module(mmcv_cnn):
    pretrained = mmcv_cnn.ConvModule(3, 8, 3, norm_cfg=dict(type="BN"))
    with torch.no_grad():
        pretrained.bn.running_mean.uniform_()
        pretrained.bn.weight.uniform_()
    model = mmcv_cnn.ConvModule(3, 8, 3, norm_cfg=dict(type="CmBN2d", window=4))
    assert type(model.bn) is cmbn_ext.CrossMiniBatchNorm2d
    model.load_state_dict(pretrained.state_dict(), strict=True)
    assert torch.equal(model.bn.running_mean, pretrained.bn.running_mean)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.eval()(x), pretrained.eval()(x), rtol=0, atol=0)


class TinyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.model = tiny_model(window=None)

    def forward(self, inputs, mode="tensor"):
        out = self.model(inputs)
        return {"loss": out.square().mean()} if mode == "loss" else out


class StateRecorder(Hook):
    priority = "LOWEST"  # after CmBNHook

    def __init__(self):
        self.after_iter = []  # (window, window_step, num_batches_tracked)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        layer = cmbn_layer(runner.model)
        self.after_iter.append((layer.window, int(layer.window_step), int(layer.num_batches_tracked)))


def run(tmp_path, model, num_batches, epochs, accumulate, hooks):
    runner = Runner(model=model, work_dir=str(tmp_path), train_dataloader=micro_batch_loader(num_batches),
                    train_cfg=dict(by_epoch=True, max_epochs=epochs),
                    optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1), accumulative_counts=accumulate),
                    custom_hooks=hooks, default_hooks=dict(checkpoint=None, logger=None),
                    experiment_name=f"cmbn_{tmp_path.name}", default_scope="mmengine")
    runner.train()
    return runner


def test_hook_ends_windows_when_the_optimizer_wrapper_updates(tmp_path):
    """7 iterations an epoch, 2 epochs, 3 per update: updates after iterations 3, 6, 9, 12 and 14 (the
    last of training), so one window spans the two epochs."""
    model, recorder = TinyModel(), StateRecorder()
    inputs = InputRecorder(cmbn_layer(model))
    run(tmp_path, model, 7, 2, 3, [CmBNHook(), recorder])
    sizes = window_sizes(14, 3)
    assert sizes == [3, 3, 3, 3, 2]
    expected, in_window, commits = [], 0, 0
    for iteration in range(1, 15):
        in_window += 1
        if iteration % 3 == 0 or iteration == 14:
            in_window, commits = 0, commits + 1
        expected.append((3, in_window, commits))
    assert recorder.after_iter == expected
    assert_committed(cmbn_layer(model), inputs.inputs, sizes)


def test_hook_is_built_from_a_config(tmp_path):
    model, recorder = TinyModel(), StateRecorder()
    inputs = InputRecorder(cmbn_layer(model))
    run(tmp_path, model, 4, 1, 3, [dict(type="CmBNHook", set_window=False), recorder])
    assert [state[0] for state in recorder.after_iter] == [None] * 4  # window left as built
    assert_committed(cmbn_layer(model), inputs.inputs, [3, 1])


def test_hook_refuses_a_model_without_cmbn_layers(tmp_path):
    model = TinyModel()
    model.model = cmbn_ext.revert_to_batchnorm(model.model)
    with pytest.raises(ValueError, match="no CmBN layers"):
        run(tmp_path, model, 2, 1, 1, [CmBNHook()])
