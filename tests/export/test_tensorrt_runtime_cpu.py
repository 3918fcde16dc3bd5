"""TensorRT pieces that a CPU can check, against stand-ins with the ``tensorrt`` module's documented API
shape (TensorRT cannot be installed on our machines; the ``tensorrt``-marked tests in
test_tensorrt_build.py run the same code against the real library): the version switch, the strongly
typed network flags, the precision a plan gets, the timing cache's key, refusal and save, and one
execution context per captured slot."""

import enum
import os
from types import SimpleNamespace

import pytest

from engine.backends.tensorrt import SlotContexts, _Slot, install_hint, missing_message, tensorrt_major
from export import tensorrt_build as tb


class _CreationFlag(enum.IntEnum):  # tensorrt.NetworkDefinitionCreationFlag (TensorRT 10.x)
    STRONGLY_TYPED = 1


def fake_trt(version: str):
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=_CreationFlag)


def test_supported_tensorrt_range_and_flags():
    assert tensorrt_major("10.15.1.29") == 10 and tensorrt_major("11.4.0") == 11
    for bad in ("8.6.1", "9.3.0", "12.0.0", "x.y"):
        with pytest.raises(ValueError, match="TensorRT|version") as info:
            tensorrt_major(bad)
        assert bad in str(info.value) and "\n" not in str(info.value)
    # TensorRT 10: STRONGLY_TYPED as a bit; TensorRT 11: strongly typed always, no flag (deprecated there)
    assert tb.network_flags(fake_trt("10.15.1")) == 1 << 1
    assert tb.network_flags(fake_trt("11.0.0")) == 0
    with pytest.raises(ValueError, match="9.3.0 is not supported"):
        tb.network_flags(fake_trt("9.3.0"))


def test_install_hint_matches_torchs_cuda():
    assert "tensorrt-cu13>=10,<12" in install_hint("13.0")
    assert "tensorrt-cu12>=10,<12" in install_hint("12.8")
    assert "torch.version.cuda" in install_hint("")  # a CPU torch: say how to choose
    assert missing_message("13.0").startswith("TensorRT is not importable here: pip install 'tensorrt-cu13")


def test_plan_precision_is_the_exports():
    assert tb.plan_precision(None, "float16", "o") == "fp16"
    assert tb.plan_precision("fp32", "float32", "o") == "fp32"
    assert tb.plan_precision(None, "bfloat16", "o") == "bf16"
    with pytest.raises(ValueError, match="strongly typed.*float32 graphs.*fp16 plans need a float16 export.*"
                                         "--precision float16"):
        tb.plan_precision("fp16", "float32", "o")
    with pytest.raises(ValueError, match="bf16 plans need bfloat16 graphs.*float32 and float16 only"):
        tb.plan_precision("bf16", "float16", "o")
    with pytest.raises(ValueError, match="unknown TensorRT precision 'int8'"):
        tb.plan_precision("int8", "float32", "o")


def test_precision_mismatch_refused_before_tensorrt(default_export, tmp_path):
    from export.__main__ import main

    with pytest.raises(ValueError, match="float32 graphs, so fp16 plans"):
        tb.build_plans(default_export[0], str(tmp_path / "plans"), precision="fp16")
    assert main(["tensorrt", "--onnx", default_export[0], "--out", str(tmp_path / "p"), "--precision", "fp16"]) == 2
    assert not (tmp_path / "plans").exists() and not (tmp_path / "p").exists()


