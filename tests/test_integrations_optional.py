"""The training-stack integrations stay optional: ``import cmbn_ext`` loads none of the frameworks."""
import subprocess
import sys

FRAMEWORKS = ("lightning", "pytorch_lightning", "accelerate", "mmengine", "mmcv", "ultralytics", "timm")


def test_import_cmbn_ext_imports_no_framework():
    code = ("import sys, cmbn_ext, cmbn_ext.integrations; "
            f"print(sorted({{name.split('.')[0] for name in sys.modules}} & set({FRAMEWORKS!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
