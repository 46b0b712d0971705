"""The reference M2-Encoder architecture, built from PyPI torchscale==0.3.0 (SPEC.md §7): the peer that the
model benchmark (tools/bench_model.py) times ours against and the parity tests compare ours with (through
tests/reference_model.py). Not part of the library.

torchscale 0.3.0 pins fairscale==0.4.0 and timm==0.6.13, which would replace the CPU torch build, so it
is installed with --no-deps (requirements-test.txt / Makefile). At import it needs only
`fairscale.nn.checkpoint_wrapper`, `fairscale.nn.wrap` and `timm.models.layers.drop_path`; inference
never calls them, so tiny stand-ins are registered for exactly those names when the real packages are
absent.
"""

from __future__ import annotations

import math
import sys
import types

import torch


def _stub_torchscale_imports() -> None:
    def identity(module, *args, **kwargs):
        return module

    def drop_path(x, drop_prob=0.0, training=False):
        if drop_prob == 0.0 or not training:
            return x
        raise NotImplementedError("stub drop_path is inference-only")

    stubs = {
        "fairscale": {}, "fairscale.nn": {},
        "fairscale.nn.checkpoint_wrapper": {"checkpoint_wrapper": identity},
        "fairscale.nn.wrap": {"wrap": identity, "enable_wrap": identity},
        "timm": {}, "timm.models": {}, "timm.models.layers": {"drop_path": drop_path},
    }
    for name, attrs in stubs.items():
        if name in sys.modules:
            continue
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so submodules resolve
        mod.__dict__.update(attrs)
        sys.modules[name] = mod


def torchscale_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchscale") is not None


class ReferenceM2(torch.nn.Module):
    """The reference VLMo inference graph (SPEC.md §1.2-1.5, §7), parameters registered in released order."""

    def __init__(self, *, dim: int, layers: int, heads: int, out_dim: int, img_size: int = 224,
                 patch_size: int = 16, vocab_size: int = 115244, vl_layers: int = 3):
        super().__init__()
        _stub_torchscale_imports()
        from torchscale.architecture.config import EncoderConfig
        from torchscale.architecture.encoder import Encoder
        from torchscale.model.BEiT3 import BEiT3

        def config(n):
            return EncoderConfig(img_size=img_size, patch_size=patch_size, vocab_size=vocab_size, multiway=True,
                                 layernorm_embedding=False, normalize_output=True, no_output_layer=True,
                                 drop_path_rate=0, encoder_embed_dim=dim, encoder_attention_heads=heads,
                                 encoder_layers=n, encoder_ffn_embed_dim=4 * dim)

        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_vl_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.backbone = BEiT3(config(layers))
        self.backbone_vl = Encoder(config(vl_layers), embed_tokens=None, embed_positions=None,
                                   output_projection=None, is_encoder_decoder=False)
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.pooler = torch.nn.Module()
        self.pooler.dense = torch.nn.Linear(dim, dim)
        for name in ("itc_text_proj", "itc_image_proj", "itc_vl_text_proj", "itc_vl_image_proj"):
            head = torch.nn.Module()
            head.fc = torch.nn.Linear(dim, out_dim, bias=False)
            self.add_module(name, head)

    @staticmethod
    def _normalize(x):
        return x / x.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def encode_image(self, pixels):
        """pixels already normalized as (x − 0.5)/0.5."""
        h = self.backbone(textual_tokens=None, visual_tokens=pixels)["encoder_out"]
        h = self.backbone_vl(src_tokens=None, token_embeddings=h, multiway_split_position=-1)["encoder_out"]
        return self._normalize(self.itc_vl_image_proj.fc(h[:, 0]))

    @torch.no_grad()
    def encode_text(self, ids, mask):
        pad = 1 - mask
        h = self.backbone(textual_tokens=ids, visual_tokens=None, text_padding_position=pad)["encoder_out"]
        h = self.backbone_vl(src_tokens=None, token_embeddings=h, encoder_padding_mask=pad,
                             multiway_split_position=-1)["encoder_out"]
        return self._normalize(self.itc_vl_text_proj.fc(h[:, 0]))


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every tensor random values (LN gains near 1) so that every weight matters in parity tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            if p.dim() == 0:
                p.fill_(2.0 + 0.5 * torch.rand((), generator=gen).item())
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                scale = 1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def tiny_reference(seed: int = 0, **sizes) -> ReferenceM2:
    """A random ReferenceM2 shaped like our `tiny` preset unless `sizes` say otherwise."""
    args = dict(dim=64, layers=2, heads=4, out_dim=64, img_size=32, patch_size=8, vl_layers=1)
    args.update(sizes)
    model = ReferenceM2(**args).eval()
    randomize_(model, seed)
    return model
