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
