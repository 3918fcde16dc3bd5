"""Config sections as dataclasses (engine.configs): every saved config loads and round-trips, unknown keys in
any section are one-line errors naming the key and the config, and each default has one home."""

import dataclasses
import json
import os
import random
import string

import pytest

from engine.configs import (CONFIG_DIR, CMDConfig, DiffusionTrainConfig, SamplingConfig, StageTrainConfig,
                            TrainConfig, available_configs, load_config)
from engine.default_model import DEFAULT_MODEL_DIR
from engine.pipeline import check_request

TINY = os.path.join(os.path.dirname(__file__), "tiny_config.json")
SAVED = [os.path.join(CONFIG_DIR, f"{n}.json") for n in available_configs()] + [
    TINY, os.path.join(DEFAULT_MODEL_DIR, "cmd_config.json")]


def _data(path=TINY) -> dict:
    with open(path) as f:
        return json.load(f)


def _fresh_key() -> str:
    return "x_" + "".join(random.choices(string.ascii_lowercase, k=8))


@pytest.mark.parametrize("path", SAVED, ids=os.path.basename)
def test_saved_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg.sampling, SamplingConfig) and isinstance(cfg.train, TrainConfig)
    raw = _data(path)
    for key, value in raw.get("sampling", {}).items():  # every saved value is the typed one
        assert getattr(cfg.sampling, key) == value, key
    for stage, section in raw.get("train", {}).items():
        for key, value in section.items():
            got = getattr(cfg.train.stage(stage), key)
            assert (list(got) if isinstance(got, tuple) else got) == value, f"train.{stage}.{key}"
    saved = tmp_path / "cmd_config.json"
    cfg.save(str(saved))
    again = load_config(str(saved))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    again.save(str(tmp_path / "again.json"))
    assert _data(saved) == _data(tmp_path / "again.json")  # a fixed point after one save


def test_step_caching_data_stays_free_form_and_is_kept():
    cfg = load_config(os.path.join(DEFAULT_MODEL_DIR, "cmd_config.json"))
    data = _data(os.path.join(DEFAULT_MODEL_DIR, "cmd_config.json"))["sampling"]["cache"]
    assert cfg.sampling.cache == data and cfg.sampling["cache"] == data
    assert json.loads(json.dumps(cfg.to_dict()))["sampling"]["cache"] == data


SECTIONS = ["config", "sampling", "train", "train.autoencoder", "train.content", "train.motion", "autoencoder",
            "motion_dit", "text_encoder", "content_scheduler", "motion_scheduler"]


@pytest.mark.parametrize("where", SECTIONS)
def test_unknown_keys_are_one_line_errors_naming_key_and_config(where):
    data = _data()
    name = data["name"] = "cfg-" + _fresh_key()
    key = _fresh_key()
    section = data
    for part in ([] if where == "config" else where.split(".")):
        section = section.setdefault(part, {})
    section[key] = random.random()
    with pytest.raises(ValueError) as err:
        CMDConfig.from_dict(data)
    message = str(err.value)
    assert "\n" not in message and repr(key) in message and repr(name) in message
    assert f"unknown {where} key" in message


@pytest.mark.parametrize("stage,key", [("autoencoder", "text_dropout"), ("content", "l1_weight"),
                                       ("motion", "mse_weight")])
def test_a_key_of_another_stage_is_refused(stage, key):
    data = _data()
    data["train"] = {stage: {key: 0.5}}
    with pytest.raises(ValueError, match=rf"unknown train.{stage} key '{key}'"):
        CMDConfig.from_dict(data)


def test_bad_section_values_name_the_config():
    data = _data()
    data["train"] = {"content": {"precision": "fp16"}}
    with pytest.raises(ValueError,
                       match=r"config 'tiny-test': train.content: precision must be 'bf16' or 'fp32', got 'fp16'"):
        CMDConfig.from_dict(data)
    data["train"] = {"motion": {"betas": [0.9]}}
    with pytest.raises(ValueError, match=r"train.motion: betas must be two numbers"):
        CMDConfig.from_dict(data)
    data["train"] = []
    data["motion_dit"].pop("text_dropout", None)
    with pytest.raises(ValueError, match=r"config 'tiny-test': train must be an object, got list"):
        CMDConfig.from_dict(data)
    data = dict(_data(), sampling=3)
    with pytest.raises(ValueError, match=r"config 'tiny-test': sampling must be an object, got int"):
        CMDConfig.from_dict(data)


