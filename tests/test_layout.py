"""The repository layout: the top-level kernels/ never shadows a dependency (issue 16)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run_from_repo_root(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_kernels_from_the_repo_root_is_not_ours():
    # transformers imports a third-party package named `kernels`; ours must not win
    where = _run_from_repo_root(
        "import kernels; print(getattr(kernels, '__file__', None) or list(kernels.__path__))"
    )
    assert str(REPO / "kernels" / "__init__.py") not in where
    assert where != str([str(REPO / "kernels")]) or _third_party_kernels_absent()


def _third_party_kernels_absent() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return True
    return False


def test_streammerge_kernels_are_the_top_level_kernels_directory():
    where = _run_from_repo_root("import streammerge.kernels.cpu_merge as m; print(m.__file__)")
    assert Path(where) == REPO / "kernels" / "cpu_merge.py"


def test_transformers_llama_imports_from_the_repo_root():
    pytest = __import__("pytest")
    pytest.importorskip("transformers")
    out = _run_from_repo_root("from transformers import LlamaForCausalLM; print('ok')")
    assert out.endswith("ok")
