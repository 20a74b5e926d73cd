"""Samples on disk (stepdrop.image_files, ``--save-images``) and torch-fidelity's own command on them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from stepdrop.cli import main
from stepdrop.image_files import check_output, save_samples


def _images(n=5, seed=0):
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_png_folder_and_npz_hold_the_images_and_their_records(tmp_path):
    x = _images()
    records = [dict(index=i, seed=3) for i in range(5)]
    folder = save_samples(x, tmp_path / "png", records=records, meta={"label": "ddim-5"})
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{i:06d}.png" for i in range(5)] + ["samples.json"]
    assert np.array_equal(np.array(Image.open(folder / "000003.png")), x[3, 0].numpy())
    side = json.loads((folder / "samples.json").read_text())
    assert side["samples"] == records and side["meta"] == {"label": "ddim-5"} and side["shape_nhwc"] == [5, 8, 8, 1]
    npz = save_samples(x.float() / 127.5 - 1, tmp_path / "x.npz")  # floats in [-1, 1] are quantised as to_uint8 does
    arr = np.load(npz)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 1) and np.array_equal(arr[..., 0], x[:, 0].numpy())
    assert json.loads((tmp_path / "x.json").read_text())["num_images"] == 5


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    save_samples(_images(), tmp_path / "a")
    with pytest.raises(ValueError, match=r"exists and is not empty; choose another path or pass --overwrite"):
        save_samples(_images(seed=1), tmp_path / "a")
    save_samples(_images(3, seed=1), tmp_path / "a", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["000000.png", "000001.png", "000002.png",
                                                                 "samples.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old folder left
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", overwrite=False)  # an empty folder is fine
    # a cell's folder name holds dots (mixres_0.5_0.3): still a folder of PNGs
    folder = save_samples(_images(2), tmp_path / "ddim-50+mixres_0.5_0.3")
    assert folder.is_dir() and (folder / "000001.png").is_file()
    with pytest.raises(ValueError, match="records must hold one entry per image"):
        save_samples(_images(), tmp_path / "b", records=[{}])


def test_sample_cli_saves_images_that_torch_fidelity_reads(tmp_path, capsys):
    pytest.importorskip("torch_fidelity")
    from stepdrop import metrics

    out, saved = tmp_path / "out", tmp_path / "saved"
    args = ["sample", "--policies", "ddim-3,ddim-4+cache(2,0)", "--num-samples", "6", "--clip", "0",
            "--out", str(out), "--save-images", str(saved), "--no-progress"]
    assert main(args) == 0
    side = json.loads((saved / "ddim-3" / "samples.json").read_text())
    assert [s["timesteps"] for s in side["samples"]] == [[999, 666, 332]] * 6
    assert side["samples"][2] == dict(index=2, seed=0, noise_row=2, plan_seed=0, nfe=3, timesteps=[999, 666, 332])
    # refused before sampling when the folder holds samples; replaced with --overwrite
    (out / "results.json").unlink()
    assert main(args) == 2 and "exists and is not empty" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    assert main(args + ["--overwrite"]) == 0
    # torch-fidelity's own command on the saved folders equals stepdrop's FID on the same images
    run = subprocess.run([sys.executable, "-m", "stepdrop.fidelity", "--fid", "--json", "--silent", "--input1",
                          str(saved / "ddim-3"), "--input2", str(saved / "ddim-4+cache_2_0")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    theirs = json.loads(run.stdout[run.stdout.index("{"):])["frechet_inception_distance"]
    load = lambda d: torch.from_numpy(np.stack([np.array(Image.open(p)) for p in sorted(d.glob("*.png"))]))[:, None]
    ours = metrics.fid(metrics.extract_features(load(saved / "ddim-3")),
                       metrics.extract_features(load(saved / "ddim-4+cache_2_0")))
    assert theirs == pytest.approx(ours, rel=1e-4)
