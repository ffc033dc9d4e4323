"""The wire format: every message round-trips through msgpack; nothing but our structs decodes; no pickle."""

from __future__ import annotations

import pickle

import msgspec
import pytest

from loop.worker import protocol as p

SAMPLES: list[p.Msg] = [
    p.Hello(pid=1, load_id="L", model_path="/m", architecture="LlamaForCausalLM", n_params=3, checksum="c"),
    p.Heartbeat(pid=1, state="training", run_id=4, step=2),
    p.Progress(run_id=4, step=2, loss=0.25, metrics={"reward_margin": 0.1}),
    p.Ping(req=9, checksum=True),
    p.Train(req=1, run_id=4, objective="dpo", step=2, steps=3, lr=1e-5, beta=0.2, nll_weight=0.5,
            pairs=[p.Pair(prompt=[{"role": "user", "content": "2+2?"}], chosen="4", rejected="5"),
                   p.Pair(prompt="plain text prompt", chosen="a", rejected="b")]),
    p.Train(req=2, run_id=5, objective="kto", examples=[p.Example(prompt="q", completion="a", label=False)]),
    p.Screen(req=8, run_id=4, pairs=[p.Pair(prompt="q", chosen="a", rejected="b", chosen_ids=[5, 2])],
             max_len=512, base_weights="/models/base"),
    p.Screen(req=8, run_id=5, objective="kto", examples=[p.Example(prompt="q", completion="a", label=True)],
             base_weights="/models/base"),
    p.Apply(req=3, run_id=4, max_update_ratio=0.01),
    p.Discard(req=4, run_id=4),
    p.Checkpoint(req=5, path="/x/ckpt-v3", version=3, meta={"run": "4"}),
    p.Restore(req=6, path="/x/ckpt-v3"),
    p.Shutdown(req=7),
    p.Status(req=9, pid=1, state="idle", checksum="abc"),
    p.TrainDone(req=1, run_id=4, step=2, metrics={"loss": 0.6}, history=[{"loss": 0.7}, {"loss": 0.6}],
                update=p.UpdateStats(ok=True, update_norm=0.1, weight_norm=10.0, ratio=0.01, n_tensors=7)),
    p.Screened(req=8, run_id=4, contributions=[0.5, -0.25], n_tensors=12, probed_fraction=0.75, ms=30.0),
    p.Screened(req=8, run_id=5, contributions=[], n_tensors=0, probed_fraction=0.0, ms=1.0,
               note="nothing learned yet: the live weights equal the base"),
    p.Applied(req=3, run_id=4, checksum="def", ms=2.5, checksum_before="abc"),
    p.Refused(req=3, run_id=4, reason="delta of model.layers.0.mlp.up_proj.weight is not finite"),
    p.Discarded(req=4, run_id=4),
    p.CheckpointDone(req=5, path="/x", ms=10.0, files=["model.safetensors"]),
    p.Restored(req=6, path="/x", ms=3.0, checksum="abc"),
    p.Bye(req=7),
    p.Error(req=1, message="boom", traceback="Traceback ..."),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_as_its_own_type(msg: p.Msg) -> None:
    back = p.decode(p.encode(msg))
    assert type(back) is type(msg)
    assert back == msg


def test_tags_are_unique() -> None:
    tags = [cls.__struct_config__.tag for cls in p.Message.__args__]  # type: ignore[attr-defined]
    assert len(tags) == len(set(tags)) == len(p.Message.__args__)  # type: ignore[attr-defined]


def test_pickle_bytes_are_refused_not_unpickled() -> None:
    with pytest.raises(msgspec.DecodeError):
        p.decode(pickle.dumps(["x"]))
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        p.decode(b"\x80\x04\x95")


def test_unknown_type_and_bad_fields_are_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        p.decode(msgspec.msgpack.encode({"type": "exec", "code": "import os"}))
    with pytest.raises(msgspec.ValidationError):
        p.decode(msgspec.msgpack.encode({"type": "apply", "run_id": "not an int"}))
    with pytest.raises(msgspec.ValidationError):  # unknown fields are not silently dropped
        p.decode(msgspec.msgpack.encode({"type": "apply", "run_id": 1, "extra": 1}))
    with pytest.raises(msgspec.ValidationError):
        p.decode(msgspec.msgpack.encode({"type": "train", "run_id": 1, "objective": "ppo"}))


def test_screen_messages_refuse_unknown_and_missing_fields() -> None:
    good = msgspec.msgpack.decode(p.encode(p.Screen(run_id=1, pairs=[p.Pair(prompt="q", chosen="a", rejected="b")],
                                                    base_weights="/b")))
    assert isinstance(p.decode(msgspec.msgpack.encode(good)), p.Screen)
    with pytest.raises(msgspec.ValidationError):  # the old check's limit is not a Screen field
        p.decode(msgspec.msgpack.encode({**good, "max_conflict_t": 2.0}))
    with pytest.raises(msgspec.ValidationError):  # nor a Train field any more
        p.decode(msgspec.msgpack.encode({"type": "train", "run_id": 1, "base_weights": "/b"}))
    with pytest.raises(msgspec.ValidationError, match="base_weights"):
        p.decode(msgspec.msgpack.encode({k: v for k, v in good.items() if k != "base_weights"}))
    reply = {"type": "screened", "run_id": 1, "contributions": [1.0], "n_tensors": 1, "probed_fraction": 1.0,
             "ms": 1.0}
    assert p.decode(msgspec.msgpack.encode(reply)) == p.Screened(run_id=1, contributions=[1.0], n_tensors=1,
                                                                   probed_fraction=1.0, ms=1.0)
    with pytest.raises(msgspec.ValidationError):
        p.decode(msgspec.msgpack.encode({**reply, "p_value": 0.5}))
    with pytest.raises(msgspec.ValidationError):
        p.decode(msgspec.msgpack.encode({**reply, "contributions": ["high"]}))
