"""`vlmkit demo`: a VLM that learns to read and to answer shape questions on a CPU, and its report folder.

Importing the package registers the demo's image scheme (demo/scheme.py) and its saved model type
(demo/saved.py); vlmkit finds them through the `vlmkit.plugins` entry point (pyproject.toml), so the
library never imports the demo.
"""

from vlmkit.demo import saved, scheme  # noqa: F401  (they register the demo's scheme and model type)
