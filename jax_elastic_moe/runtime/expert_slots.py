"""A worker's expert slots: the weights of its `slots_per_rank` experts of every MoE layer, held in
the Mooncake-registered weights region of its transport (so peers can read a slot directly), and the
two-phase move of an epoch: `load` fetches every slot to change into a registered staging region
(peer slots by Mooncake read, local ones by copy, lost ones from the controller's host backup), and
`commit`, once every rank has loaded, copies staging into the weights region. Nothing a peer may be
reading changes before the commit."""
from __future__ import annotations

import numpy as np

from ..model.loader import EXPERT_PARAMS


def region_bytes(cfg, slots_per_rank: int, itemsize: int) -> int:
    """Bytes of the weights region of `slots_per_rank` slots of every MoE layer (at least 1)."""
    moe_layers = sum(1 for m in cfg.moe_layers if m)
    return max(1, moe_layers * len(EXPERT_PARAMS) * slots_per_rank
               * cfg.hidden_size * cfg.moe_intermediate_size * itemsize)


class ExpertSlots:
    """The slots of `rank` in `transport`'s weights region, filled from `params` (logical experts)
    by the placement `phy2log` [moe layers, physical slots]; a slot of expert -1 is zeros."""

    def __init__(self, transport, params: dict, moe_layer_ids: list[int], slots_per_rank: int, rank: int,
                 phy2log: np.ndarray):
        self.transport, self.moe_layer_ids, self.spr = transport, moe_layer_ids, slots_per_rank
        dtype = params[("embed",)].dtype
        nbytes = len(moe_layer_ids) * len(EXPERT_PARAMS) * slots_per_rank
        self.shapes = {name: tuple(params[("layers", moe_layer_ids[0], "mlp", name)].shape[1:])
                       for name in EXPERT_PARAMS} if moe_layer_ids else {}
        self.slot_bytes = int(np.prod(self.shapes.get("w_gate", (0,)))) * np.dtype(dtype).itemsize
        size = max(1, nbytes * self.slot_bytes)
        self.slots = transport.weights[:size].view(dtype).reshape(len(moe_layer_ids), len(EXPERT_PARAMS),
                                                                    slots_per_rank, -1)
        self.staging = transport.register_array(np.zeros(size, np.uint8))
        mine = np.asarray(phy2log)[:, rank * slots_per_rank:(rank + 1) * slots_per_rank]
        for m, layer in enumerate(moe_layer_ids):
            for p, name in enumerate(EXPERT_PARAMS):
                logical = params[("layers", layer, "mlp", name)]
                for j, e in enumerate(mine[m]):
                    self.slots[m, p, j] = logical[e].reshape(-1) if e >= 0 else 0
        self._plan: list[tuple[int, int, int]] = []

    def arrays(self, key_of, put) -> dict:
        """{param key: put(array [slots_per_rank, *expert shape])} of every MoE layer's experts."""
        return {key_of(("layers", layer, "mlp", name)): put(self.slots[m, p].reshape((self.spr,) + self.shapes[name]))
                for m, layer in enumerate(self.moe_layer_ids) for p, name in enumerate(EXPERT_PARAMS)}

    def load(self, loads: list) -> int:
        """Phase 1: each [moe layer, local slot, source] into staging; returns how many."""
        n = len(EXPERT_PARAMS)
        per, sb = n * self.slot_bytes, self.slot_bytes
        self._plan = []
        for i, (m, j, src) in enumerate(loads):
            dst = self.staging[i * per:(i + 1) * per]
            if src["kind"] == "peer":
                off = (int(m) * n * self.spr + int(src["slot"])) * sb
                for p in range(n):
                    self.transport.read(int(src["rank"]), off + p * self.spr * sb, sb, dst[p * sb:(p + 1) * sb],
                                        timeout=5.0)
            elif src["kind"] == "local":
                for p in range(n):
                    dst[p * sb:(p + 1) * sb] = self.slots[int(m), p, int(src["slot"])].view(np.uint8)
            else:   # host backup, sent by the controller
                dst[:] = np.frombuffer(src["data"], np.uint8)
            self._plan.append((int(m), int(j), i))
        return len(self._plan)

    def commit(self):
        """Phase 2: staging -> the weights region (after every rank finished its reads)."""
        n = len(EXPERT_PARAMS)
        per, sb = n * self.slot_bytes, self.slot_bytes
        for m, j, i in self._plan:
            block = self.staging[i * per:(i + 1) * per]
            for p in range(n):
                self.slots[m, p, j] = block[p * sb:(p + 1) * sb].view(self.slots.dtype)
        self._plan = []
