"""Run ``benchmarks/gpu_check.py --dry-run`` as the GPU machine would import it.

Usage: ``python bench_gpu_imports.py OUT_DIR``. Every installed distribution that is
neither in the GPU machines' image (``IMAGE``, the package list of
/work/.library/device/KINDS.md, read 2026-11-17) nor carried as a wheel
(``benchmarks.gpu_check.CARRIED_WHEELS`` / ``BUILT_WHEELS``) is hidden: importing one
raises ModuleNotFoundError, as it would there. So the dry run passing here means the
carried wheel list is complete for the SFT path (versions are this venv's: the image's
torch 2.11 and other versions cannot be simulated on this machine).
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
""".split()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def hide_missing() -> None:
    """Make every top-level module of a distribution the GPU machine would not have unimportable."""
    from benchmarks.gpu_check import BUILT_WHEELS, CARRIED_WHEELS

    allowed = {_norm(n) for n in IMAGE} | {_norm(spec.split("==")[0]) for spec in CARRIED_WHEELS + BUILT_WHEELS}
    allowed.add("bridge-sft")  # the working tree travels
    hidden = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        if not {_norm(d) for d in dists} & allowed:
            hidden[module] = sorted(dists)

    # None in sys.modules: `import x` raises ModuleNotFoundError and importlib.util.find_spec("x") answers None,
    # as for a package that is not installed (libraries probe optional packages with find_spec).
    for module in hidden:
        sys.modules.setdefault(module, None)


if __name__ == "__main__":
    hide_missing()
    from benchmarks import gpu_check

    gpu_check.main(["--dry-run", "--out", sys.argv[1]])
