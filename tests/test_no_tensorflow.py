"""The data stages and the params loader never import TensorFlow (10 s here) or MLflow."""

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("module", ["stages.download", "stages.normalize", "pipeline.config", "pipeline.data"])
def test_module_imports_without_tensorflow_or_mlflow(module):
    code = (f"import sys, {module}; "
            "heavy = [m for m in ('tensorflow', 'keras', 'mlflow') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
