"""The README's usage example runs as written (on a tiny in-memory loader)."""

from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    start = text.index("```python", text.index("## Using it")) + len("```python")
    code = text[start : text.index("```", start)]
    monkeypatch.chdir(tmp_path)  # it saves ckpt.pt
    loader = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    scope = {"loader": loader}
    exec(compile(code, str(README), "exec"), scope)
    opt, model = scope["opt"], scope["model"]
    assert opt.step_count == 3 and opt.tracked_count == opt.budget
    assert (tmp_path / "ckpt.pt").exists()
    assert all(p.grad is not None for p in model.parameters())
