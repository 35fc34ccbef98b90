"""DEDN as a registered method (:mod:`dedn.models.registry`): built from a run's settings, trained with its
loss, loaded from the authors' released code.

The run's settings are read by attribute (:class:`~dedn.models.registry.RunSettings`): ``mode``, the
``model`` section (clusters, l_rc, l_e, low_rank, channel_attention, experts) and the ``loss`` section.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dedn.checks import check, choice
from dedn.data.clusters import resolve_clusters
from dedn.data.dataset import ZSLData
from dedn.models.dedn import DEDN, EXPERT_CHOICES, DEDNConfig, DEDNOutput
from dedn.models.dedn_compat import from_reference_state_dict, reference_loss, reference_scores
from dedn.models.losses import LossTerms, dedn_loss
from dedn.models.registry import ModelEntry, RunSettings, register_model
from dedn.models.settings import LossSettings, MethodSettings, resolve_method


def method_settings(run: RunSettings, dataset: str | None) -> MethodSettings:
    """The run's mode, loss and ``model.low_rank`` for ``dataset``, as DEDN's explicit settings."""
    return resolve_method(run.mode, dataset, run.loss, run.model.low_rank)


def model_clusters(run: RunSettings, data: ZSLData, dataset: str | None,
                   method: MethodSettings) -> dict[str, np.ndarray]:
    """fExp's attribute clusters that the run's ``model.clusters`` asks for, checked against ``data``."""
    return resolve_clusters(run.model.clusters, dataset, method.cluster_variant, data.w2v, data.attribute_names,
                            n_clusters=run.model.n_clusters, own=data.clusters)


def build(run: RunSettings, data: ZSLData, dataset: str | None, seed: int) -> DEDN:
    """A freshly initialised DEDN for ``data``; its method settings are resolved once, here.

    The reference-only options, ``model.low_rank`` among them, take effect only in reference mode.

    Raises:
        ConfigError: ``model.experts`` is not one of :data:`~dedn.models.dedn.EXPERT_CHOICES`, or the clusters
            asked for do not fit the data.
    """
    options = run.model
    check("model.experts", options.experts, choice(*EXPERT_CHOICES))
    method = method_settings(run, dataset)
    clusters = model_clusters(run, data, dataset, method)
    c, h, w = data.feature_shape
    d, g = np.shape(data.w2v)
    config = DEDNConfig(n_attributes=d, semantic_dim=g, n_channels=c, n_regions=h * w,
                        clusters=tuple(clusters.values()), experts=options.experts,
                        channel_attention=options.channel_attention, l_rc=options.l_rc, l_e=options.l_e,
                        method=method)
    torch.manual_seed(seed)
    return DEDN.from_config(config, data.w2v, data.att, data.seen_mask)


def training_loss(model: DEDN, out: DEDNOutput, labels: Tensor, seen_mask: Tensor,
                  loss: LossSettings) -> LossTerms:
    """DEDN's loss of a batch (:func:`~dedn.models.losses.dedn_loss`) with the model's method settings."""
    return dedn_loss(out, labels, seen_mask, loss, model.config.method, model.calibration_bias())


register_model(ModelEntry(
    name="dedn",
    label="DEDN",
    expert_labels={"cexp": "cExp", "fexp": "fExp"},
    model_type=DEDN,
    config_type=DEDNConfig,
    build=build,
    from_config=DEDN.architecture_only,
    loss=training_loss,
    from_reference=from_reference_state_dict,
    reference_scores=reference_scores,
    reference_loss=reference_loss,
    default_gamma=lambda run, dataset: method_settings(run, dataset).default_gamma,
    replays_released=True,
))
