"""The README's "Use SADT in your own JAX code" example runs as written."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _section_code(title: str) -> str:
    with open(README) as f:
        text = f.read()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block in README section {title!r}"
    return "\n".join(blocks)


def test_use_sadt_in_your_own_code_example_runs(capsys):
    code = _section_code("Use SADT in your own JAX code")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    metrics = namespace["metrics"]
    assert {"loss", "ce", "kd", "grad_norm", "perturbation_norm", "sharpness"} <= set(metrics)
    assert float(metrics["perturbation_norm"]) > 0
    assert int(namespace["state"].step) == 3
    assert "loss" in capsys.readouterr().out
