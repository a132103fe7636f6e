"""Installs llamafactory-vision and the one-line .pth that autoloads it into LLaMA-Factory.

LLaMA-Factory has no plugin entry point, and `torchrun` / the web UI start training in fresh interpreters, so the
package is activated from a `.pth` file (run by `site` at interpreter start). Regular wheels get the file through
`build_py`; PEP 660 editable wheels carry neither build_lib extras nor data_files, so `editable_wheel` is extended
to write it too. Uninstalling removes it in both modes because it is listed in the wheel's RECORD.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "llamafactory_vision.pth"
PTH_LINE = "import llamafactory_vision._bootstrap as _lfv; _lfv.install()\n"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, PTH_NAME), "w") as f:
            f.write(PTH_LINE)


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        strategy = super()._select_strategy(name, tag, build_lib)

        class _WithPth:
            def __init__(self, inner):
                self._inner = inner

            def __call__(self, wheel, files, mapping):
                self._inner(wheel, files, mapping)
                wheel.writestr(PTH_NAME, PTH_LINE.encode())

            def __enter__(self):
                self._inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self._inner.__exit__(*exc)

        return _WithPth(strategy)


with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="llamafactory-vision",
    version="0.1.0",
    description="Grounding, image editing and multi-granularity vision fine-tuning for LLaMA-Factory",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    package_dir={"": "plugin", "llamafactory_vision.templates": "templates"},
    packages=[*find_packages(where="plugin"), "llamafactory_vision.templates"],
    package_data={"llamafactory_vision.templates": ["*.yaml", "strokes/*.yaml"]},
    install_requires=[
        "torch==2.11.0",
        "torchvision==0.26.0",
        "torchaudio==2.11.0",
        "llamafactory==0.9.5",
        "diffusers",
        "qwen-vl-utils",
        "scipy",
        # LLaMA-Factory's predict_with_generate metrics import these
        "jieba",
        "nltk",
        "rouge-chinese",
    ],
    extras_require={
        "deepspeed": ["deepspeed"],
        # setuptools/wheel: the tests build this package's wheel offline (--no-build-isolation)
        # playwright: the LLaMA Board browser tests (they drive the system chromium, see the Makefile)
        # pytest-xdist: `make test` runs the suite on two workers (most tests wait on single-threaded CLI runs)
        "dev": ["pytest", "pytest-xdist", "hypothesis", "torchmetrics", "ruff", "setuptools>=70.1", "wheel", "playwright"],
    },
    entry_points={"console_scripts": ["llamafactory-vision=llamafactory_vision.cli:main"]},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
