"""The GZSL methods (today DEDN: its model, naive reference form, losses and released-code compatibility),
and the registry through which the layers above build, train and load them.

Importing the package registers the built-in methods (as timm's ``models`` package does): every
``dedn.models`` module is imported through here first, so the registry is full whenever it is asked.
"""

from dedn.models import (
    dedn_method,  # noqa: F401  (registers DEDN)
    transzero_method,  # noqa: F401  (registers TransZero)
)
