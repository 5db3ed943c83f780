"""configs/ and recipes/ live at the repository root and ship inside the package as
rlpost/_configs and rlpost/_recipes, so `pip install .` works from any directory
(rlpost.config.load looks there first, then at the repository root)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["rlpost", "rlpost.*"]) + ["rlpost._configs", "rlpost._recipes"],
    package_dir={"rlpost._configs": "configs", "rlpost._recipes": "recipes"},
    package_data={"rlpost._configs": ["*.yaml", "*/*.yaml"], "rlpost._recipes": ["*.yaml"]},
)
