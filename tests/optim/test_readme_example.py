"""The README's standalone example runs as printed: `Muon(...)` on a plain nn.Module, configured by its
constructor alone, trains."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    section = README.read_text().split("## The optimizer on its own", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_uses_the_constructor_only_and_trains():
    code = _example()
    assert re.search(r"^\s*opt\.\w+\s*=", code, re.M) is None, "the example sets an optimizer attribute"
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    model, opt, tokens, F = namespace["model"], namespace["opt"], namespace["tokens"], namespace["F"]
    assert type(opt).__name__ == "Muon" and type(model).__bases__ == (torch.nn.Module,)
    assert [g["algorithm"] for g in opt.param_groups] == ["muon", "muon", "muon", "adamw"]
    first = namespace["loss"].item()
    # Ten more steps from where the example stopped: the loss keeps falling.
    for _ in range(10):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first
