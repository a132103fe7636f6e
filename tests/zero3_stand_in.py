"""A stand-in for DeepSpeed ZeRO-3 on CPU (no deepspeed, no GPU), shared by the bbox-head and edit-part tests."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class ZeroStage3:
    """Each parameter of ``module`` keeps an empty placeholder (``ds_id`` set, as deepspeed marks them) and its full
    value aside; ``gathered_parameters`` brings the full values back inside its ``with`` block, as
    ``deepspeed.zero.GatheredParameters`` does (installed in place of ``llamafactory_vision.zero3``'s call to it).
    ``gathered`` records the parameters of each gather."""

    def __init__(self, module: torch.nn.Module):
        self.params = list(module.parameters())
        self.full = [p.data.clone() for p in self.params]
        self.gathered: list[list[torch.nn.Parameter]] = []
        for i, param in enumerate(self.params):
            param.ds_id = i
            param.data = torch.empty(0, dtype=param.dtype)

    def gathered_parameters(self, params, modifier_rank=None):
        stage = self

        @contextmanager
        def gathered():
            assert modifier_rank is None  # read only
            stage.gathered.append(list(params))
            for param in params:
                param.data = stage.full[param.ds_id]
            try:
                yield
            finally:
                for param in params:
                    param.data = torch.empty(0, dtype=param.dtype)

        return gathered()

    def restore(self) -> None:
        for param, full in zip(self.params, self.full):
            param.data = full
            del param.ds_id

    def install(self, monkeypatch) -> None:
        from llamafactory_vision import zero3

        monkeypatch.setattr(zero3, "gathered_parameters", lambda params: self.gathered_parameters(params, None))
