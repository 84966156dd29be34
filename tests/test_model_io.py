"""model_io: large weights stay on disk from load to save, and what is written is what onnx writes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import GraphBuilder
from onnx import helper, numpy_helper
from test_cli import block_model, one_line_error, run

import onnx_reparam
from onnx_reparam.errors import ReparamError
from onnx_reparam.graph import Graph
from onnx_reparam.model_io import LARGE_TENSOR, load_model, load_weights, on_disk, read_array, save_model

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick


def big_model(rows: int = 64, cols: int = 512) -> onnx.ModelProto:
    """A MatMul whose weight is over LARGE_TENSOR bytes, a Mul by a small constant, and metadata
    fields on both sides of the graph in the file."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((rows, cols)).astype(np.float32), "w")
    weight.doc_string = "kept"
    small = numpy_helper.from_array(np.float32([2.0]), "s")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Mul", ["y", "s"], ["z"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, cols])], [weight, small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10,
                              producer_name="test", doc_string="a model")
    helper.set_model_props(model, {"k": "v"})
    assert rows * cols * 4 > LARGE_TENSOR
    return model


def loaded(path) -> onnx.ModelProto:
    """onnx.load's reading, external data read in and marked as in the file (as never saved)."""
    model = onnx.load(path)
    for tensor in model.graph.initializer:
        tensor.ClearField("data_location")
    return model


def test_large_initializers_stay_on_disk_and_read_back_exactly(tmp_path):
    model = big_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    lazy = load_model(path, lazy=True)
    weight, small = lazy.graph.initializer
    assert on_disk(weight)[0] == str(path.resolve()) and on_disk(small) is None
    assert not weight.HasField("raw_data") and weight.doc_string == "kept"
    np.testing.assert_array_equal(read_array(weight), numpy_helper.to_array(model.graph.initializer[0]))
    assert load_weights(lazy) == model  # read in, it is the model onnx saved, field for field
    assert load_model(path) == model  # the default: whole


@pytest.mark.parametrize("external", [False, True])
def test_saving_copies_weights_from_disk_as_onnx_would(tmp_path, external):
    model = big_model()
    source = tmp_path / "in.onnx"
    onnx.save(model, source)
    lazy = load_model(source, lazy=True)
    before = lazy.SerializeToString()
    target = tmp_path / "out.onnx"
    save_model(lazy, target, external_data=external)
    assert lazy.SerializeToString() == before  # the caller's model is not changed
    assert (tmp_path / "out.onnx.data").exists() == external
    assert loaded(target) == model
    if not external:
        assert onnx.load(target, load_external_data=False).graph.initializer[0].HasField("raw_data")


def test_a_self_contained_model_saves_to_the_bytes_onnx_reads(tmp_path):
    model = big_model()
    save_model(model, tmp_path / "a.onnx")
    assert loaded(tmp_path / "a.onnx") == model
    save_model(model, tmp_path / "b.onnx", external_data=True)
    assert loaded(tmp_path / "b.onnx") == model


def test_external_data_input_stays_on_disk(tmp_path):
    onnx.save(big_model(), tmp_path / "in.onnx", save_as_external_data=True, location="in.data",
              size_threshold=0)
    lazy = load_model(tmp_path / "in.onnx", lazy=True)
    weight, small = lazy.graph.initializer
    assert on_disk(weight)[0] == str((tmp_path / "in.data").resolve())
    assert on_disk(small) is None and small.HasField("raw_data")  # small ones are read in
    assert load_weights(lazy) == big_model()


def test_a_graph_given_in_two_parts_is_merged_as_protobuf_does(tmp_path):
    model = big_model()
    nodes, rest = onnx.ModelProto(), onnx.ModelProto()
    nodes.CopyFrom(model)
    del nodes.graph.initializer[:]
    rest.graph.initializer.extend(model.graph.initializer)
    path = tmp_path / "parts.onnx"
    path.write_bytes(nodes.SerializeToString() + rest.SerializeToString())
    assert onnx.load(path) == model  # protobuf's own reading of the file
    assert load_model(path) == model


