"""dedn.models.compat against an independent re-implementation of the released code's forward and loss.

The re-implementation below follows the released ``core/DEDN_{Cub,Sun,Awa2}.py`` and ``Cub_train.py`` formula
by formula (one SubNet at a time, einsum, released parameter names), at the real attribute layouts but with
small G, C, R and K, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dedn.data.clusters import builtin_clusters
from dedn.errors import CheckpointError, ConfigError
from dedn.models.compat import (
    from_reference_state_dict,
    load_reference_checkpoint,
    reference_loss,
    reference_scores,
)
from dedn.models.dedn_compat import ReferenceSettings

G, C, HW, R, RANK, K, B = 8, 16, 2, 4, 3, 20, 5
DT = torch.float64
N_ATT = {"CUB": 312, "SUN": 102, "AWA2": 85}


# ------------------------------------------------------------------------------------------- reference model
def released_indicator(dataset: str) -> torch.Tensor:
    """The released ``indicator`` (attribute -> Snet index), from its assignment statements in order."""
    ind = torch.zeros(N_ATT[dataset], dtype=torch.long)
    if dataset == "CUB":
        for group, ranges in ((1, [(24, 73), (105, 120), (197, 212), (236, 240), (244, 248)]),
                              (2, [(9, 24), (212, 217), (308, 312)]),
                              (3, [(73, 94), (167, 182), (240, 244)]),
                              (4, [(263, 278)]),
                              (5, [(217, 236), (248, 263)])):
            for a, b in ranges:
                ind[a:b] = group
    elif dataset == "SUN":
        ind[38:65] = 1
        ind[65 - 74] = 2  # the released code writes `65-74`: a single index, -9
        ind[77:85] = 2
        ind[74 - 77] = 3  # -3
        ind[85 - 102] = 3  # -17
    else:
        ind[18:33] = 1
        ind[33:64] = 2
        ind[78:85] = 2
        ind[64:78] = 3
    return ind


def reference_state(dataset: str, seen: np.ndarray, bias: float | int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random parameters in the released layout and names (float64; ``bias`` int like ``--bias 1``)."""
    gen = torch.Generator().manual_seed(seed)
    ind = released_indicator(dataset)
    d = N_ATT[dataset]
    q_count = int(ind.max()) + 1

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=DT) * scale

    w2v = F.normalize(rnd(d, G))
    state: dict[str, torch.Tensor] = {}
    for name, v in [("GNet", w2v)] + [(f"Snet{q}", w2v[ind == q]) for q in range(q_count)]:
        state[f"{name}.V"] = v + rnd(*v.shape, scale=0.1)  # trained away from the initial rows
        if dataset == "SUN":
            state[f"{name}.H_1"] = rnd(G, RANK)
            state[f"{name}.H_2"] = rnd(G, C, scale=0.5)
            state[f"{name}.H_3"] = rnd(RANK, C)
            state[f"{name}.H_4"] = rnd(G, R)
            state[f"{name}.H_5"] = rnd(G, R, scale=0.5)
        else:
            state[f"{name}.H_1"] = rnd(G, C)
            state[f"{name}.H_2"] = rnd(G, C, scale=0.5)
            state[f"{name}.H_3"] = rnd(G, R)
            state[f"{name}.H_4"] = rnd(G, R, scale=0.5)
    att = torch.rand(K, d, generator=gen, dtype=DT)
    if dataset == "AWA2":
        att = att - 0.2  # clipped by the loader in the released pipeline; kept to show it is taken as is
    att = torch.cat([att[:, ind == q] for q in range(q_count)], dim=1)
    state["att"] = F.normalize(att)
    state["weight_ce"] = torch.eye(K, dtype=torch.float32)
    state["bias"] = torch.tensor(bias)
    mask_bias = torch.ones(1, K)
    mask_bias[:, torch.as_tensor(np.flatnonzero(seen))] *= -1
    state["mask_bias"] = mask_bias
    return state


