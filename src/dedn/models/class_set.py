"""The class set every method scores against, replaceable at prediction time without touching the weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


class ClassSet(nn.Module):
    """Base of every method's model: holds ``class_att`` (K, D), the class attributes as the model scores against
    them, and ``seen_mask`` (K,), and replaces them with :meth:`set_classes` (classes given only at prediction
    time). A method says how it prepares class attributes in :meth:`scored_class_att`; its ``config`` has
    ``n_attributes``."""

    class_att: Tensor
    seen_mask: Tensor
    config: object

    @classmethod
    def architecture_only(cls, config: Any) -> ClassSet:
        """A model of ``config`` with placeholder semantic vectors and one placeholder class: the architecture a
        model file's weights are loaded into (``load_state_dict`` replaces every parameter and buffer)."""
        d = config.n_attributes
        return cls(config, np.ones((d, config.semantic_dim), dtype=np.float32), np.ones((1, d), dtype=np.float32),
                   np.zeros(1, dtype=bool))

    def set_classes(self, class_att: np.ndarray | Tensor, seen_mask: np.ndarray | Tensor) -> None:
        """Replace the class set: (K', D) attributes in dataset attribute order and a (K',) seen mask.

        Raises:
            ValueError: the shapes do not fit the model's attributes or each other.
        """
        att = torch.as_tensor(np.asarray(class_att, dtype=np.float32))
        seen = torch.as_tensor(np.asarray(seen_mask, dtype=bool))
        d = self.config.n_attributes  # type: ignore[attr-defined]
        if att.ndim != 2 or att.shape[1] != d:
            raise ValueError(f"class attributes must be (K, {d}), got {tuple(att.shape)}")
        if seen.shape != (att.shape[0],):
            raise ValueError(f"seen mask must have shape ({att.shape[0]},), got {tuple(seen.shape)}")
        self.class_att = self.scored_class_att(att)
        self.seen_mask = seen.to(self.class_att.device)

    def scored_class_att(self, class_att: Tensor) -> Tensor:
        """(K, D) class attributes in dataset order as the model scores against them (the method's own)."""
        raise NotImplementedError

    def margin_bias(self, margin: float) -> Tensor:
        """(K,) fixed shift of the class scores by a calibration ``margin``: +margin on unseen, -margin on seen
        classes (each method's ``calibration_bias`` with its own margin)."""
        sign = 1.0 - 2.0 * self.seen_mask.to(self.class_att.dtype)
        return margin * sign

    def region_maps(self, features: Tensor) -> Tensor:
        """(B, C, h, w) or (B, C, R) feature maps as (B, C, R), checked against the config's ``n_channels`` and
        ``n_regions`` (each method's ``prepare_features`` normalises them its own way).

        Raises:
            ValueError: the maps do not have the model's channels and regions.
        """
        if features.ndim == 4:
            features = features.flatten(2)
        c, r = self.config.n_channels, self.config.n_regions  # type: ignore[attr-defined]
        if features.ndim != 3 or features.shape[1] != c or features.shape[2] != r:
            raise ValueError(f"features must be (B, {c}, h, w) with h*w = {r}, got {tuple(features.shape)}")
        return features
