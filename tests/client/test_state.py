"""A client's saved personal state: pruning earlier rounds."""

from flexmoe.client.state import StateStore


class Saved:
    """Stands in for a FlexModel: save_pretrained writes a marker file."""

    def save_pretrained(self, folder, include_shared=False):
        folder.mkdir(parents=True)
        (folder / "personal.safetensors").write_text("x")


def test_pruning_removes_only_earlier_rounds_of_this_store(tmp_path):
    store = StateStore(tmp_path)
    for round_ in (7, 1, 2, 3):  # round 7: left by an interrupted attempt
        store.save(Saved(), round_, include_shared=False)
    assert store.rounds() == [2, 3, 7]
    assert store.latest(before=4) == tmp_path / "round-0003"
    assert not list(tmp_path.glob(".*"))


def test_pruning_keeps_as_many_rounds_as_asked(tmp_path):
    store = StateStore(tmp_path, keep=4)
    for round_ in (1, 2, 3, 4, 5):
        store.save(Saved(), round_, include_shared=False)
        assert store.rounds() == list(range(max(1, round_ - 3), round_ + 1))
