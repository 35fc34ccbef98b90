"""The loaded-data memo of one driver or job runner: rows, seeds and a protocol's stages share one loaded dataset.

It is an object with an owner, not module state: the experiment driver creates one for its checks and the
jobs it runs in its own process; a job run elsewhere (a pool worker, a submitit job) creates its own.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict

from dedn.config import RunConfig
from dedn.data.dataset import ZSLData
from dedn.factory import load_data


class DataCache:
    """:func:`dedn.factory.load_data`, memoised by the data settings (and the seed, for a validation task).

    Generated benchmarks keep their generated features; the ``imagebench`` source is built from the whole
    config and is never shared. At most ``size`` datasets are kept, the least recently used dropped first.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._data: OrderedDict[str, ZSLData] = OrderedDict()

    def load(self, cfg: RunConfig) -> ZSLData:
        """The dataset ``cfg`` names, loaded once per cache."""
        if cfg.data.source == "imagebench":  # built from the whole config; not shared
            return load_data(cfg)
        key = json.dumps({"data": asdict(cfg.data), "seed": cfg.seed if cfg.data.split == "validation" else None},
                         sort_keys=True)
        if key not in self._data:
            self._data[key] = load_data(cfg)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        self._data.move_to_end(key)
        return self._data[key]
