"""m2megatron: M2-Encoder bilingual image–text encoders on Megatron-Core."""

from m2megatron import benign_warnings as _benign_warnings
from m2megatron import compat as _compat

__version__ = "0.1.0"
_benign_warnings.install()
_compat.install_import_hooks()
