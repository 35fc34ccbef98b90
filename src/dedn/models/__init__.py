"""The GZSL methods (DEDN, and the region-attribute methods it is compared with: DAZLE, MSDN, TransZero), each
with its model, naive reference form, losses and released-code compatibility, and the registry through which
the layers above build, train and load them.

Importing the package registers the built-in methods (as timm's ``models`` package does): every
``dedn.models`` module is imported through here first, so the registry is full whenever it is asked. DEDN
registers first, so tables list it first.
"""

from dedn.models import dedn_method  # noqa: F401  (registers DEDN)

# isort: split
from dedn.models import (
    dazle_method,  # noqa: F401  (registers DAZLE)
    msdn_method,  # noqa: F401  (registers MSDN)
    transzero_method,  # noqa: F401  (registers TransZero)
)
