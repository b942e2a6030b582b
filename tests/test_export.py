"""Export: ONNX + metadata + model card, parity check (and that it can fail), ModelScorer
serving it, streaming encoding == bulk encoding through the model, checkpoint errors."""
from __future__ import annotations

import shlex
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from stream.cli import build_parser, main
from stream.errors import ClickscoreError
from stream.events import ClickEvent, EVENT_TYPE_NAMES
from stream.features import (INPUT_NAMES, WINDOW, FeatureArtefacts, append_event, empty_window,
                             encode_window)
from stream.scoring import ModelScorer
from training import export as export_module
from training.checkpoint import CheckpointError, load_checkpoint
from training.examples import build_examples, fit_artefacts, read_events
from training.export import ExportError, LastPositionScorer, check_parity, write_onnx
from training.models import build_model
from training.train import MODEL_INPUTS

torch.set_num_threads(1)
KINDS = ("gru", "dilated")


def train_argv(data, out, kind):
    return ["train", "--data", str(data), "--out", str(out), "--model", kind, "--seed", "3",
            "--max-steps", "5", "--epochs", "1", "--batch-size", "32", "--embedding-dim", "16",
            "--hidden-dim", "24", "--threads", "1", "--max-valid-windows", "300", "--min-item-count", "2"]


