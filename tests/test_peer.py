"""bench.peer's own arms measure what they say: the arm that leaves out the LM head projects the gradient of
exactly the modules the exact check sums (its squared norms match the unprojected gradient's), it leaves
encode.py's encoder as it found it, and the side-by-side table divides by the right arm."""

from __future__ import annotations

import numpy as np

import trackstar as ts
from bench import peer


def test_headless_arm_projects_the_base_models_gradients(tmp_path):
    data = peer.prepare(tmp_path, 12, 128, 2048)
    assert data["docs"] == 12 and data["max_tokens"] <= 128
    build = ts.build_encoder
    spans = peer.trackstar_child(tmp_path, 4096, 2048, 128, nohead=True)
    assert ts.build_encoder is build  # restored: other encodes in the process trace the LM head again
    ours, _ = peer.squared_norms("trackstar-nohead", spans["index"])
    ratio = ours / peer.exact_squared_norms(tmp_path, 12)
    # a d = 4,096 Kronecker projection keeps a squared norm to ~10% a document
    assert 0.8 < np.median(ratio) < 1.25, ratio
    with_head, _ = peer.squared_norms("trackstar", peer.trackstar_child(tmp_path, 4096, 2048, 128, False)["index"])
    # the LM head's gradient is ~10% of the squared norm of these random weights': the arm with it has more
    assert np.median(with_head / ours) > 1.05


def test_the_table_divides_by_bergson_at_the_matched_projection():
    def arm(tps: float, rss: float) -> dict:
        return {"tokens_per_s": tps, "wall_s": 1.0, "peak_rss_mib": rss, "peak_above_start_mib": rss / 2,
                "tokens_per_s_each": [round(tps)], "index_kib_per_doc": 16.0}

    results = {"arms": {"trackstar": arm(300.0, 600.0), "bergson-p64": arm(200.0, 800.0), "train": arm(600.0, 500.0)},
               "settings": {"dim": 4096, "token_budget": 2048, "repeats": 1, "threads": 1, "load_average": [1.0, 2.0],
                            "cores": 2},
               "data": {"docs": 4, "tokens": 400, "mean_tokens": 100.0, "max_tokens": 120, "parameters": 5e6,
                        "lm_head_parameters": 1e6},
               "versions": {"bergson": "2.5.1", "torch": "2.13.0"},
               "runs": {"trackstar": [{"tokens_per_s": 300.0}, {"tokens_per_s": 100.0}],
                        "bergson-p64": [{"tokens_per_s": 200.0}, {"tokens_per_s": 200.0}]}}
    row = next(line for line in peer.markdown(results).splitlines() if line.startswith("| trackstar |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "1.50, 0.50"  # each round's own ratio, beside the best-of ratio
    assert cells[2] == "1.50" and cells[4] == "0.50" and cells[8] == "0.75"
