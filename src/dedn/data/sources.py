"""Feature sources: the one interface through which training, evaluation and the data checks read feature maps.

Every kind of feature source is a :class:`FeatureSource`: the feature store (:mod:`dedn.data.store`), an HDF5
file used in place (:mod:`dedn.data.hdf5`), the generated benchmark's lazy maps (:mod:`dedn.data.synthetic`),
an in-memory array or h5py dataset (wrapped in :class:`ArrayFeatures` where a :class:`~dedn.data.dataset.ZSLData`
is made) and a copy of all maps kept on a device (:class:`DeviceFeatures`). Code that reads maps asks the
source, never what kind of source it holds.

torch is imported where a tensor is made, so that reading the data layer does not load it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

from dedn.errors import DataError

if TYPE_CHECKING:
    import torch


class FeatureSource(ABC):
    """N feature maps (N, C, h, w) and everything training and inference ask of them.

    Attributes:
        shape: (N, C, h, w).
        dtype: the dtype the maps are kept in (a float16 store's is float16).
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    @abstractmethod
    def __getitem__(self, index: Any) -> np.ndarray:
        """The maps at an int, a slice or an index array, as a numpy array (numpy indexing rules)."""

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def identity(self) -> str | None:
        """A text that changes when the maps change, recorded in the data fingerprint; None when the
        source has none (its maps are then described by the dataset's provenance)."""
        return None

    def read(self, index: np.ndarray, stored_dtype: bool = False) -> torch.Tensor:
        """The maps of the integer array ``index`` in that order, as a tensor on the source's own device.

        float32; with ``stored_dtype``, the maps as kept where the source hands them out without converting
        (a feature store, a resident copy), float32 from the others. Each row is read once, in ascending index
        order (fast on stores and HDF5 files; an h5py dataset takes nothing else), and put back in the asked
        order.
        """
        import torch

        rows, inverse = np.unique(np.asarray(index), return_inverse=True)
        return torch.from_numpy(np.asarray(self[rows], dtype=np.float32)[inverse.reshape(-1)])

    def resident_copy(self, device: Any) -> FeatureSource | None:
        """All maps kept on ``device`` (gathered there batch by batch), or None where the source cannot
        or should not be copied there (the default)."""
        return None


class ArrayFeatures(FeatureSource):
    """An in-memory array or an h5py dataset as a feature source (reads index it as it is).

    Indexing, ``len``, ``shape``, ``dtype`` and ``np.asarray`` behave as on the wrapped array, so code that
    treats ``ZSLData.features`` as an array keeps working.
    """

    def __init__(self, array: Any, where: str = "<memory>") -> None:
        try:
            self.shape = tuple(int(s) for s in array.shape)
            self.dtype = np.dtype(array.dtype)
        except (AttributeError, TypeError) as exc:
            raise DataError(f"{where}: feature maps must be an (N, C, h, w) array with a dtype (a numpy array, "
                            f"an h5py dataset or a FeatureSource), got {type(array).__name__}") from exc
        self.array = array

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.array[index]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self.array, dtype=dtype)

    def __repr__(self) -> str:
        return f"ArrayFeatures(shape={self.shape}, dtype={self.dtype})"


class DeviceFeatures(FeatureSource):
    """All N maps in one tensor on a device, e.g. a feature store kept resident on the GPU.

    Batches are gathered on the tensor's device. ``identity`` is that of the source the copy was made from.
    """

    def __init__(self, tensor: torch.Tensor, identity: str | None = None) -> None:
        self.tensor = tensor
        self.shape = tuple(int(s) for s in tensor.shape)
        self.dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))  # float16, float32 or float64
        self._identity = identity

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def identity(self) -> str | None:
        return self._identity

    def __getitem__(self, index: Any) -> np.ndarray:
        """float32 numpy copy of the maps at an int, a slice or an index array."""
        import torch

        if not isinstance(index, (int, np.integer, slice)):
            index = torch.as_tensor(np.asarray(index), device=self.tensor.device)
        return self.tensor[index].float().cpu().numpy()

    def read(self, index: np.ndarray, stored_dtype: bool = False) -> torch.Tensor:
        import torch

        batch = self.tensor[torch.as_tensor(index, device=self.tensor.device)]
        return batch if stored_dtype else batch.float()

    def resident_copy(self, device: Any) -> FeatureSource | None:
        """Itself when it already lives on ``device`` (``cuda`` without an index: any CUDA device), else None."""
        import torch

        want, have = torch.device(device), self.tensor.device
        same = want.type == have.type and (want.index is None or want.index == have.index)
        return self if same else None

    def __repr__(self) -> str:
        return f"DeviceFeatures(shape={self.shape}, dtype={self.dtype}, device={self.tensor.device})"
