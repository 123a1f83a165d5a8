"""How tests/data/lerobot/v3-av1 and v3-image were made: by LeRobot's own writer, the standalone
`lerobot-dataset` package (0.4.4), beside a CPU torch. torchvision is stubbed: the package imports it
but writing a dataset does not use it. Frames and vectors are those of tests/lerobot_fixtures.py.

    python -m venv /tmp/lr && /tmp/lr/bin/pip install torch==2.13.0 lerobot-dataset==0.4.4
    /tmp/lr/bin/python tests/data/lerobot/make.py tests/data/lerobot/v3-av1 video libsvtav1
    /tmp/lr/bin/python tests/data/lerobot/make.py tests/data/lerobot/v3-image image h264
"""

import importlib
import importlib.machinery
import sys
import types
from pathlib import Path

import numpy as np

STUBBED = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2", "torchvision.transforms.v2.functional",
           "torchvision.io")
CAMERAS = ["observation.images.top", "observation.images.wrist"]
TASKS = ["Pick up the red cube.", "Stack the blocks", "Pick up the red cube."]
LENGTHS = [9, 11, 10]


class _Stub(types.ModuleType):
    """Any attribute is a do-nothing class: enough for `from torchvision... import X` at import time."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


def _stub_torchvision() -> None:
    for name in STUBBED:
        module = _Stub(name)
        module.__path__ = []
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module


def main(out: Path, kind: str, codec: str) -> None:
    _stub_torchvision()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for lerobot_fixtures
    frame = importlib.import_module("lerobot_fixtures").frame
    LeRobotDataset = importlib.import_module("ledataset.datasets.lerobot_dataset").LeRobotDataset

    feats = {c: {"dtype": kind, "shape": (32, 32, 3), "names": ["height", "width", "channels"]} for c in CAMERAS}
    feats["observation.state"] = {"dtype": "float32", "shape": (2,), "names": ["episode", "frame"]}
    feats["action"] = {"dtype": "float32", "shape": (1,), "names": ["a"]}
    ds = LeRobotDataset.create("test/fixture", fps=10, features=feats, root=out, use_videos=kind == "video", vcodec=codec)
    for ep, n in enumerate(LENGTHS):
        for k in range(n):
            ds.add_frame({CAMERAS[0]: frame(ep, k, 0), CAMERAS[1]: frame(ep, k, 1),
                          "observation.state": np.array([ep, k], np.float32),
                          "action": np.array([k / 10], np.float32), "task": TASKS[ep]})
        ds.save_episode()
    ds.finalize()
    print("written", out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
