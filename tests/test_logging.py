"""metrics.jsonl timestamps and the console lines of a log without a terminal."""
from __future__ import annotations

import json
import time

from mfrecipes.train.log import RunLogger


def test_records_carry_wall_clock_and_console_shows_moving_figures(tmp_path, capsys):
    before = time.time()
    log = RunLogger(str(tmp_path), total_images=1000, start_images=0, progress_bar=True)
    assert log._progress is None          # under pytest stderr is not a terminal: no bar
    log.log({"images": 250, "step": 5, "loss": 0.9995, "obj/v_loss": 1.23, "obj/u_err": 0.456,
             "img_per_s": 100.0})
    log.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert before <= rec["time"] <= time.time()
    err = capsys.readouterr().err
    assert "v_loss=1.23" in err and "u_err=0.456" in err and "img_per_s=100" in err
    assert "elapsed=0:00:0" in err and "eta=" in err and "eta=?" not in err


def test_labelled_grid_places_images_under_title_and_class_headers(tmp_path):
    import numpy as np
    import torch

    from mfrecipes.plots import labelled_grid, save_labelled_grid
    from mfrecipes.train.log import RunLogger

    x = torch.linspace(-1, 1, 6 * 64).reshape(6, 1, 8, 8)
    arr = labelled_grid(x, title="run | 1-NFE | 128 images | EMA ema_0.999",
                        labels=[0, 1, 2, 0, 1, 2], ncol=3)
    head = arr.shape[0] - (2 + 2 * (32 + 2))            # 2 rows of 32-px cells, pad 2
    assert arr.shape[1] >= 2 + 3 * 34 and head > 20
    assert (arr[:head] < 128).any()                      # title and headers are drawn
    # image 4 (row 1, column 1): nearest-neighbour x4, grey in all three channels
    top, left = head + 2 + 34, 2 + 34
    cell = arr[top:top + 32, left:left + 32]
    ref = (127.5 * x[4, 0] + 128).clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(cell[..., 0], np.kron(ref, np.ones((4, 4), np.uint8)))
    assert np.array_equal(cell[..., 0], cell[..., 2])
    save_labelled_grid(x, tmp_path / "g.png", title="t")
    log = RunLogger(str(tmp_path), total_images=10, start_images=0)
    log.image("samples/nfe1", arr, 10)
    log.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    (img,) = acc.Images("samples/nfe1")
    assert (img.width, img.height) == (arr.shape[1], arr.shape[0]) and img.step == 10