@pytest.fixture(scope="module")
def trained(yoochoose, tmp_path_factory):
    """kind -> (checkpoint folder, exported folder), trained a few steps on real data."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for kind in KINDS:
        assert main(train_argv(yoochoose, root / f"ck-{kind}", kind)) == 0
        assert main(["export", "--checkpoint", str(root / f"ck-{kind}"), "--out", str(root / "onnx" / kind),
                     "--model-version", "7"]) == 0
        folders[kind] = (root / f"ck-{kind}", root / "onnx" / kind)
    return folders


@pytest.mark.parametrize("kind", KINDS)
def test_exported_model_loads_scores_and_carries_metadata(trained, yoochoose, kind):
    checkpoint, folder = trained[kind]
    scorer = ModelScorer(folder)
    meta = dict(scorer.session.get_modelmeta().custom_metadata_map)
    assert meta["model_kind"] == kind and meta["model_name"] == kind and meta["model_version"] == "7"
    assert meta["heads"] == "buy,next_item" and meta["dataset"] == "yoochoose"
    assert meta["input_names"] == ",".join(INPUT_NAMES) and meta["window"] == str(WINDOW)
    assert meta["vocab_hash"] == FeatureArtefacts.load(checkpoint / "features.json").vocab_hash
    model = onnx.load(str(folder / "model.onnx"))
    assert model.opset_import[0].version >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param      # dynamic batch
    assert model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == WINDOW
    # real windows of the valid split, any batch size
    frame = read_events(yoochoose)
    valid = build_examples(frame, "valid", scorer.artefacts)
    windows = [valid.rows[s:s + n] for s, n in zip(valid.window_start[:5], valid.window_length[:5])]
    batch = scorer.score(windows, top_k=20)
    assert batch.buy_probability.shape == (5,) and batch.top_items.shape == (5, 20)
    assert (batch.top_items >= 2).all()
    # The top-k is taken inside the graph (only (B, k) leaves the runtime) and equals the
    # full score matrix ranked in numpy; asking for more than top_k_max falls back to it.
    assert meta["output_names"].endswith("top_items,top_scores") and scorer.top_k_max == int(meta["top_k_max"])
    windows = [valid.rows[s:s + n] for s, n in zip(valid.window_start[:300], valid.window_length[:300])]
    from stream.features import encode_windows
    from stream.scoring import top_k_items
    encoded = encode_windows(windows, scorer.artefacts)
    _, full = scorer.predict(encoded)
    want_items, want_scores = top_k_items(full, 20)
    got = scorer.score(windows, top_k=20)
    assert np.abs(got.top_scores - want_scores).max() <= 1e-6
    assert (got.top_items == want_items).mean() > 0.99
    # Both graphs take k as an input: the k asked for is what the graph ranks, and it is
    # the head of the top_k_max ranking a caller that feeds no k gets.
    assert scorer._takes_k == {"model.onnx": True, "model_step.onnx": True}
    feeds = {name: encoded[name] for name in INPUT_NAMES}
    _, items_max, scores_max = scorer.session.run(["buy_probability", "top_items", "top_scores"], feeds)
    assert items_max.shape == (300, scorer.top_k_max)
    _, items_5, scores_5 = scorer.session.run(["buy_probability", "top_items", "top_scores"],
                                              feeds | {"top_k": np.array([5])})
    assert items_5.shape == (300, 5)
    np.testing.assert_array_equal(items_5, items_max[:, :5])
    np.testing.assert_array_equal(scores_5, scores_max[:, :5])
    wide = scorer.score(windows[:3], top_k=scorer.top_k_max + 1)
    assert wide.top_items.shape == (3, scorer.top_k_max + 1)
    card = (folder / "model_card.md").read_text()
    assert "clickscore prepare --dataset yoochoose" in card and "clickscore train" in card
    assert "Recall@20" in card and "parity" in card.lower()


def test_model_card_commands_rebuild_the_same_weights(trained, tmp_path):
    checkpoint, folder = trained["gru"]
    card = (folder / "model_card.md").read_text()
    block = card.split("```sh\n")[1].split("```")[0].strip().splitlines()
    train_line = next(line for line in block if line.startswith("clickscore train"))
    argv = shlex.split(train_line)[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "rebuilt")
    assert main(argv) == 0
    a = torch.load(checkpoint / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "rebuilt" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", KINDS)
def test_parity_check_fails_on_a_perturbed_onnx_and_on_perturbed_weights(trained, tmp_path, kind):
    checkpoint, folder = trained[kind]
    model, _, _ = load_checkpoint(checkpoint)
    wrapper = LastPositionScorer(model)
    with np.load(checkpoint / "parity_inputs.npz") as data:
        inputs = {k: data[k] for k in INPUT_NAMES}
    assert len(inputs["length"]) >= 100
    figures = check_parity(wrapper, folder, inputs)
    assert figures["buy_probability"] <= 1e-5 and figures["next_item_scores"] <= 1e-5

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    graph = onnx.load(str(broken / "model.onnx"))
    init = next(t for t in graph.graph.initializer if "item_bias" in t.name or t.name.endswith("bias"))
    array = numpy_helper.to_array(init).copy()
    array.flat[2] += 1e-3    # a small error: well above the tolerance, far below "obviously broken"
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(graph, str(broken / "model.onnx"))
    with pytest.raises(ExportError, match="parity check failed"):
        check_parity(wrapper, broken, inputs)

    with torch.no_grad():
        model.heads.buy.bias += 0.05
    with pytest.raises(ExportError, match="buy_probability"):
        check_parity(wrapper, folder, inputs)


def test_failed_parity_fails_the_export_and_leaves_no_folder(trained, tmp_path, monkeypatch, capsys):
    checkpoint, _ = trained["gru"]
    real_write = export_module.write_onnx

    def write_then_corrupt(wrapper, path, example, opset, metadata):
        real_write(wrapper, path, example, opset, metadata)
        graph = onnx.load(str(path))
        for init in graph.graph.initializer:
            if init.name.endswith("buy.bias"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, init.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(export_module, "write_onnx", write_then_corrupt)
    out = tmp_path / "onnx_models" / "bad"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "parity check failed" in capsys.readouterr().err
    assert not out.exists() and list((tmp_path / "onnx_models").iterdir()) == []


# -- streaming == bulk -----------------------------------------------------------------

@pytest.fixture(scope="module")
def long_session(datasets, tmp_path_factory):
    """The longest real session of the Taobao sample (130 events: views, carts, buys)."""
    out = tmp_path_factory.mktemp("taobao")
    assert main(["prepare", "--dataset", "taobao", "--input", str(datasets / "taobao-userbehavior"),
                 "--out", str(out)]) == 0
    frame = read_events(out)
    lengths = frame.group_by("session_id").len().sort("len", descending=True)
    longest = lengths["session_id"][0]
    assert lengths["len"][0] > WINDOW
    return frame, longest


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_windows_score_like_the_bulk_training_path(long_session, tmp_path, kind):
    import polars as pl

    frame, session_id = long_session
    artefacts = fit_artefacts(frame, min_item_count=1)
    torch.manual_seed(0)
    config = dict(n_items=artefacts.n_items, n_categories=artefacts.n_categories, embedding_dim=16,
                  hidden_dim=24, dropout=0.0)
    model = build_model(kind, config).eval()
    wrapper = LastPositionScorer(model).eval()

    # bulk: the training path (session_rows -> windows -> encode_windows -> one causal pass)
    one = frame.filter(pl.col("session_id") == session_id).with_columns(split=pl.lit("train"))
    examples = build_examples(one, "train", artefacts)
    n = one.height
    assert len(examples) == 1 + (n - WINDOW)  # main window + one per event after the 100th
    batch = examples.batch(np.arange(len(examples)), trim=False)
    with torch.no_grad():
        buy_logit, next_logits = model(*(torch.from_numpy(batch[k]) for k in MODEL_INPUTS))
    bulk_buy = np.concatenate([torch.sigmoid(buy_logit[0, :WINDOW]).numpy(),
                               torch.sigmoid(buy_logit[1:, -1]).numpy()])         # (n,) one per event
    bulk_next = np.concatenate([next_logits[0, :WINDOW].numpy(), next_logits[1:, -1].numpy()])

    # streaming: one event at a time, as the worker does
    write_onnx(wrapper, tmp_path / "model.onnx", encode_window(examples.rows[:2], artefacts), 17, {
        "schema_version": "1", "window": str(WINDOW), "model_kind": kind, "model_name": "t",
        "model_version": "1", "vocab_hash": artefacts.vocab_hash, "heads": "buy,next_item",
        "input_names": ",".join(INPUT_NAMES), "output_names": "buy_probability,next_item_scores",
        "n_items": str(artefacts.n_items), "created": "now"})
    artefacts.save(tmp_path / "features.json")
    scorer = ModelScorer(tmp_path, provider="cpu")
    window = empty_window()
    stream_buy, stream_next, onnx_buy, onnx_next = [], [], [], []
    for row in one.iter_rows(named=True):
        event = ClickEvent(row["session_id"], row["event_type"], row["item_id"], row["timestamp"],
                           category_id=row["category_id"], price=row["price"])
        window = append_event(window, event, artefacts)
        inputs = encode_window(window, artefacts)
        with torch.no_grad():
            p, s = wrapper(*(torch.from_numpy(inputs[k]) for k in INPUT_NAMES))
        stream_buy.append(p.numpy()[0]); stream_next.append(s.numpy()[0])
        p, s = scorer.predict(inputs)
        onnx_buy.append(p[0]); onnx_next.append(s[0])
    assert len(window) == WINDOW and set(EVENT_TYPE_NAMES.values()) >= set(one["event_type"])
    np.testing.assert_allclose(np.array(stream_buy), bulk_buy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(stream_next), bulk_next, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(onnx_buy), bulk_buy, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(onnx_next), bulk_next, rtol=0, atol=1e-4)


# -- checkpoint errors -----------------------------------------------------------------

def test_checkpoint_errors_say_what_differs(trained, tmp_path):
    checkpoint, _ = trained["gru"]

    def copy(name):
        target = tmp_path / name
        shutil.copytree(checkpoint, target)
        return target

    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")

    corrupt = copy("corrupt")
    data = (corrupt / "checkpoint.pt").read_bytes()
    (corrupt / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(corrupt)

    mismatched = copy("mismatched")
    saved = torch.load(mismatched / "checkpoint.pt", weights_only=True)
    real_items = saved["config"]["n_items"]
    saved["config"]["n_items"] = real_items - 1000
    torch.save(saved, mismatched / "checkpoint.pt")
    with pytest.raises(CheckpointError,
                       match=f"item embedding has {real_items} rows in the state_dict but config says "
                             f"{real_items - 1000}"):
        load_checkpoint(mismatched)

    other_vocab = copy("other-vocab")
    theirs = FeatureArtefacts.load(other_vocab / "features.json")
    other = FeatureArtefacts(items=tuple(reversed(theirs.items)), categories=theirs.categories,
                             dwell_mean=theirs.dwell_mean, dwell_std=theirs.dwell_std,
                             price_mean=theirs.price_mean, price_std=theirs.price_std)
    other.save(other_vocab / "features.json")
    with pytest.raises(CheckpointError, match="vocab_hash .* trained with vocabulary"):
        load_checkpoint(other_vocab)

    (other_vocab / "features.json").unlink()
    with pytest.raises(ClickscoreError, match="features.json not found"):
        load_checkpoint(other_vocab)
    # the CLI turns it into one line and exit status 2
    assert main(["export", "--checkpoint", str(corrupt), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_train_cli_options_fall_back_to_environment(monkeypatch):
    monkeypatch.setenv("CLICKSCORE_TRAIN_IMBALANCE", "oversample")
    monkeypatch.setenv("CLICKSCORE_TRAIN_EPOCHS", "3")
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o"])
    assert args.imbalance == "oversample" and args.epochs == 3 and args.model == "gru"


@pytest.mark.parametrize("n_items,k", [(7, 5), (40, 20), (300, 100)])
def test_in_graph_top_k_skips_padding_and_oov_and_breaks_ties_toward_the_lower_index(n_items, k):
    # The serving top-k (export.add_top_k) on a graph whose next_item_scores is its input:
    # padding and OOV score highest, and small integer scores make ties everywhere, also at
    # the k-th place. Reference: real items sorted by score, then index.
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from stream.features import ITEM_OFFSET

    graph = helper.make_graph(
        [helper.make_node("Identity", ["scores"], ["next_item_scores"])], "top_k",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", n_items])],
        [helper.make_tensor_value_info("next_item_scores", TensorProto.FLOAT, ["batch", n_items])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    got_k = export_module.add_top_k(model, k_max=k)
    assert got_k == min(k, n_items - ITEM_OFFSET)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(n_items)
    scores = rng.integers(0, 4, (64, n_items)).astype(np.float32)
    scores[:, :ITEM_OFFSET] = 10.0                      # padding and OOV on top: never chosen
    scores[1] = 0.0                                     # one row all tied
    for k_fed in (None, 1, got_k // 2 + 1):   # k_fed None: the graph's own k
        feeds = {"scores": scores} if k_fed is None else {"scores": scores, "top_k": np.array([k_fed])}
        items, top = session.run(["top_items", "top_scores"], feeds)
        want_k = got_k if k_fed is None else k_fed
        assert items.shape == (len(scores), want_k)
        for row in range(len(scores)):
            real = np.arange(ITEM_OFFSET, n_items)
            order = real[np.lexsort((real, -scores[row, real]))][:want_k]
            assert items[row].tolist() == order.tolist()
            np.testing.assert_array_equal(top[row], scores[row, order])
