"""Integrations with training frameworks, one module each; import the one you use.

- ``cmbn_ext.integrations.lightning``: ``CmBNCallback`` for PyTorch Lightning.
- ``cmbn_ext.integrations.mmengine``: the ``CmBN*`` norm layers in mmengine's ``MODELS`` registry (for
  mmcv's ``build_norm_layer``) and ``CmBNHook``.
- ``cmbn_ext.integrations.ultralytics``: ``add_cmbn_callbacks`` for the ultralytics trainer.

Nothing here is imported by ``import cmbn_ext``, so the frameworks stay optional.
"""
