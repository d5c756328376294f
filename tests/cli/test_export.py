"""`flexmoe export`: a client's model out of a real run, loaded by flexmoe and by plain PEFT."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from flexmoe.cli import main
from flexmoe.export import EXPORT_FILE, MERGED, PEFT_CONFIG, PEFT_WEIGHTS
from flexmoe.flex.graft import grafted_blocks
from flexmoe.flex.model import PERSONAL_WEIGHTS, SHARED_WEIGHTS, FlexModel
from flexmoe.models.loading import load_model, resolve_model_path
from flexmoe.results import CHECKPOINT_DIR, CLIENTS_DIR, read_checkpoint
from tests.tiny_models import save_model

pytestmark = pytest.mark.slow

RUN = [
    "--clients", "2", "--rounds", "2", "--local-steps", "2", "--batch-size", "4",
    "--max-train", "12", "--max-test", "3", "--max-new-tokens", "4", "--max-length", "512",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "flex"
    assert main(["run", "--out", str(out), "--model", "tiny", *RUN]) == 0
    return out


def test_an_export_is_the_global_shared_state_with_the_clients_own(run_dir, tmp_path):
    out = tmp_path / "client-1"
    assert main(["export", str(run_dir), "--client", "1", "--out", str(out)]) == 0
    record = json.loads((out / EXPORT_FILE).read_text())
    run_id = read_checkpoint(run_dir).run_id
    assert (record["run_id"], record["round"], record["client"]) == (run_id, 2, 1)
    shared = load_file(run_dir / CHECKPOINT_DIR / "shared-round-0002.safetensors")
    exported = load_file(out / SHARED_WEIGHTS)
    assert set(exported) == set(shared)
    assert all(np.array_equal(exported[k], shared[k]) for k in shared)
    state = run_dir / CLIENTS_DIR / run_id / "client-1" / "round-0002" / PERSONAL_WEIGHTS
    personal, theirs = load_file(out / PERSONAL_WEIGHTS), load_file(state)
    assert personal and all(np.array_equal(personal[k], theirs[k]) for k in theirs)
    assert main(["info", "tiny", "--adapter", str(out)]) == 0
    base, _ = load_model("tiny")
    FlexModel.from_pretrained(base, out)  # loads as any adapter


PEFT_ONLY = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor([[5, 17, 42, 99, 7]])).logits
assert not any(name.startswith("flexmoe") for name in sys.modules)
print(json.dumps(logits[0, -1].tolist()))
"""


def test_the_lora_loads_as_a_plain_peft_adapter_without_flexmoe(run_dir, tmp_path):
    out = tmp_path / "client-0"
    assert main(["export", str(run_dir), "--client", "0", "--out", str(out)]) == 0
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and not config.get("modules_to_save")
    assert (out / PEFT_WEIGHTS).is_file()
    tiny = resolve_model_path("tiny")
    done = subprocess.run(
        [sys.executable, "-c", PEFT_ONLY, str(tiny), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    base, _ = load_model("tiny")
    model = FlexModel.from_pretrained(base, out).eval()
    for block in grafted_blocks(model.model):  # the PEFT adapter is the LoRA alone
        block.enabled = False
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([[5, 17, 42, 99, 7]])).logits[0, -1]
    assert torch.allclose(ours, theirs, atol=1e-5)
    with model.base_only(), torch.no_grad():
        plain = model(input_ids=torch.tensor([[5, 17, 42, 99, 7]])).logits[0, -1]
    assert not torch.allclose(plain, theirs, atol=1e-5)  # the LoRA changed something


def test_a_missing_client_or_round_is_one_line(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--client", "5", "--out", str(tmp_path / "a")]) == 2
    assert "ran clients 0 to 1; there is no client 5" in capsys.readouterr().err
    out = ["--out", str(tmp_path / "b")]
    assert main(["export", str(run_dir), "--client", "0", "--round", "9", *out]) == 2
    error = capsys.readouterr().err
    assert "ran rounds 1 to 2; there is no round 9" in error
    assert len(error.strip().splitlines()) == 1
    pruned = tmp_path / "pruned"  # a run whose round 1 arrays are gone, as pruning leaves them
    shutil.copytree(run_dir, pruned)
    (pruned / CHECKPOINT_DIR / "shared-round-0001.safetensors").unlink()
    out = ["--out", str(tmp_path / "c")]
    assert main(["export", str(pruned), "--client", "0", "--round", "1", *out]) == 2
    error = capsys.readouterr().err
    assert "keeps the shared parameters of round 2 only, not of round 1" in error
    assert len(error.strip().splitlines()) == 1


def test_merge_is_refused_in_one_line_where_it_cannot_be_exact(run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--client", "0", "--out", str(out), "--merge"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert (
        len(error) == 1
        and "cannot merge client 0's model exactly: model type 'qwen2_moe'" in (error[0])
    )
    assert not out.exists()  # refused before anything was written


def test_a_mixtral_clients_merged_checkpoint_is_its_model_in_plain_transformers(tmp_path):
    folder = save_model(tmp_path / "mixtral", "mixtral")
    run = tmp_path / "run"
    argv = ["run", "--out", str(run), "--model", str(folder), "--gate-with-bias", "false", *RUN]
    assert main(argv) == 0
    out = tmp_path / "alice"
    assert main(["export", str(run), "--client", "1", "--out", str(out), "--merge"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out / MERGED).eval()
    assert plain.config.model_type == "qwen2_moe"
    base, _ = load_model(str(folder))
    model = FlexModel.from_pretrained(base, out).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("method", ["local", "fedsa-lora"])
def test_methods_with_their_own_lora_export_the_clients_own(method, tmp_path):
    run = tmp_path / method
    assert main(["run", "--out", str(run), "--model", "tiny", "--method", method, *RUN]) == 0
    out = tmp_path / "export"
    assert main(["export", str(run), "--client", "0", "--out", str(out)]) == 0
    state = run / CLIENTS_DIR / read_checkpoint(run).run_id / "client-0" / "round-0002"
    personal = load_file(state / PERSONAL_WEIGHTS)
    shared = (  # local federates nothing: its LoRA is its own, saved with its state
        load_file(state / SHARED_WEIGHTS)
        if method == "local"
        else load_file(run / CHECKPOINT_DIR / "shared-round-0002.safetensors")
    )
    for exported, theirs in ((out / PERSONAL_WEIGHTS, personal), (out / SHARED_WEIGHTS, shared)):
        ours = load_file(exported)
        assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    lora = load_file(out / PEFT_WEIGHTS)  # the client's whole LoRA: its own B for fedsa-lora
    assert any(".lora_B." in k for k in lora) and any(".lora_A." in k for k in lora)