def test_fp8_needs_fp8_tensors_in_the_graph(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def graph_file(name, to):
        node = helper.make_node("Cast", ["x"], ["y"], to=to)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", to, [2])])
        path = str(tmp_path / f"{name}.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
        return path

    assert tb.graph_has_fp8(graph_file("fp8", TensorProto.FLOAT8E4M3FN))
    assert not tb.graph_has_fp8(graph_file("fp16", TensorProto.FLOAT16))
    manifest = {"networks": {"a": {"file": "fp16.onnx"}, "b": {"file": "fp8.onnx"}}}
    tb.check_fp8_graphs(str(tmp_path), manifest, ["a", "b"])
    with pytest.raises(ValueError, match="hold no FP8 tensors.*ModelOpt"):
        tb.check_fp8_graphs(str(tmp_path), manifest, ["a"])


def test_timing_cache_keyed_by_tensorrt_and_gpu():
    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    path = tb.timing_cache_path("out", "10.15.1", h100)
    assert path == os.path.join("out", "timing-10.15.1-nvidia-h100-80gb-hbm3-sm90.cache")
    others = {tb.timing_cache_path("out", "11.0.0", h100),
              tb.timing_cache_path("out", "10.15.1", {"gpu": "NVIDIA H200", "compute_capability": "9.0"}),
              tb.timing_cache_path("out", "10.15.1", {**h100, "compute_capability": "8.9"})}
    assert path not in others and len(others) == 3


class FakeCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return memoryview(self.data + b"+timed")


class FakeConfig:
    """IBuilderConfig's timing-cache API: create_timing_cache(bytes), set_timing_cache(cache, ignore_mismatch)
    -> bool, get_timing_cache(); ``foreign`` bytes are refused as TensorRT refuses another build's cache."""

    def __init__(self, foreign=b"other-trt", fail_serialize=False):
        self.foreign, self.fail_serialize, self.cache = foreign, fail_serialize, None

    def create_timing_cache(self, data: bytes):
        return FakeCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        if cache.data == self.foreign:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        if self.fail_serialize:
            raise RuntimeError("serialize failed")
        return self.cache


def test_timing_cache_load_checks_the_result(tmp_path):
    path, log = tmp_path / "t.cache", []
    assert tb.attach_timing_cache(FakeConfig(), str(path), log.append).data == b"" and log == []  # none yet
    path.write_bytes(b"ours")
    assert tb.attach_timing_cache(FakeConfig(), str(path), log.append).data == b"ours" and log == []
    path.write_bytes(b"other-trt")
    config = FakeConfig()
    assert tb.attach_timing_cache(config, str(path), log.append).data == b""  # refused: an empty one instead
    assert len(log) == 1 and "refused the timing cache" in log[0] and config.cache.data == b""


def test_timing_cache_save_never_loses_the_plan(tmp_path):
    path, log = tmp_path / "t.cache", []
    config = FakeConfig()
    tb.attach_timing_cache(config, None, log.append)
    assert tb.save_timing_cache(config, str(path), log.append) and path.read_bytes() == b"+timed"
    assert not tb.save_timing_cache(FakeConfig(fail_serialize=True), str(path), log.append)
    assert "not saved" in log[-1] and path.read_bytes() == b"+timed"  # the old cache stays whole


class FakeBuilderTrt:
    """The builder half of the tensorrt module, recording what build_plan asks of it."""

    def __init__(self, version: str, fail_serialize=False):
        self.__version__ = version
        self.NetworkDefinitionCreationFlag = _CreationFlag
        self.calls = []
        self.config = FakeConfig(fail_serialize=fail_serialize)
        trt = self

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                trt.calls.append(("create_network", flags))
                return "network"

            def create_builder_config(self):
                return SimpleNamespace(set_memory_pool_limit=lambda *a: None,
                                       set_flag=lambda f: trt.calls.append(("set_flag", f)),
                                       add_optimization_profile=lambda p: trt.calls.append(("profile", p.shapes)),
                                       create_timing_cache=trt.config.create_timing_cache,
                                       set_timing_cache=trt.config.set_timing_cache,
                                       get_timing_cache=trt.config.get_timing_cache)

            def create_optimization_profile(self):
                profile = SimpleNamespace(shapes={})
                profile.set_shape = lambda name, lo, opt, hi: profile.shapes.__setitem__(name, (lo, opt, hi))
                return profile

            def build_serialized_network(self, network, config):
                trt.calls.append(("build", network))
                return b"PLAN"

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = 0

            def parse_from_file(self, path):
                trt.calls.append(("parse", os.path.basename(path)))
                return True

        class Logger:
            WARNING = 2

            def __init__(self, severity):
                pass

        self.Builder, self.OnnxParser, self.Logger = Builder, OnnxParser, Logger
        self.MemoryPoolType = SimpleNamespace(WORKSPACE=0)


@pytest.mark.parametrize("version, flags", [("10.15.1", 1 << 1), ("11.4.0", 0)])
def test_build_plan_strongly_typed_without_precision_flags(version, flags, default_export, tmp_path, monkeypatch):
    from engine.artefacts import networks_from_manifest

    onnx_dir, manifest = default_export
    network = networks_from_manifest(manifest)["motion_dit"]
    trt = FakeBuilderTrt(version)
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    plan, cache, log = tmp_path / "dit.plan", tmp_path / "t.cache", []
    tb.build_plan(os.path.join(onnx_dir, manifest["networks"]["motion_dit"]["file"]), network, str(plan),
                  str(cache), 1.0, log.append)
    assert ("create_network", flags) in trt.calls and not any(c[0] == "set_flag" for c in trt.calls)
    assert len([c for c in trt.calls if c[0] == "profile"]) == len(network.buckets)
    assert plan.read_bytes() == b"PLAN" and cache.read_bytes() == b"+timed"
    # the timing cache's save fails: the plan is kept, a warning says so
    trt = FakeBuilderTrt(version, fail_serialize=True)
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    plan2 = tmp_path / "dit2.plan"
    tb.build_plan(os.path.join(onnx_dir, manifest["networks"]["motion_dit"]["file"]), network, str(plan2),
                  str(tmp_path / "t2.cache"), 1.0, log.append)
    assert plan2.read_bytes() == b"PLAN" and "not saved" in log[-1] and not (tmp_path / "t2.cache").exists()


class FakeContext:
    """IExecutionContext's binding API: set_optimization_profile_async, set_input_shape, set_tensor_address."""

    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, None, {}, {}

    def set_optimization_profile_async(self, profile, stream):
        holder = self.engine.profile_holder.get(profile)
        if self.engine.one_context_per_profile and holder not in (None, self):
            return False
        self.engine.profile_holder[profile] = self
        self.profile = profile
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        self.engine.rebinds += 1


class FakeEngine:
    def __init__(self, one_context_per_profile=False):
        self.one_context_per_profile = one_context_per_profile
        self.profile_holder, self.contexts, self.rebinds = {}, [], 0

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class Buffer:
    def __init__(self, *shape):
        self.shape, self._ptr = shape, id(self)

    def data_ptr(self):
        return self._ptr


def slot(profile, batch):
    return _Slot(profile, {"x": Buffer(batch, 3)}, {"y": Buffer(batch, 3)})


def test_one_context_per_captured_slot():
    """Guidance interval (B then 2B in one profile) and two buckets, interleaved: every slot keeps its own
    context, bound once, so a graph captured for it stays valid."""
    engine = FakeEngine()
    contexts = SlotContexts(engine, stream_handle=7)
    slots = {(0, 1): slot(0, 1), (0, 2): slot(0, 2), (1, 1): slot(1, 1)}
    for key in [(0, 1), (0, 2), (1, 1)] * 3:
        contexts.bind(key, slots[key])
        slots[key].graph = slots[key].graph or f"graph{key}"  # what the runtime captures on first use
    assert len(engine.contexts) == 3 and engine.rebinds == 6  # 2 addresses per slot, once each
    for (profile, batch), s in slots.items():
        assert s.context.profile == profile and s.context.shapes == {"x": (batch, 3)}
        assert s.context.addresses == {"x": s.inputs["x"].data_ptr(), "y": s.outputs["y"].data_ptr()}
        assert s.graph == f"graph{(profile, batch)}"  # never invalidated


def test_shared_context_invalidates_its_graphs():
    """Where TensorRT allows one context per profile, the slots of a profile share it: rebinding it to
    another slot drops the graph captured on it (re-captured on that slot's next call)."""
    engine = FakeEngine(one_context_per_profile=True)
    contexts = SlotContexts(engine, stream_handle=7)
    small, large = slot(0, 1), slot(0, 2)
    contexts.bind((0, 1), small)
    small.graph = "g-small"
    contexts.bind((0, 1), small)
    assert small.graph == "g-small"  # same slot: nothing rebinds
    contexts.bind((0, 2), large)
    assert large.context is small.context and small.graph is None
    assert small.context.shapes == {"x": (2, 3)} and small.context.addresses["y"] == large.outputs["y"].data_ptr()
    large.graph = "g-large"
    contexts.bind((0, 1), small)
    assert large.graph is None and small.context.shapes == {"x": (1, 3)}


def test_without_graphs_one_context_serves_every_slot():
    """No CUDA graphs: one context (one activation memory), rebound to each slot's profile and buffers."""
    engine = FakeEngine()
    contexts = SlotContexts(engine, stream_handle=7, per_slot=False)
    slots = {(0, 1): slot(0, 1), (1, 2): slot(1, 2)}
    for key in [(0, 1), (1, 2), (0, 1)]:
        contexts.bind(key, slots[key])
        context = slots[key].context
        assert context.profile == key[0] and context.shapes == {"x": (key[1], 3)}
        assert context.addresses["y"] == slots[key].outputs["y"].data_ptr()
    assert len(engine.contexts) == 1
