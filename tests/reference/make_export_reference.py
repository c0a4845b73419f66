"""Write ``tests/reference/export.npz``: the parameter names and shapes of torchvision's and timm's
ResNet-18 and ResNet-50, and the features each gives for the formula weights and input of
``tests/reference/formula_weights.py``; the independent reference that ``tests/test_export.py``
checks onepoch's exported backbones against.

Run it in the reference environment (torch 2.14.1, torchvision 0.29.1, timm; torchvision does not
import beside the project's CPU torch), from the repository root:

    /work/refvenv/bin/python tests/reference/make_export_reference.py

Keys: ``<lib>.<arch>.names`` and ``<lib>.<arch>.shapes`` (every state_dict entry, the classifier
``fc`` included, as the library builds the model: ``torchvision.models.<arch>()``,
``timm.create_model("<arch>")``), ``<lib>.<arch>.features`` (the model in eval mode with ``fc``
replaced by an identity, on ``formula_input()``, float64 maths on the float32 formula numbers),
``meta.versions``. This script does not import onepoch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from formula_weights import formula_input, formula_tensor  # noqa: E402

OUT = Path(__file__).with_name("export.npz")
ARCHS = ("resnet18", "resnet50")


def build(lib: str, arch: str) -> torch.nn.Module:
    return getattr(torchvision.models, arch)() if lib == "torchvision" else timm.create_model(arch, pretrained=False)


def main() -> None:
    out: dict[str, np.ndarray] = {}
    x = torch.from_numpy(formula_input()).double()
    for lib in ("torchvision", "timm"):
        for arch in ARCHS:
            model = build(lib, arch)
            state = model.state_dict()
            out[f"{lib}.{arch}.names"] = np.array(list(state))
            out[f"{lib}.{arch}.shapes"] = np.array([json.dumps(list(v.shape)) for v in state.values()])
            model.load_state_dict({k: torch.from_numpy(formula_tensor(k, tuple(v.shape))) for k, v in state.items()})
            model.fc = torch.nn.Identity()
            model = model.double().eval()
            with torch.no_grad():
                out[f"{lib}.{arch}.features"] = model(x).numpy()
            print(f"{lib} {arch}: {len(state)} entries, features {tuple(out[f'{lib}.{arch}.features'].shape)}, "
                  f"mean |f| {np.abs(out[f'{lib}.{arch}.features']).mean():.4g}")
    out["meta.versions"] = np.array(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__,
                                                "timm": timm.__version__}))
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
