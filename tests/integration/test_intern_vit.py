"""InternViT (VILA1.5-40b's tower) against the reference's rules written out plainly.

`reference_hidden_states` below is §3.3 of the reference doc as a loop over the checkpoint's own
tensors (InternViT names, §3.2), in float64: patch conv, row-major flatten, CLS, positions; per
layer RMSNorm in float32-or-wider then weight, fused qkv split by rows, one RMSNorm over the full
q (and k) width before the head split, softmax(q k^T / sqrt(head_dim)) v, proj, ls1, residual,
RMSNorm, fc1 -> exact GELU -> fc2, ls2, residual. The tower under test is transformers' InternVL
modules fed by our streaming loader, so a wrong rename, split, norm or scale shows up here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from vilaserve.adapters.offline.checkpoints.tiny_intern_vit import write_tiny_intern_vit
from vilaserve.adapters.worker.torch_vila import intern_vit
from vilaserve.adapters.worker.torch_vila.image_processing import ImagePreprocessor
from vilaserve.adapters.worker.torch_vila.intern_vit import (
    InternVitConfig,
    InternVitTower,
    intern_vit_preprocessor_config,
    is_intern_vit,
)

IMAGE_SIZE = 32
PATCH_SIZE = 8
LAYERS = 3


@pytest.fixture(scope="module", params=[False, True], ids=["no_qkv_bias", "qkv_bias"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("intern_vit")
    write_tiny_intern_vit(directory, seed=3, num_layers=LAYERS, qkv_bias=request.param)
    return directory


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_hidden_states(
    directory: Path, pixels: torch.Tensor, *, qk_norm_per_head: bool = False
) -> list[torch.Tensor]:
    """§3.3 in float64 from the checkpoint's tensors; `qk_norm_per_head` is a deliberately
    wrong variant (norm after the head split), to show the comparison can tell them apart."""
    cfg: dict[str, Any] = json.loads((directory / "config.json").read_text())
    w = {k: v.to(torch.float64) for k, v in load_file(str(directory / "model.safetensors")).items()}
    width, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    head_dim = width // heads
    batch = pixels.shape[0]

    patches = F.conv2d(
        pixels.to(torch.float64),
        w["embeddings.patch_embedding.weight"],
        w["embeddings.patch_embedding.bias"],
        stride=cfg["patch_size"],
    )
    tokens = patches.flatten(2).transpose(1, 2)  # row-major over the patch grid
    cls = w["embeddings.class_embedding"].expand(batch, 1, width)
    x = torch.cat([cls, tokens], dim=1) + w["embeddings.position_embedding"]
    states = [x]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        h = _rms_norm(x, w[p + "norm1.weight"], eps)
        qkv = h @ w[p + "attn.qkv.weight"].T
        if cfg["qkv_bias"]:
            qkv = qkv + w[p + "attn.qkv.bias"]
        q, k, v = qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]
        if cfg["qk_normalization"] and not qk_norm_per_head:
            q = _rms_norm(q, w[p + "attn.q_norm.weight"], eps)
            k = _rms_norm(k, w[p + "attn.k_norm.weight"], eps)
        q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if qk_norm_per_head:
            q_weight = w[p + "attn.q_norm.weight"].reshape(heads, 1, head_dim)
            k_weight = w[p + "attn.k_norm.weight"].reshape(heads, 1, head_dim)
            q, k = _rms_norm(q, q_weight, eps), _rms_norm(k, k_weight, eps)
        scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, -1, width)
        out = attended @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        x = x + w[p + "ls1"] * out
        h = _rms_norm(x, w[p + "norm2.weight"], eps)
        hidden = F.gelu(h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])  # exact erf
        x = x + w[p + "ls2"] * (hidden @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"])
        states.append(x)
    return states


def _selected(states: list[torch.Tensor], select_layer: int, feature: str) -> torch.Tensor:
    chosen = states[select_layer]
    return chosen[:, 1:] if feature == "patch" else chosen


@pytest.mark.parametrize("select_layer", [-1, -2])
@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_fp32_tower_equals_the_reference(
    checkpoint: Path, pixels: torch.Tensor, select_layer: int, feature: str
) -> None:
    tower = InternVitTower.from_pretrained(checkpoint, select_layer, feature, torch.float32, "cpu")
    with torch.inference_mode():
        got = tower(pixels)
    want = _selected(reference_hidden_states(checkpoint, pixels), select_layer, feature)

    assert tower.layers_run == LAYERS + 1 + select_layer
    tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2 + (feature == "cls_patch")
    assert got.shape == (2, tokens, 32) and tower.output_tokens() == tokens
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # The comparison is sharp enough to see where qk-norm is applied.
    wrong = reference_hidden_states(checkpoint, pixels, qk_norm_per_head=True)
    assert (_selected(wrong, select_layer, feature) - want).abs().max() > 1e-3


def test_bf16_tower_is_within_bf16_rounding_of_the_reference(
    checkpoint: Path, pixels: torch.Tensor
) -> None:
    tower = InternVitTower.from_pretrained(checkpoint, -1, "patch", torch.bfloat16, "cpu")
    with torch.inference_mode():
        got = tower(pixels)
    want = reference_hidden_states(checkpoint, pixels)[-1][:, 1:]
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits, so rounding the exact output once already costs an RMS
    # error of about 2^-9.3 of its RMS (0.0019 here). The tower rounds at ~10 points per layer
    # (input, matmuls, norms, residual adds), which measures ~3x that (0.0058). We allow
    # 2^-7 RMS (~4.5 roundings' worth) and 2^-6 of the largest value (4 bf16 ulps at it; 0.034
    # measured). This pins the bf16 path (weights cast, norms in float32, no overflow); the
    # finer math is pinned by the fp32 test, whose 1e-5 is far below a wrong variant's 3e-2.
    diff = got.double() - want
    error = diff.abs().max().item()
    assert error <= 2**-6 * want.abs().max().item(), error
    assert diff.pow(2).mean().sqrt() <= 2**-7 * want.pow(2).mean().sqrt()
    assert error > 0  # really ran in bf16


def test_layer_norm_eps_reaches_every_norm(pixels: torch.Tensor, tmp_path: Path) -> None:
    # transformers builds the qk norms with a fixed eps; InternViT gives them layer_norm_eps.
    # A large eps makes any norm that ignores it visible.
    write_tiny_intern_vit(tmp_path, seed=4)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 0.5}))
    tower = InternVitTower.from_pretrained(tmp_path, -1, "cls_patch", torch.float32, "cpu")
    with torch.inference_mode():
        got = tower(pixels)
    want = reference_hidden_states(tmp_path, pixels)[-1]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


class _RecordingReader:
    """Wraps `safe_open`: checks at every tensor read that all earlier reads are already
    assigned into the tower (so nothing accumulates beside it), and records what was read."""

    def __init__(self, real: Any, tower: InternVitTower, log: list[tuple[str, str]]) -> None:
        self._real, self._tower, self._log = real, tower, log

    def __enter__(self) -> _RecordingReader:
        self._real.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.__exit__(*exc)

    def keys(self) -> Iterator[str]:
        return iter(self._real.keys())

    def _before_read(self, name: str, how: str) -> None:
        materialised = sum(not p.is_meta for p in self._tower.parameters())
        assert materialised == len(self._log), (name, materialised, len(self._log))
        self._log.append((name, how))

    def get_tensor(self, name: str) -> torch.Tensor:
        self._before_read(name, "whole")
        return self._real.get_tensor(name)

    def get_slice(self, name: str) -> Any:
        reader = self
        real_slice = self._real.get_slice(name)

        class _Slice:
            def get_shape(self) -> list[int]:
                return real_slice.get_shape()

            def __getitem__(self, index: Any) -> torch.Tensor:
                reader._before_read(name, "rows")
                return real_slice[index]

        return _Slice()


def test_loading_streams_tensor_by_tensor(
    checkpoint: Path, pixels: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loader must not read a whole state dict")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    log: list[tuple[str, str]] = []
    config = InternVitConfig.from_dict(json.loads((checkpoint / "config.json").read_text()))
    with torch.device("meta"):
        tower = InternVitTower(config, -2, "patch")
    real_open = intern_vit.safe_open
    monkeypatch.setattr(
        intern_vit, "safe_open", lambda *a, **k: _RecordingReader(real_open(*a, **k), tower, log)
    )
    tower.load_streaming(checkpoint, torch.float32, "cpu")

    params = list(tower.parameters())
    assert all(not p.is_meta for p in params) and len(log) == len(params)
    names = [name for name, _ in log]
    assert not any(".layers.2." in n for n in names), "a layer after the selected one was read"
    # The fused qkv (and its bias) is read as three row blocks, never whole.
    assert all(how == "rows" for name, how in log if ".attn.qkv." in name)
    assert sum(".attn.qkv.weight" in n for n in names) == 3 * 2
    monkeypatch.undo()
    with torch.inference_mode():
        got = tower(pixels)
    torch.testing.assert_close(
        got.double(), reference_hidden_states(checkpoint, pixels)[-2][:, 1:], atol=1e-5, rtol=0
    )


def _rewrite(source: Path, target: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    """A copy of the checkpoint with tensors replaced (or removed where None)."""
    target.mkdir()
    tensors = load_file(str(source / "model.safetensors"))
    for name, tensor in edit.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, str(target / "model.safetensors"))
    (target / "config.json").write_text((source / "config.json").read_text())
    return target


def test_refuses_a_missing_layer_scale(checkpoint: Path, tmp_path: Path) -> None:
    broken = _rewrite(checkpoint, tmp_path / "broken", {"encoder.layers.1.ls2": None})
    with pytest.raises(ValueError, match=r"missing \['encoder\.layers\.1\.ls2'\]"):
        InternVitTower.from_pretrained(broken, -1, "patch", torch.float32, "cpu")
    # Layers after the selected one never run, so their weights may be absent:
    # hidden_states[-3] of 4 is the output of layer 0, and layer 1 is not even read.
    tower = InternVitTower.from_pretrained(broken, -3, "patch", torch.float32, "cpu")
    assert tower.layers_run == 1


def test_refuses_a_misshaped_qkv(checkpoint: Path, tmp_path: Path) -> None:
    wrong = torch.zeros(2 * 32, 32, dtype=torch.bfloat16)
    broken = _rewrite(checkpoint, tmp_path / "broken", {"encoder.layers.0.attn.qkv.weight": wrong})
    with pytest.raises(
        ValueError, match=r"encoder\.layers\.0\.attn\.qkv\.weight: \[64, 32\], expected \[96, 32\]"
    ):
        InternVitTower.from_pretrained(broken, -1, "patch", torch.float32, "cpu")


def test_tolerates_the_vision_model_prefix(
    checkpoint: Path, pixels: torch.Tensor, tmp_path: Path
) -> None:
    target = tmp_path / "prefixed"
    target.mkdir()
    tensors = load_file(str(checkpoint / "model.safetensors"))
    save_file(
        {f"vision_model.{k}": v for k, v in tensors.items()}, str(target / "model.safetensors")
    )
    (target / "config.json").write_text((checkpoint / "config.json").read_text())
    tower = InternVitTower.from_pretrained(target, -1, "cls_patch", torch.float32, "cpu")
    with torch.inference_mode():
        got = tower(pixels)
    want = reference_hidden_states(checkpoint, pixels)[-1]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_attention_heads", 3),
        ("norm_type", "layer_norm"),
        ("num_channels", 1),
        ("qk_normalization", "yes"),
        ("layer_norm_eps", 0.0),
        ("patch_size", 5),
    ],
)
def test_refuses_configs_it_cannot_honour(field: str, value: object) -> None:
    config = {**_tiny_config(), field: value}
    with pytest.raises(ValueError, match=field):
        InternVitConfig.from_dict(config)


def _tiny_config() -> dict[str, Any]:
    from vilaserve.adapters.offline.checkpoints.tiny_intern_vit import intern_vit_config

    return intern_vit_config(
        hidden_size=32,
        num_heads=2,
        num_layers=3,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        qkv_bias=False,
    )


def test_recognises_intern_vit_configs() -> None:
    assert is_intern_vit(_tiny_config())
    assert is_intern_vit({"architectures": ["InternVisionModel"]})
    assert is_intern_vit({"model_type": "intern_vit_6b"})
    assert not is_intern_vit({"architectures": ["SiglipVisionModel"], "model_type": "siglip"})


@pytest.mark.parametrize("size", [IMAGE_SIZE, 448])
def test_preprocessing_equals_vila_transform(size: int) -> None:
    config = intern_vit_preprocessor_config(size)
    assert config.output_size == (size, size) and not config.do_center_crop
    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 256, (37, 91, 3), dtype=np.uint8), "RGB")

    got = ImagePreprocessor(config, "resize")([picture])

    # §3.4 written out: VILA's "resize" step (PIL resize with its default filter, bicubic),
    # torchvision's Resize to the same size (a no-op), ToTensor (uint8 / 255 in float32),
    # Normalize with the ImageNet statistics.
    squashed = picture.resize((size, size))
    tensor = torch.from_numpy(np.array(squashed)).permute(2, 0, 1).to(torch.float32).div(255)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float32).view(3, 1, 1)
    want = (tensor - mean) / std
    assert got.shape == (1, 3, size, size)
    assert torch.equal(got[0], want)