def test_external_data_outside_the_models_folder_is_refused(tmp_path):
    model = big_model()
    (tmp_path / "sub").mkdir()
    onnx.save(model, tmp_path / "sub" / "m.onnx", save_as_external_data=True, location="w.data", size_threshold=0)
    loaded = onnx.load(tmp_path / "sub" / "m.onnx", load_external_data=False)
    (tmp_path / "sub" / "w.data").rename(tmp_path / "w.data")
    for entry in loaded.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../w.data"
    onnx.save(loaded, tmp_path / "sub" / "m.onnx")
    with pytest.raises(ReparamError, match="outside the model's folder"):
        load_model(tmp_path / "sub" / "m.onnx")


@pytest.mark.parametrize("damage", ["cut in a weight", "bad varint", "length past the end"])
def test_damaged_files_give_one_line(tmp_path, damage):
    data = big_model().SerializeToString()
    if damage == "cut in a weight":
        data = data[:len(data) // 2]
    elif damage == "bad varint":
        data = data[:4] + b"\xff" * 12
    else:
        data = b"\x3a\xff\xff\xff\x07" + data  # field 7 (graph) claiming 2 GB
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    code, output = run("optimize", path, tmp_path / "out.onnx")
    assert code == 2 and one_line_error(output) and "not an ONNX model or truncated" in output


def test_optimize_returns_a_whole_model_unless_asked_for_lazy_weights(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(block_model((1, 64, 8, 8)), path)
    whole, _ = onnx_reparam.optimize(path)
    assert not any(on_disk(t) for t in whole.graph.initializer)
    lazy, report = onnx_reparam.optimize(path, lazy_weights=True)
    assert report.verification.passed
    kept = [t for t in lazy.graph.initializer if on_disk(t)]
    new = [t for t in lazy.graph.initializer if not on_disk(t)]
    assert all(on_disk(t)[0] == str(path.resolve()) for t in kept) and new  # folded ones are in memory
    save_model(lazy, tmp_path / "a.onnx")
    save_model(whole, tmp_path / "b.onnx")
    assert onnx.load(tmp_path / "a.onnx") == onnx.load(tmp_path / "b.onnx")


def test_large_external_data_starts_at_multiples_of_64_kib(tmp_path):
    # as onnx saves it: onnxruntime then maps such data instead of reading it into memory
    model = big_model(rows=4, cols=1 << 16)  # 1 MiB: aligned
    model.graph.initializer.append(numpy_helper.from_array(np.ones(300, np.float32), "odd"))  # 1200 bytes
    model.graph.initializer.insert(0, model.graph.initializer.pop())  # the odd-sized one first
    save_model(model, tmp_path / "out.onnx", external_data=True)
    saved = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    offsets = {t.name: int(next(e.value for e in t.external_data if e.key == "offset"))
               for t in saved.graph.initializer if t.external_data}
    assert offsets == {"odd": 0, "w": 1 << 16}
    assert loaded(tmp_path / "out.onnx") == model


@pytest.mark.parametrize("runtime", [(1, 31), (1, 20)])
def test_onnxruntime_reads_weights_on_disk_where_they_are(tmp_path, monkeypatch, runtime):
    # 1.21 and later: from their file, by a folder given to the session (nothing is copied
    # into the bytes we hand it); before, as OrtValues over memory maps
    import sys
    runtime_module = sys.modules["onnx_reparam.runtime"]
    monkeypatch.setattr(runtime_module, "_ort_version", lambda: runtime)
    model = big_model()
    onnx.save(model, tmp_path / "in.onnx", save_as_external_data=True, location="in.data")
    lazy = load_model(tmp_path / "in.onnx", lazy=True)
    before = lazy.SerializeToString()
    source, weights, folder = runtime_module._session_source(lazy, tmp_path)
    assert lazy.SerializeToString() == before  # locations made relative only in the bytes
    assert len(source) < 4096 and (folder == str(tmp_path.resolve())) == (runtime >= (1, 21))
    assert bool(weights) == (runtime < (1, 21))
    x = {"x": np.ones((1, 64), np.float32)}
    expected = runtime_module.Runner("cpu").run(big_model(), [x])[0][0]  # onnx.save made `model` external
    np.testing.assert_array_equal(runtime_module.Runner("cpu").run(lazy, [x])[0][0], expected)


def constants_with_external_data(folder) -> tuple:
    """A model whose weights are Constant nodes (one inside an If's branch), saved as onnx saves
    with convert_attribute=True: every Constant value in model.data beside it."""
    rng = np.random.default_rng(0)
    weight, scale, floor = (rng.standard_normal(s).astype(np.float32) for s in ((8, 4, 3, 3), (1, 8, 1, 1), (1, 8, 6, 6)))
    branch = [helper.make_graph([helper.make_node("Constant", [], [f"t{i}"], value=numpy_helper.from_array(
        rng.standard_normal((1, 8, 1, 1)).astype(np.float32)))], f"branch{i}", [],
        [helper.make_tensor_value_info(f"t{i}", onnx.TensorProto.FLOAT, [1, 8, 1, 1])]) for i in (0, 1)]
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(scale)),
             helper.make_node("Mul", ["y", "s"], ["m"]),
             helper.make_node("Constant", [], ["f"], value=numpy_helper.from_array(floor)),
             helper.make_node("Max", ["m", "f"], ["h"]),  # a Constant the rewrite keeps
             helper.make_node("ReduceSum", ["x"], ["c"], keepdims=0),
             helper.make_node("Greater", ["c", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["t"], then_branch=branch[0], else_branch=branch[1]),
             helper.make_node("Add", ["h", "t"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 8, 6, 6])],
                              initializer=[numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = folder / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, convert_attribute=True, size_threshold=0, location="model.data")
    onnx.checker.check_model(path, full_check=True)
    return model, path


def test_constant_values_in_external_data_are_read_from_the_models_folder(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir(), (tmp_path / "out").mkdir(), (tmp_path / "elsewhere").mkdir()
    _, path = constants_with_external_data(tmp_path / "in")
    before = {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, output = run("optimize", path, tmp_path / "out" / "deploy.onnx")
    assert code == 0, output
    assert "rewrote 1 x Conv+Mul" in output
    out = onnx.load(tmp_path / "out" / "deploy.onnx", load_external_data=False)
    held = {entry.value for t in onnx.external_data_helper._get_all_tensors(out) for entry in t.external_data
            if entry.key == "location"}
    assert held <= {"deploy.onnx.data"}  # its own data file, beside it: never the input's
    assert {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before
    monkeypatch.chdir(tmp_path)
    x = {"x": np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)}
    expected = ort.InferenceSession(str(path)).run(None, x)[0]
    actual = ort.InferenceSession(str(tmp_path / "out" / "deploy.onnx")).run(None, x)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("columns,batch", [(144, "N"), (72, None)])
def test_a_size_onnx_inference_loses_is_named_only_where_it_is_proved(columns, batch):
    # Reshape(x, (-1, columns)) of x (N, 4, 6, 6): ONNX's inference has no name for the -1; it is
    # N where the columns take one sample (onnxruntime's symbolic inference proves it), 2N not
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 6, 6])
    flat = b.node("Reshape", [x, b.const(np.array([-1, columns], np.int64))])
    graph = Graph(b.model([b.node("Relu", [flat])]))
    first = graph.outputs[0].shape[0]
    assert first == batch if batch else first != "N"


def test_shape_inference_that_stops_writes_nothing_and_names_nothing(tmp_path, monkeypatch):
    # Concat of two batches of different names: onnxruntime's symbolic inference stops there (it is
    # not to assume N == M), where its own infer_shapes would save the model into the working
    # directory; the -1 after it stays unnamed
    monkeypatch.chdir(tmp_path)
    b = GraphBuilder()
    both = b.node("Concat", [b.input("x", ["N", 4, 6, 6]), b.input("y", ["M", 4, 6, 6])], axis=1)
    flat = b.node("Reshape", [both, b.const(np.array([-1, 288], np.int64))])
    model = b.model([b.node("Relu", [flat])])
    graph = Graph(model)
    assert graph.outputs[0].shape[0] not in ("N", "M") and list(tmp_path.iterdir()) == []
    concat = model.graph.node[0].name
    assert graph.unnamed_sizes == f"onnxruntime's symbolic shape inference stopped at Concat: {concat}"
    _optimized, report = onnx_reparam.optimize(model, verify=False)  # and the report says so
    assert any(note.startswith("sizes ONNX's shape inference lost are left unknown (onnxruntime's symbolic")
               for note in report.notes), report.notes
    plain = GraphBuilder()
    assert Graph(plain.model([plain.node("Relu", [plain.input("z", ["N", 4])])])).unnamed_sizes is None  # none lost
