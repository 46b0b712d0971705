"""`python -m m2megatron.encode` and the import/export tools, end to end on a tiny random reference checkpoint."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2megatron.checkpoint.reference_format import reference_shapes
from m2megatron.cli import UserError
from m2megatron.config import preset
from tests.harness import run_module
from tests.reference_model import tiny_reference, torchscale_available

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
DEMO_TEXTS = ["杰尼龟", "妙蛙种子", "小火龙", "皮卡丘"]


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args[0] == "-m":
        return run_module(args[1], *args[2:], cwd=REPO, env=env)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _reference_state():
    if torchscale_available():
        return tiny_reference(seed=4).state_dict()
    gen = torch.Generator().manual_seed(4)
    return {k: 0.1 * torch.randn(s, generator=gen) for k, s in reference_shapes(preset("tiny")).items()}


def test_encode_command_on_reference_ckpt_with_demo_image(tmp_path, reference_dir):
    state = _reference_state()
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "tiny.ckpt")
    (tmp_path / "texts.txt").write_text("\n".join(DEMO_TEXTS) + "\n", encoding="utf-8")
    image = reference_dir / "pokemon.jpeg"
    proc = _run("-m", "m2megatron.encode", "--checkpoint", str(tmp_path / "tiny.ckpt"), "--preset", "tiny",
                "--images", str(image), str(image), "--texts-file", str(tmp_path / "texts.txt"),
                "--sp-model", str(reference_dir / "sp.model"), "--out", str(tmp_path / "out.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert set(result) == {"image_embeddings", "text_embeddings", "text_ids", "logit_scale"}
    img, txt = torch.tensor(result["image_embeddings"]), torch.tensor(result["text_embeddings"])
    assert img.shape == (2, 64) and txt.shape == (4, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    assert result["text_ids"][3][:5] == [50002, 13687, 43861, 45415, 50000]  # '皮卡丘' (SPEC.md §3)
    assert result["logit_scale"] == pytest.approx(state["logit_scale"].item())
    rows = [line for line in proc.stdout.splitlines() if line.startswith(str(image))]
    assert len(rows) == 2 and sum(float(p) for p in rows[0].split(": ")[1].split()) == pytest.approx(1.0)
    if torchscale_available():  # the same numbers as the reference architecture on the same pixels
        from m2megatron.encode import load_images

        reference = tiny_reference(seed=4)
        pixels = load_images([str(image)], 32)
        assert (reference.encode_image(pixels)[0] - img[0]).abs().max() <= 1e-5
        from m2megatron.data.tokenizer import Tokenizer

        ids, mask = Tokenizer(reference_dir / "sp.model").encode(DEMO_TEXTS)
        assert ids.tolist() == result["text_ids"]
        assert (reference.encode_text(ids, mask) - txt).abs().max() <= 1e-5


def _tool(name, *argv, monkeypatch):
    """Run tools/<name>.py in this process (its run_main exits); return the exit status."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "tools" / f"{name}.py"), run_name="__main__")
    return done.value.code


def test_import_then_export_tools_round_trip(tmp_path, monkeypatch, capsys):
    state = _reference_state()
    torch.save({"module": {"_forward_module." + k: v for k, v in state.items()}}, tmp_path / "ds.ckpt")
    for tool in ("import_reference", "export_reference"):
        help_text = _run(f"tools/{tool}.py", "--help")
        assert help_text.returncode == 0 and "safetensors" in help_text.stdout
    ours, back = tmp_path / "ours.safetensors", tmp_path / "back.ckpt"
    assert _tool("import_reference", str(tmp_path / "ds.ckpt"), str(ours), monkeypatch=monkeypatch) == 0
    assert _tool("export_reference", str(ours), str(back), monkeypatch=monkeypatch) == 0
    exported = torch.load(back, weights_only=True)
    assert list(exported) == list(state)
    used = [k for k in state if not (k.startswith("backbone_vl.") and ".B." in k)]
    assert all(torch.equal(exported[k], state[k]) for k in used)
    capsys.readouterr()
    assert _tool("export_reference", str(tmp_path / "ds.ckpt"), "x.ckpt", monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not an m2megatron consolidated" in err


def test_encode_needs_an_sp_model_for_texts(tmp_path):
    from m2megatron.encode import main

    (tmp_path / "t.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(UserError, match="--sp-model"):
        main(["--checkpoint", "x.ckpt", "--texts-file", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o")])
