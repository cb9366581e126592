"""Package layout that setup.cfg cannot say: the bundled recipes ship as ``mecqtk/recipes``.

Their one home in the repository is the top-level ``recipes/`` folder; ``package_dir`` maps it to
the ``mecqtk.recipes`` data package, so a wheel carries the YAML files inside mecqtk, and the
editable install's finder points ``mecqtk.recipes`` back at ``recipes/``. Everything else about
the package is in setup.cfg.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["mecqtk", "mecqtk.*"]), "mecqtk.recipes"],
    package_dir={"mecqtk.recipes": "recipes"},
    package_data={"mecqtk.recipes": ["*.yaml"]},
)
