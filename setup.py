"""The package list, which pyproject.toml cannot express: vdg/ and configs/, shipped inside it as `vdg.configs`.

configs/ stays at the top of the checkout (where the scripts and users look for it); a wheel carries it as
vdg/configs/, where `vdg.core.paths.CONFIG_DIR` finds it when vdg is installed. Everything else is pyproject.toml.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["vdg", "vdg.*"]), "vdg.configs"], package_dir={"vdg.configs": "configs"})