class ReleasedDEDN:
    """The released forward and loss, written out per SubNet."""

    def __init__(self, dataset: str, state: dict[str, torch.Tensor], seen: np.ndarray, mixcr: float,
                 lamb: float, p_ce: float = 0.1, p_crc: float = 0.001) -> None:
        self.dataset, self.state, self.mixcr, self.lamb = dataset, state, mixcr, lamb
        self.p_ce, self.p_crc = p_ce, p_crc
        self.ind = released_indicator(dataset)
        self.q_count = int(self.ind.max()) + 1
        self.seen = torch.as_tensor(np.flatnonzero(seen))
        self.unseen = torch.as_tensor(np.flatnonzero(~seen))
        self.bias = state["bias"]
        self.vec_bias = state["mask_bias"].to(DT) * self.bias

    def subnet(self, name: str, fs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = {k.split(".", 1)[1]: v for k, v in self.state.items() if k.startswith(name + ".")}
        if self.dataset == "SUN":
            s = torch.einsum("iv,vf,fc,bcr->bir", p["V"], p["H_1"], p["H_3"], fs)
            w3, w4 = p["H_4"], p["H_5"]
        else:
            s = torch.einsum("iv,vf,bfr->bir", p["V"], p["H_1"], fs)
            w3, w4 = p["H_3"], p["H_4"]
        a = F.softmax(torch.einsum("iv,vf,bfr->bir", p["V"], p["H_2"], fs), dim=-1)
        region = a * s
        ft = fs.transpose(1, 2)
        s = torch.einsum("iv,vf,bfr->bir", p["V"], w3, ft)
        a = F.softmax(torch.einsum("iv,vf,bfr->bir", p["V"], w4, ft), dim=-1)
        return region, a * s

    def discrepancy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        wt = (x - y).pow(2)
        norm = wt.sum(1) if self.dataset == "CUB" else wt.sum(1) + 1e-9  # CUB has no epsilon
        wt = wt / norm.sqrt().unsqueeze(1)
        loss = (wt * (x - y).abs()).sum() / x.shape[0]
        kl = torch.nn.KLDivLoss(reduction="batchmean")
        p, q = F.softmax(x, dim=1), F.softmax(y, dim=1)
        log_m = ((p + q) / 2).log()
        return loss + (kl(log_m, q) + kl(log_m, p)) / 2

    def forward(self, x: torch.Tensor, training: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        fs = F.normalize(x.reshape(x.shape[0], x.shape[1], -1), dim=1)
        parts = [self.subnet(f"Snet{q}", fs) for q in range(self.q_count)]
        s_pa = torch.cat([p[0] for p in parts], dim=1).sum(2)
        s_pg = torch.cat([p[1] for p in parts], dim=1).sum(2)
        g_p, g_pg = self.subnet("GNet", fs)
        g_pa = torch.cat([g_p[:, self.ind == q] for q in range(self.q_count)], dim=1).sum(2)
        g_pag = torch.cat([g_pg[:, self.ind == q] for q in range(self.q_count)], dim=1).sum(2)
        out = {}
        for tag, (reg, ch) in (("c", (g_pa, g_pag)), ("f", (s_pa, s_pg))):
            con = self.discrepancy(reg, ch)
            o = reg + ch if training else self.mixcr * reg + (1 - self.mixcr) * ch
            s_pp = torch.einsum("ki,bi->bik", self.state["att"], o).sum(1) + self.vec_bias
            out[tag] = (s_pp, con)
        return out

    def expert_loss(self, s_pp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = self.state["weight_ce"].to(DT)[labels]
        z = s_pp - self.vec_bias
        if self.dataset == "CUB":
            z[:, self.seen] = z[:, self.seen] + 1
            z = z - onehot * 3
        elif self.dataset == "SUN":
            z[:, self.seen] = z[:, self.seen] + 1
            z = z - onehot * 2
        else:
            z[:, self.seen] = z[:, self.seen] + self.bias
            z = z - onehot * self.bias * 2
        ce = (-(torch.log_softmax(z, dim=1) * onehot).sum(1)).mean()
        cal = -torch.log(F.softmax(s_pp, dim=-1)[:, self.unseen].sum(1).mean())
        return ce + self.lamb * cal

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.forward(x, training=True)
        (sc, conc), (sf, conf) = out["c"], out["f"]
        distill = self.discrepancy(sc, sf)
        return (self.expert_loss(sc, labels) + self.expert_loss(sf, labels) + self.p_ce * distill
                + self.p_crc * (conc + conf))


# ------------------------------------------------------------------------------------------- fixtures
def seen_mask(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(K, dtype=bool)
    mask[rng.permutation(K)[:14]] = True
    return mask


def batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(B, C, HW, HW, generator=gen, dtype=DT)) + 0.01
    labels = torch.as_tensor(np.flatnonzero(seen_mask()))[torch.randint(0, 14, (B,), generator=gen)]
    return x, labels


CASES = [  # dataset, bias, hparams, (mixcr, lamb) of the released run
    ("CUB", 1, {}, (0.8, 0.0)),
    ("CUB", 1, {"lamb": 0.18, "l_rc": 0.6}, (0.6, 0.18)),  # CUB ZSL
    ("SUN", 1, {}, (0.95, 0.0)),
    ("AWA2", 1, {}, (0.8, 0.11)),
    ("AWA2", 2, {}, (0.8, 0.11)),  # Awa2's MAL margin is the bias
]


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dataset", ["CUB", "SUN", "AWA2"])
def test_reference_clusters_follow_released_indicator(dataset: str) -> None:
    ind = released_indicator(dataset).numpy()
    clusters = list(builtin_clusters(dataset, "reference").values())
    assert len(clusters) == ind.max() + 1
    for q, idx in enumerate(clusters):
        np.testing.assert_array_equal(idx, np.flatnonzero(ind == q))  # Snet q's rows, ascending


@pytest.mark.parametrize(("dataset", "bias", "hparams", "released"), CASES)
def test_scores_and_loss_match_released(dataset: str, bias: int, hparams: dict, released: tuple) -> None:
    seen = seen_mask()
    state = reference_state(dataset, seen, bias)
    ref = ReleasedDEDN(dataset, state, seen, *released)
    model = from_reference_state_dict(state, dataset, np.flatnonzero(seen), **hparams)
    assert model.class_att.dtype == DT and model.config.method.mode == "reference"
    assert (model.config.low_rank == RANK) if dataset == "SUN" else model.config.low_rank is None
    x, labels = batch()
    model.eval()
    for training in (True, False):
        want = ref.forward(x, training)
        got_c, got_f = reference_scores(model, x, training)
        assert_close(got_c, want["c"][0])
        assert_close(got_f, want["f"][0])
        assert not model.training  # restored
    assert_close(reference_loss(model, x, labels), ref.loss(x, labels))
    assert not model.training


def test_loss_gradients_reach_every_parameter() -> None:
    seen = seen_mask()
    model = from_reference_state_dict(reference_state("SUN", seen, 1), "sun", np.flatnonzero(seen))
    x, labels = batch()
    reference_loss(model, x, labels).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_seen_mask_forms_and_settings() -> None:
    seen = seen_mask()
    state = reference_state("AWA2", seen, 2)
    a = from_reference_state_dict(state, "AWA2", seen, model="dedn")  # bool mask; the method named
    b = from_reference_state_dict(state, "awa2", torch.as_tensor(np.flatnonzero(seen)), l_e=0.7, beta=0.0)
    assert torch.equal(a.seen_mask, torch.as_tensor(seen)) and torch.equal(b.seen_mask, a.seen_mask)
    assert isinstance(a.reference_settings, ReferenceSettings)
    assert a.reference_settings.loss.margin == 2.0 and a.reference_settings.loss.lamb == pytest.approx(0.11)
    assert a.config.l_e == 0.5 and b.config.l_e == 0.7 and b.reference_settings.loss.beta == 0.0
    assert_close(a.calibration_bias(), state["mask_bias"].reshape(-1).to(DT) * 2)


def _expect(match: str, state: dict, dataset: str = "CUB", **hparams) -> None:
    with pytest.raises(CheckpointError, match=match):
        from_reference_state_dict(state, dataset, np.flatnonzero(seen_mask()), **hparams)


def test_errors_name_key_and_shapes() -> None:
    seen = seen_mask()
    good = reference_state("CUB", seen, 1)
    state = dict(good)
    del state["Snet3.H_4"]
    _expect(r"missing key 'Snet3\.H_4' \(expected shape \(8, 4\)\)", state)
    state = dict(good, **{"Snet2.V": good["Snet2.V"][:-1]})
    _expect(r"'Snet2\.V' has shape \(23, 8\), expected \(24, 8\)", state)
    state = dict(good, **{"GNet.H_3": torch.zeros(G, R + 1, dtype=DT)})
    _expect(r"'GNet\.H_4' has shape \(8, 4\), expected \(8, 5\)", state)  # H_3 sets R; the rest must agree
    _expect(r"'GNet\.V' has shape \(312, 8\), expected \(85, \*\)", good, "AWA2")
    _expect(r"unexpected key 'Snet6\.V'", dict(good, **{"Snet6.V": good["Snet5.V"]}))
    _expect(r"'att' has shape \(20, 311\), expected \(\*, 312\)", dict(good, att=good["att"][:, 1:]))
    flipped = good["mask_bias"].clone()
    flipped[0, 0] *= -1
    _expect("mask_bias", dict(good, mask_bias=flipped))
    _expect("weight_ce", dict(good, weight_ce=torch.ones(K, K)))
    _expect("full-rank", good, low_rank=4)
    _expect(r"'GNet\.H_1' has shape \(8, 3\), expected \(8, 256\)", reference_state("SUN", seen, 1), "SUN",
            low_rank=256)
    sun = reference_state("SUN", seen, 1)
    del sun["Snet1.H_5"]
    _expect(r"missing key 'Snet1\.H_5'", sun, "SUN")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        from_reference_state_dict(good, "CUB", np.flatnonzero(seen), l_rcc=0.5)
    with pytest.raises(ConfigError, match="model must be one of {.*dedn.*}, got 'nosuch'"):
        from_reference_state_dict(good, "CUB", np.flatnonzero(seen), model="nosuch")
    with pytest.raises(TypeError, match="Linear is not a model of a registered method"):
        reference_scores(torch.nn.Linear(2, 2), torch.zeros(1, 2), training=False)


def test_load_reference_checkpoint(tmp_path) -> None:
    seen = seen_mask()
    state = reference_state("CUB", seen, 1)
    path = tmp_path / "dedn_cub.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as saved from DataParallel
    model = load_reference_checkpoint(path, "CUB", np.flatnonzero(seen))
    x, _ = batch()
    want = ReleasedDEDN("CUB", state, seen, 0.8, 0.0).forward(x, training=False)
    assert_close(reference_scores(model, x, training=False)[0], want["c"][0])
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    assert load_reference_checkpoint(tmp_path / "wrapped.pth", "CUB", seen).config.n_attributes == 312
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_reference_checkpoint(tmp_path / "missing.pth", "CUB", seen)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_reference_checkpoint(tmp_path / "junk.pth", "CUB", seen)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_reference_checkpoint(tmp_path / "list.pth", "CUB", seen)
    bad = dict(state)
    del bad["att"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth: .*missing key 'att'"):
        load_reference_checkpoint(tmp_path / "bad.pth", "CUB", seen)
