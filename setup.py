"""The packages and their data files, which pyproject.toml cannot express: vdg/, and configs/ shipped inside it
as the package `vdg.configs`.

configs/ stays at the top of the checkout (where the scripts and users look for it); a wheel carries it as
vdg/configs/, where `vdg.core.paths.CONFIG_DIR` finds it when vdg is installed. Everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_PACKAGES = ["vdg.configs", *(f"vdg.configs.{d.name}" for d in sorted(CONFIGS.iterdir()) if d.is_dir())]

setup(
    packages=[*find_packages(include=["vdg", "vdg.*"]), *CONFIG_PACKAGES],
    package_dir={"vdg.configs": "configs"},
    package_data={
        # the compiled kernel of sparse execution is built from source on first use
        "vdg": ["data/*.txt", "deploy/csrc/*.c"],
        **{name: ["*.yaml"] for name in CONFIG_PACKAGES},
    },
)