def test_request_defaults_come_from_the_sampling_section():
    data = _data()
    data["sampling"] = {}
    cfg = CMDConfig.from_dict(data)
    default = SamplingConfig()
    req = check_request(cfg)
    assert (req.steps, req.guidance, req.scheduler) == (default.steps, default.guidance, default.scheduler)
    # motion_steps / motion_guidance left out: the request's content values (given or defaulted)
    assert (req.motion_steps, req.motion_guidance) == (default.steps, default.guidance)
    assert {"motion_steps", "motion_guidance", "cache"}.isdisjoint(cfg.to_dict()["sampling"])  # unset: absent
    steps, guidance = random.randint(2, 40), round(random.uniform(1.5, 9.0), 3)
    req = check_request(cfg, num_inference_steps=steps, guidance_scale=guidance)
    assert (req.motion_steps, req.motion_guidance) == (steps, guidance)
    # given in the config: the config's, whatever the content values
    data["sampling"] = {"steps": steps, "motion_steps": steps + 1, "guidance": guidance, "motion_guidance": 1.25,
                        "scheduler": "dpm"}
    req = check_request(CMDConfig.from_dict(data), num_inference_steps=3, guidance_scale=7.0)
    assert (req.steps, req.motion_steps, req.guidance, req.motion_guidance, req.scheduler) == (
        3, steps + 1, 7.0, 1.25, "dpm")


def test_training_defaults_live_in_the_train_sections():
    data = _data()
    data["train"] = {}
    cfg = CMDConfig.from_dict(data)
    assert cfg.train.autoencoder.precision == "fp32" and cfg.train.content.precision == "bf16"
    assert cfg.train.content == cfg.train.motion == DiffusionTrainConfig()
    for stage in ("autoencoder", "content", "motion"):
        assert isinstance(cfg.train.stage(stage), StageTrainConfig)
    with pytest.raises(ValueError, match=r"unknown training stage 'video'; choose from autoencoder, content, motion"):
        cfg.train.stage("video")
    p = round(random.uniform(0.01, 0.5), 4)
    data["motion_dit"].pop("text_dropout", None)  # its older place (see below)
    data["train"] = {"motion": {"text_dropout": p}, "content": {"lr": 3e-4}}
    cfg = CMDConfig.from_dict(data)
    assert cfg.train.motion.text_dropout == p and cfg.train.content.text_dropout == DiffusionTrainConfig.text_dropout
    assert cfg.train.content.lr == 3e-4 and cfg.train.motion.lr == StageTrainConfig.lr


def test_motion_text_dropout_in_the_network_section_moves_to_train():
    """Earlier configs kept the motion stage's caption dropout as motion_dit.text_dropout (never read by the
    network)."""
    data = _data()
    p = round(random.uniform(0.01, 0.5), 4)
    data["motion_dit"]["text_dropout"] = p
    cfg = CMDConfig.from_dict(data)
    assert cfg.train.motion.text_dropout == p and "text_dropout" not in cfg.to_dict()["motion_dit"]
    data["train"] = {"motion": {"text_dropout": p}}
    assert CMDConfig.from_dict(data).train.motion.text_dropout == p  # the same value twice: fine
    data["train"] = {"motion": {"text_dropout": p / 2}}
    with pytest.raises(ValueError, match=r"config 'tiny-test': give the motion stage's text dropout once, as "
                                         r"train.motion.text_dropout"):
        CMDConfig.from_dict(data)


def test_sections_read_like_dicts():
    cfg = load_config(TINY)
    s = cfg.sampling
    assert s["steps"] == s.get("steps") == s.steps and "steps" in s
    assert "cache" not in s and s.get("cache", "none") == "none" and s.pop("cache", None) is None
    with pytest.raises(KeyError):
        s["cache"]
    entry = {"reuse": "reuse", "schedules": {}}
    s["cache"] = entry
    assert s.cache is entry and "cache" in s and s["cache"] is entry
    del s["cache"]
    assert s.cache is None and "cache" not in s
    s["steps"] = 7
    assert s.steps == 7
    del s["steps"]
    assert s.steps == SamplingConfig.steps  # deleting a key restores its default
    key = _fresh_key()
    with pytest.raises(KeyError, match=key):
        s[key] = 1
    assert key not in s and not hasattr(s, key)
    assert cfg.train["content"] is cfg.train.content
    assert cfg.train.content["text_dropout"] == cfg.train.content.text_dropout
    assert dataclasses.asdict(cfg.train.stage("autoencoder"))["l1_weight"] == 1.0


def test_a_stage_may_declare_its_training_sizes():
    """``train.<stage>.sizes`` is the trainer's default for ``--sizes`` (trainer/train.py); left out, it is
    not written back."""
    cfg = load_config("default")
    assert cfg.train.content.sizes is None and "sizes" not in cfg.to_dict()["train"]["content"]
    raw = cfg.to_dict()
    raw["train"]["content"]["sizes"] = ["16x32x32", "16x64x64"]
    again = CMDConfig.from_dict(raw)
    assert again.train.content.sizes == ["16x32x32", "16x64x64"] and again.train.motion.sizes is None
    assert again.to_dict()["train"]["content"]["sizes"] == ["16x32x32", "16x64x64"]
