"""The model: the text decoder and the Pixtral vision tower (`model.vision`, `model.vision_config`).

Bridge for branch i12-vision only (replaced by i12-params' `model/__init__.py` at the merge): main's text
decoder is still the module file `mistral4_jax/model.py`, which this package shadows; it is loaded here and
takes this package's place in `sys.modules`, keeping this package's `__path__` for its submodules.
"""

import importlib.util
import os
import sys

_spec = importlib.util.spec_from_file_location(__name__, os.path.join(os.path.dirname(__path__[0]), "model.py"))
_module = importlib.util.module_from_spec(_spec)
_module.__path__ = __path__
sys.modules[__name__] = _module
_spec.loader.exec_module(_module)
